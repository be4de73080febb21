"""Learners: one per stream kind, each wraps a model and knows how to draw a training batch
from a split, compute the training loss and evaluate a split.

- ``LMLearner`` (``CausalLM``): a training example is a window of ``seq_len + 1`` tokens
  (inputs and next tokens); the loss is the mean next-token cross entropy; evaluation gives
  (next-token accuracy, mean cross entropy in nats per token).
- ``ClassLearner`` (``SequenceClassifier``): an example is one row (tokens, length, global
  class id); the loss is the cross entropy over every class of the stream (one head, the
  model is never told the task); evaluation gives (accuracy, mean cross entropy).
- ``ForecastLearner`` (``CausalLM`` over the series' bin tokens): windows as for LM, trained
  with the next-bin cross entropy; evaluation gives (bin accuracy, mean absolute error of the
  predicted mean value), the predicted mean being the softmax over the bins times the bin
  centers (``bin_centers(stream.bins)``).

State policy (``state_policy``), the same at training and evaluation:

- ``"reset"``: every training batch and every evaluation window starts from the model's fresh
  state. LM / forecast batches are random windows of the split.
- ``"carry"``: the learner keeps the model's detached state after each training step
  (attention KV caches dropped, as in stream training: ``nestlearn.training.carried_state``)
  and starts the next step from it, across steps and across tasks. LM / forecast batches then
  walk the split in order: batch row b starts at offset ``b * len(split) // B`` and reads the
  next ``seq_len`` tokens at each step (wrapping at the end), one cursor per split, so a
  row's state has read the text that precedes its window. Classification rows stay random
  (a row is a whole sequence); the state a row carries has read the previous rows of that
  batch position, padding included. Evaluation starts from a copy of the carried state and
  never changes it: LM / forecast evaluation splits the evaluated tokens into B contiguous
  rows and reads them window by window from the carried state; classification evaluates in
  batches of B rows, each from the carried state (a short last batch is filled with repeated
  rows whose outputs are dropped). Before the first step the carried state is the fresh one.

Evaluation is deterministic: LM / forecast use the first ``eval_budget`` tokens of the split
(fixed windows, stride ``seq_len``); classification uses ``eval_budget`` rows evenly spaced
over the split (all rows when there are fewer). Models whose CMS levels learn from the LM
teach signal are always run through ``nestlearn.models.teaching.scored_forward`` (training
and evaluation), so those levels learn in context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from nestlearn.continual.stream import ClassSplit, LMSplit, SeriesSplit, Stream
from nestlearn.errors import NestlearnError, check_choice, check_int
from nestlearn.models.teaching import scored_forward, uses_lm_teach_signal
from nestlearn.state import named_tensors
from nestlearn.training.carried_state import carried_form, drop_attention_caches

STATE_POLICIES: tuple[str, ...] = ("reset", "carry")
# default evaluation budget: tokens per split (lm, forecast) or rows (classification)
EVAL_BUDGET = {"lm": 4096, "forecast": 4096, "classification": 512}
EVAL_BATCH = 32  # rows per evaluation batch under the reset policy


@dataclasses.dataclass
class Batch:
    """Rows of examples. ``inputs [B, T]``; ``targets``: next tokens ``[B, T]`` (LM,
    forecast) or class ids ``[B]``; ``lengths [B]`` (classification); ``values [B, T]``: the
    next values (forecast)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.inputs.shape[0]

    def select(self, index: torch.Tensor) -> Batch:
        return Batch(*(None if t is None else t[index] for t in self._fields()))

    def row(self, index: int) -> Batch:
        """Row ``index`` as a batch of one."""
        return Batch(*(None if t is None else t[index:index + 1] for t in self._fields()))

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        return (self.inputs, self.targets, self.lengths, self.values)

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        columns = zip(*(b._fields() for b in batches), strict=True)
        return Batch(*(None if parts[0] is None else torch.cat(parts) for parts in columns))


def bin_centers(bins: tuple[float, ...]) -> torch.Tensor:
    """``len(bins) + 1`` values, one per bin token: the midpoint of each interior bin; the two
    open bins get the edge moved out by half the neighbouring bin's width (1.0 with one edge)."""
    if not bins:
        raise NestlearnError("Stream.bins: empty; allowed: a forecast stream's >= 1 bin edges")
    edges = torch.tensor(bins, dtype=torch.float64)
    first = (edges[1] - edges[0]).item() if len(bins) > 1 else 1.0
    last = (edges[-1] - edges[-2]).item() if len(bins) > 1 else 1.0
    middle = (edges[1:] + edges[:-1]) / 2
    centers = torch.cat([edges[:1] - first / 2, middle, edges[-1:] + last / 2])
    return centers.float()


def refresh_carried(carried: Any, init_state: Callable[[int], Any], batch: int) -> Any:
    """A detached carried state made ready for a training step: a tensor that is still the
    model's batch-shared initial value (a CMS level before its first update) becomes today's
    parameter again, and one that changed from it in context passes its gradient to that
    initial value as if the change were a constant (first order), as
    ``nestlearn.training.carried_state.reset_rows`` does for rows it keeps; every other
    tensor (per-row memories, pending tokens of an unfinished chunk) is kept as carried."""
    fresh = named_tensors(init_state(batch))
    other = named_tensors(init_state(batch + 1))
    leaves, spec = pytree.tree_flatten_with_path(carried)
    out = []
    for path, leaf in leaves:
        new = fresh.get("state" + pytree.keystr(path)) if isinstance(leaf, torch.Tensor) else None
        shared = new is not None and new.shape == other["state" + pytree.keystr(path)].shape
        if shared and leaf.shape == new.shape:
            out.append(new.to(leaf.dtype))
        elif shared and leaf.shape[1:] == new.shape:
            new = new.to(leaf.dtype)
            out.append(leaf.detach() + (new - new.detach()))
        else:
            out.append(leaf)
    return pytree.tree_unflatten(out, spec)


class Learner:
    """Common part: the model, the state policy and the carried state."""

    kind: str = ""

    def __init__(self, stream: Stream, model: nn.Module, *, state_policy: str = "reset",
                 batch_size: int = 16, eval_budget: int | None = None) -> None:
        self.stream = stream
        self.model = model
        self.state_policy = check_choice("state_policy", state_policy, STATE_POLICIES)
        self.batch_size = check_int("batch_size", batch_size)
        budget = EVAL_BUDGET[stream.kind] if eval_budget is None else eval_budget
        self.eval_budget = check_int("eval_budget", budget, 2)
        self.carried: Any = None  # detached state after the last training step (carry)
        self.cursors: dict[int, torch.Tensor] = {}

    @property
    def carry(self) -> bool:
        return self.state_policy == "carry"

    def set_model(self, model: nn.Module) -> None:
        """A new model (hope-stacked conversion): its states differ, the carried one goes."""
        self.model = model
        self.carried = None

    def train_state(self) -> Any:
        """The state the next training step starts from (None: the fresh state). See
        :func:`refresh_carried`."""
        if not self.carry or self.carried is None:
            return None
        return refresh_carried(self.carried, self.model.init_state, self.batch_size)

    def keep_state(self, state: Any) -> None:
        """Keep the state a training step ended with (carry only)."""
        if self.carry:
            self.carried = carried_form(state)

    def forward(self, batch: Batch, state: Any = None) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean cross entropy of the batch (the training objective)."""
        raise NotImplementedError

    def draw(self, split: Any, n: int, generator: torch.Generator, *,
             sequential: bool | None = None) -> Batch:
        raise NotImplementedError

    def evaluate(self, split: Any) -> tuple[float, float]:
        raise NotImplementedError

    def tokens(self, batch: Batch) -> int:
        return int(batch.inputs.numel())


class _WindowLearner(Learner):
    """LM and forecasting: windows of ``seq_len + 1`` tokens of a 1-D split."""

    def _tokens_of(self, split: Any) -> torch.Tensor:
        return split.tokens

    def _window(self, split: Any, starts: torch.Tensor, length: int) -> Batch:
        tokens = self._tokens_of(split)
        offsets = starts[:, None] + torch.arange(length + 1)[None, :]
        rows = tokens[offsets]
        values = None
        if isinstance(split, SeriesSplit):
            values = split.values[offsets[:, 1:]].float()
        return Batch(rows[:, :-1], rows[:, 1:], values=values)

    def _length(self, split: Any) -> int:
        return min(self.stream.seq_len, len(split) - 1)

    def draw(self, split: Any, n: int, generator: torch.Generator, *,
             sequential: bool | None = None) -> Batch:
        """``n`` windows: random (reset policy, or ``sequential=False``) or the next window
        of each row's cursor (carry policy)."""
        length = self._length(split)
        span = len(split) - length  # number of valid window starts
        sequential = self.carry if sequential is None else sequential
        if not sequential:
            starts = torch.randint(0, span, (n,), generator=generator)
            return self._window(split, starts, length)
        key = id(split)
        if key not in self.cursors or self.cursors[key].shape[0] != n:
            self.cursors[key] = torch.arange(n) * (len(split) // n) % span
        starts = self.cursors[key]
        self.cursors[key] = (starts + length) % span
        return self._window(split, starts, length)

    def forward(self, batch: Batch, state: Any = None) -> tuple[torch.Tensor, Any]:
        return scored_forward(self.model, batch.inputs, batch.targets, state)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               batch.targets.reshape(-1))

    def _eval_batches(self, split: Any) -> list[tuple[Batch, bool]]:
        """(batch, starts a new row) pairs covering the first ``eval_budget`` tokens."""
        cap = min(len(split), self.eval_budget + 1)
        length = self._length(split)
        if not self.carry:
            starts = torch.arange(0, max(1, cap - length), length)
            return [(self._window(split, part, length), True)
                    for part in starts.split(EVAL_BATCH)]
        rows = self.batch_size
        per_row = (cap - 1) // rows
        if per_row < 1:
            raise NestlearnError(f"eval_budget {self.eval_budget} over a split of {len(split)} "
                                 f"tokens leaves no token for each of {rows} rows; allowed: "
                                 f">= {rows + 1} evaluated tokens")
        base = torch.arange(rows) * per_row
        out = []
        for offset in range(0, per_row, length):
            size = min(length, per_row - offset)
            out.append((self._window(split, base + offset, size), offset == 0))
        return out

    @torch.no_grad()
    def _run_eval(self, split: Any) -> list[tuple[torch.Tensor, Batch]]:
        """(logits, batch) for every evaluation batch."""
        was_training = self.model.training
        self.model.eval()
        out = []
        state = None
        try:
            for batch, first in self._eval_batches(split):
                if self.carry:
                    state = self.carried if first else drop_attention_caches(state)
                logits, state = self.forward(batch, state if self.carry else None)
                out.append((logits, batch))
        finally:
            self.model.train(was_training)
        return out


class LMLearner(_WindowLearner):
    kind = "lm"

    def evaluate(self, split: LMSplit) -> tuple[float, float]:
        """(next-token accuracy, mean cross entropy in nats per token)."""
        correct = total = 0
        loss_sum = 0.0
        for logits, batch in self._run_eval(split):
            flat = logits.reshape(-1, logits.shape[-1]).float()
            targets = batch.targets.reshape(-1)
            correct += int((flat.argmax(-1) == targets).sum())
            loss_sum += float(F.cross_entropy(flat, targets, reduction="sum"))
            total += targets.numel()
        return correct / total, loss_sum / total


class ForecastLearner(_WindowLearner):
    kind = "forecast"

    def __init__(self, stream: Stream, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(stream, model, **kwargs)
        self.centers = bin_centers(stream.bins)

    def predicted_mean(self, logits: torch.Tensor) -> torch.Tensor:
        """The expected next value: softmax over the bin tokens times the bin centers."""
        bins = self.centers.numel()
        return torch.softmax(logits[..., :bins].float(), dim=-1) @ self.centers

    def batch_scores(self, logits: torch.Tensor, batch: Batch) -> tuple[float, float]:
        """(bin accuracy, mean absolute error) of one batch (online metrics)."""
        logits = logits.detach()
        accuracy = float((logits.argmax(-1) == batch.targets).float().mean())
        mae = float((self.predicted_mean(logits) - batch.values).abs().mean())
        return accuracy, mae

    def evaluate(self, split: SeriesSplit) -> tuple[float, float]:
        """(bin accuracy, mean absolute error of the predicted mean value)."""
        correct = total = 0
        error = 0.0
        for logits, batch in self._run_eval(split):
            correct += int((logits.argmax(-1) == batch.targets).sum())
            error += float((self.predicted_mean(logits) - batch.values).abs().sum())
            total += batch.targets.numel()
        return correct / total, error / total


class ClassLearner(Learner):
    kind = "classification"

    def draw(self, split: ClassSplit, n: int, generator: torch.Generator, *,
             sequential: bool | None = None) -> Batch:
        """``n`` random rows (both state policies: a row is a whole sequence)."""
        index = torch.randint(0, len(split), (n,), generator=generator)
        return self._rows(split, index)

    @staticmethod
    def _rows(split: ClassSplit, index: torch.Tensor) -> Batch:
        lengths = split.lengths[index]
        width = int(lengths.max())
        return Batch(split.inputs[index, :width], split.labels[index], lengths=lengths)

    def forward(self, batch: Batch, state: Any = None) -> tuple[torch.Tensor, Any]:
        return self.model(batch.inputs, state, batch.lengths)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch.targets)

    def tokens(self, batch: Batch) -> int:
        return int(batch.lengths.sum())

    def eval_rows(self, split: ClassSplit) -> torch.Tensor:
        n = len(split)
        if n <= self.eval_budget:
            return torch.arange(n)
        return torch.linspace(0, n - 1, self.eval_budget).round().long()

    @torch.no_grad()
    def evaluate(self, split: ClassSplit) -> tuple[float, float]:
        """(accuracy over all classes, mean cross entropy)."""
        index = self.eval_rows(split)
        size = self.batch_size if self.carry else EVAL_BATCH
        was_training = self.model.training
        self.model.eval()
        correct = 0
        loss_sum = 0.0
        try:
            for part in index.split(size):
                used = part.numel()
                if self.carry and used < size:  # the carried state has B rows: fill them
                    part = torch.cat([part, part.new_full((size - used,), int(part[0]))])
                batch = self._rows(split, part)
                logits, _ = self.forward(batch, self.carried if self.carry else None)
                logits, targets = logits[:used].float(), batch.targets[:used]
                correct += int((logits.argmax(-1) == targets).sum())
                loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        finally:
            self.model.train(was_training)
        return correct / index.numel(), loss_sum / index.numel()


LEARNERS: dict[str, type[Learner]] = {"lm": LMLearner, "classification": ClassLearner,
                                      "forecast": ForecastLearner}


def make_learner(stream: Stream, model: nn.Module, **kwargs: Any) -> Learner:
    """The learner of ``stream.kind`` over ``model`` (see the module docstring)."""
    return LEARNERS[stream.kind](stream, model, **kwargs)


def teaches_lm(model: nn.Module) -> bool:
    """Whether the model's CMS levels learn from the LM teach signal."""
    return uses_lm_teach_signal(model)
