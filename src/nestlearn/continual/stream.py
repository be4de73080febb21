"""What a continual-learning stream is: an ordered sequence of tasks, each with its own
train / validation / test splits, all of one kind.

Kinds:
- ``"lm"``: language modelling; a split is a 1-D token tensor (documents joined by the
  tokenizer's end-of-document id). Scores: next-token accuracy (higher is better) and loss /
  bits per byte (lower is better).
- ``"classification"``: sequence classification with one head over every class of the stream
  (the model is never told which task an input comes from). A split is padded token rows,
  their lengths and global class ids.
- ``"forecast"``: online forecasting of one quantized time series whose regime changes from
  task to task (and may recur). A split holds the raw values, their tokens and regime ids.

The splits are plain tensors so that every method, model and metric sees the same data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nestlearn.errors import NestlearnError

KINDS: tuple[str, ...] = ("lm", "classification", "forecast")


@dataclass(frozen=True)
class LMSplit:
    """``tokens``: 1-D LongTensor; ``documents``: how many documents it joins."""

    tokens: torch.Tensor
    documents: int = 1

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1 or self.tokens.dtype != torch.long or self.tokens.numel() < 2:
            raise NestlearnError(f"LMSplit.tokens: got shape {tuple(self.tokens.shape)} "
                                 f"{self.tokens.dtype}; allowed: a 1-D LongTensor of >= 2 "
                                 "tokens")

    def __len__(self) -> int:
        return self.tokens.numel()


@dataclass(frozen=True)
class ClassSplit:
    """``inputs [N, T]`` (right padded), ``lengths [N]`` (>= 1) and ``labels [N]`` (global
    class ids), all LongTensors."""

    inputs: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = self.inputs.shape[0] if self.inputs.dim() == 2 else -1
        ok = (n >= 1 and self.lengths.shape == (n,) and self.labels.shape == (n,)
              and all(t.dtype == torch.long for t in (self.inputs, self.lengths, self.labels)))
        if not ok:
            raise NestlearnError(
                f"ClassSplit: got inputs {tuple(self.inputs.shape)}, lengths "
                f"{tuple(self.lengths.shape)}, labels {tuple(self.labels.shape)}; allowed: "
                "LongTensors [N, T], [N], [N] with N >= 1")

    def __len__(self) -> int:
        return self.inputs.shape[0]


@dataclass(frozen=True)
class SeriesSplit:
    """``values [N]`` (float), their quantized ``tokens [N]`` and ``regimes [N]`` (the id of
    the process that generated each step)."""

    values: torch.Tensor
    tokens: torch.Tensor
    regimes: torch.Tensor

    def __post_init__(self) -> None:
        n = self.values.numel()
        if (self.values.dim() != 1 or n < 2 or self.tokens.shape != (n,)
                or self.regimes.shape != (n,) or self.tokens.dtype != torch.long):
            raise NestlearnError(
                f"SeriesSplit: got values {tuple(self.values.shape)}, tokens "
                f"{tuple(self.tokens.shape)}, regimes {tuple(self.regimes.shape)}; allowed: "
                "1-D tensors of one length >= 2, tokens a LongTensor")

    def __len__(self) -> int:
        return self.values.numel()


Split = LMSplit | ClassSplit | SeriesSplit
_SPLIT_OF_KIND = {"lm": LMSplit, "classification": ClassSplit, "forecast": SeriesSplit}


@dataclass(frozen=True)
class Task:
    """One stage of a stream. ``classes``: the global class ids the task's data holds
    (classification only): disjoint across tasks in a class-incremental stream (split digits,
    wiki topics), the same for every task in a domain-incremental one (permuted digits)."""

    name: str
    train: Split
    validation: Split
    test: Split
    classes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Stream:
    """An ordered sequence of tasks of one ``kind`` over one token vocabulary.

    ``seq_len``: window length for LM and forecasting, input length for classification.
    ``bytes_per_token``: text bytes per token on average (1.0 for the byte tokenizer), to
    report bits per byte. ``class_names``: one per global class id. ``bins``: forecasting's
    quantization edges (``len(bins) + 1`` tokens). ``description``: one line for reports.
    """

    name: str
    kind: str
    tasks: tuple[Task, ...]
    vocab_size: int
    seq_len: int
    class_names: tuple[str, ...] = ()
    bytes_per_token: float = 1.0
    bins: tuple[float, ...] = ()
    description: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise NestlearnError(f"Stream.kind: got {self.kind!r}; allowed: {', '.join(KINDS)}")
        if not self.tasks:
            raise NestlearnError(f"stream {self.name!r}: no tasks; allowed: one or more")
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise NestlearnError(f"stream {self.name!r}: task names repeat: {names}")
        wanted = _SPLIT_OF_KIND[self.kind]
        for task in self.tasks:
            for split_name in ("train", "validation", "test"):
                split = getattr(task, split_name)
                if not isinstance(split, wanted):
                    raise NestlearnError(
                        f"stream {self.name!r} task {task.name!r}: {split_name} split is a "
                        f"{type(split).__name__}; a {self.kind!r} stream needs {wanted.__name__}")
        if self.kind == "classification":
            if len(self.class_names) < 2:
                raise NestlearnError(f"stream {self.name!r}: a classification stream needs "
                                     ">= 2 class_names")
            for task in self.tasks:
                if not task.classes or not all(0 <= c < len(self.class_names)
                                               for c in task.classes):
                    raise NestlearnError(
                        f"stream {self.name!r} task {task.name!r}: classes {task.classes}; "
                        f"allowed: a non-empty tuple of ids in [0, {len(self.class_names)})")
        if self.vocab_size < 2 or self.seq_len < 1:
            raise NestlearnError(f"stream {self.name!r}: vocab_size {self.vocab_size} and "
                                 f"seq_len {self.seq_len}; allowed: >= 2 and >= 1")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)
