"""Language-model loss, perplexity and bits per byte over batches of a token split.

Loss is the mean next-token cross-entropy in nats over scored targets (padding targets,
``-100``, are skipped). Bits per byte rescales it by the split's tokens per UTF-8 byte, so
models with different tokenizers compare: ``bpb = loss / ln 2 * targets / bytes``; over a
whole split (``EvalWindows``) it is exactly total bits / total bytes.

Each window is read from an empty state (``stream.evaluate_stream`` carries the state through
whole documents). Models whose CMS levels learn from the LM teach signal are run through it
(``nestlearn.models.teaching.scored_forward``), so those levels learn inside each window as
they do in training. Columns after a batch's last scored target are dropped before the model
runs (a batch of short documents is not padded to the full window length; the model is
causal, so the scores are the same); ``evaluate_split`` also batches windows of similar length
together (``windows.LengthSortedWindows``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from nestlearn.losses import IGNORE_INDEX, lm_loss_sum, scored_targets


@dataclass(frozen=True)
class EvalResult:
    """Mean loss (nats/token), perplexity, bits per byte, targets scored, batches read."""

    loss: float
    ppl: float
    bpb: float
    tokens: int
    batches: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def token_loss_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   teach: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, object]:
    """``(sum of target losses, number of scored targets, state)`` of one batch read from an
    empty state (``teach``: run the LM teach signal; default: when the model uses it)."""
    from nestlearn.models.teaching import scored_forward

    logits, state = scored_forward(model, inputs, targets, teach=teach)
    return lm_loss_sum(logits, targets), scored_targets(targets), state


def trim_padding(inputs: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch without the columns after its last scored target (at least one column)."""
    scored = (targets != IGNORE_INDEX).any(dim=0).nonzero()
    width = int(scored.max()) + 1 if scored.numel() else 1
    return inputs[:, :width], targets[:, :width]


def bits_per_byte(loss: float, tokens_per_byte: float) -> float:
    """Bits per byte of a mean loss in nats per token."""
    return loss / math.log(2) * tokens_per_byte


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     tokens_per_byte: float, device: torch.device | str = "cpu",
                     max_batches: int | None = None,
                     autocast: contextlib.AbstractContextManager | None = None,
                     progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Evaluate ``model`` on ``(inputs, targets)`` batches (at most ``max_batches``);
    ``progress(batches done, batches in all)`` is called after each batch (the total is 0
    when ``batches`` has no length and ``max_batches`` is None)."""
    from nestlearn.models.teaching import uses_lm_teach_signal

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    seen = 0
    expected = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None:
        expected = max_batches if expected is None else min(expected, max_batches)
    teach = uses_lm_teach_signal(model)
    try:
        for inputs, targets in batches:
            if max_batches is not None and seen >= max_batches:
                break
            inputs, targets = trim_padding(inputs, targets)
            with autocast or contextlib.nullcontext():
                loss_sum, n, _ = token_loss_sum(model, inputs.to(device), targets.to(device),
                                                teach=teach)
            total += loss_sum.double().cpu()
            count += int(n)
            seen += 1
            if progress is not None:
                progress(seen, expected or 0)
    finally:
        model.train(was_training)
    loss = float(total) / max(count, 1)
    ppl = math.exp(loss) if loss < 700 else math.inf
    return EvalResult(loss=loss, ppl=ppl, bpb=bits_per_byte(loss, tokens_per_byte),
                      tokens=count, batches=seen)


def tokens_per_byte(token_file: object) -> float:
    """Scored targets per UTF-8 byte of a token file (every token after the first EOD)."""
    num_bytes = max(int(token_file.num_bytes), 1)
    return max(int(token_file.num_tokens) - 1, 0) / num_bytes


def evaluate_split(model: nn.Module, token_file: object, seq_len: int, batch_size: int,
                   device: torch.device | str = "cpu", max_batches: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Evaluate over consecutive windows of a whole split (those of ``EvalWindows``), each
    target scored once, batched by length (``windows.LengthSortedWindows``: longest first, so
    ``max_batches`` stops early among the longest windows; bpb then uses the split's average
    ratio)."""
    from nestlearn.evaluate.windows import LengthSortedWindows

    windows = LengthSortedWindows(token_file, seq_len, batch_size)
    return evaluate_batches(model, windows, tokens_per_byte(token_file), device, max_batches,
                            progress=progress)
