"""Stream evaluation: loss over whole documents, read segment by segment with the state carried.

Window evaluation (``perplexity.evaluate_split``) starts every window from an empty state, so
it cannot show whether a model uses context beyond one window. Here each document is read from
its first token to its last in segments of ``segment_len`` tokens, the model's state (memories,
KV cache, CMS levels) carried from one segment into the next, and every target's loss is
recorded at its position in the document. The loss by position bucket (0-512, 512-1k, 1k-2k,
...) is the curve that shows long-context use: it falls with position when the model's memory
helps.

Batching: documents are sorted by length (longest first) and read ``batch_size`` at a time,
each batch from a fresh state. Shorter rows are padded at the end with the pad id and their
padded targets are not scored; every layer keeps one state per row (no op mixes rows), so a
finished row cannot change another row's losses (tested against a one-document-at-a-time loop
in float64). Models with CMS levels driven by the LM teach signal are run through it
(``nestlearn.models.teaching.scored_forward``), so those levels keep learning while reading.

Positions count from the document's leading end-of-document token: the target at position p
is predicted after reading p + 1 tokens.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.errors import check_int, check_optional_int, invalid
from nestlearn.evaluate.perplexity import bits_per_byte, tokens_per_byte
from nestlearn.losses import IGNORE_INDEX

FIRST_BUCKET_EDGE = 512  # default edges: 512, 1024, 2048, ... (power-of-two bucket widths)

Progress = Callable[[int, int], None]  # (targets scored so far, targets in all)


@dataclass(frozen=True)
class PositionBucket:
    """Loss over the targets at positions ``start <= p < end`` (``end`` None: no upper end)."""

    start: int
    end: int | None
    loss: float | None  # None when no target fell in the bucket
    tokens: int

    @property
    def label(self) -> str:
        if self.end is None:
            return f"{_short(self.start)}+"
        return f"{_short(self.start)}-{_short(self.end)}"

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "label": self.label, "loss": self.loss,
                "tokens": self.tokens}


@dataclass(frozen=True)
class StreamEvalResult:
    """Overall loss (nats/token), perplexity and bits per byte, targets and documents scored,
    the segment length, and the loss by position bucket."""

    loss: float
    ppl: float
    bpb: float
    tokens: int
    documents: int
    segment_len: int
    buckets: tuple[PositionBucket, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "ppl": self.ppl, "bpb": self.bpb, "tokens": self.tokens,
                "documents": self.documents, "segment_len": self.segment_len,
                "buckets": [bucket.to_dict() for bucket in self.buckets]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamEvalResult:
        """The result :meth:`to_dict` wrote (e.g. read back from a run's JSON)."""
        try:
            buckets = tuple(PositionBucket(b["start"], b["end"], b["loss"], b["tokens"])
                            for b in data["buckets"])
            return cls(data["loss"], data["ppl"], data["bpb"], data["tokens"],
                       data["documents"], data["segment_len"], buckets)
        except (KeyError, TypeError) as err:
            raise invalid("stream result", f"a dict lacking {err}",
                          "StreamEvalResult.to_dict() output") from None


def _short(position: int) -> str:
    """512 -> '512', 1024 -> '1k', 1536 -> '1.5k', 2**20 -> '1M'."""
    for size, suffix in ((1 << 20, "M"), (1 << 10, "k")):
        if position >= size:
            return f"{position / size:g}{suffix}"
    return str(position)


def bucket_edges(buckets: Sequence[int] | None, longest: int) -> tuple[int, ...]:
    """The inner bucket edges: ``buckets`` checked, or (None) 512, 1024, 2048, ... while an
    edge is below ``longest`` (the number of targets of the longest document)."""
    if buckets is None:
        edges, edge = [], FIRST_BUCKET_EDGE
        while edge < longest:
            edges.append(edge)
            edge *= 2
        return tuple(edges)
    edges = tuple(buckets)
    allowed = "increasing integers >= 1 (the positions where buckets start)"
    if not edges or any(isinstance(e, bool) or not isinstance(e, int) for e in edges):
        raise invalid("buckets", repr(buckets), allowed)
    if edges[0] < 1 or any(b <= a for a, b in itertools.pairwise(edges)):
        raise invalid("buckets", repr(buckets), allowed)
    return edges


def document_rows(token_file: Any, documents: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` [len(documents), longest - 1]: each document's span, inputs
    right-padded with the pad id, padded targets ``IGNORE_INDEX``."""
    spans = [token_file.document(index) for index in documents]
    width = max(len(span) for span in spans) - 1
    inputs = np.full((len(spans), width), token_file.pad_id, dtype=np.int64)
    targets = np.full((len(spans), width), IGNORE_INDEX, dtype=np.int64)
    for row, span in enumerate(spans):
        inputs[row, :len(span) - 1] = span[:-1]
        targets[row, :len(span) - 1] = span[1:]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-target cross entropy ``[B, T]`` (0 at ``IGNORE_INDEX``), in float32 or wider."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(targets.shape)


@torch.no_grad()
def evaluate_stream(model: nn.Module, token_file: Any, *, segment_len: int, batch_size: int,
                    buckets: Sequence[int] | None = None, device: torch.device | str = "cpu",
                    max_documents: int | None = None,
                    autocast: contextlib.AbstractContextManager | None = None,
                    progress: Progress | None = None) -> StreamEvalResult:
    """Score every target of the first ``max_documents`` documents (default all) of
    ``token_file``, each document read whole in segments of ``segment_len`` tokens with the
    state carried (see the module docstring).

    ``buckets``: the positions where loss buckets start after 0 (default 512, 1024, 2048, ...
    up to the longest document); the last bucket has no upper end. ``progress(done, total)``
    is called after every segment with the targets scored so far. Bits per byte use the
    file's tokens per byte (exact over the whole file, its average for a subset).
    """
    from nestlearn.models.teaching import scored_forward, uses_lm_teach_signal

    check_int("segment_len", segment_len, 1)
    check_int("batch_size", batch_size, 1)
    check_optional_int("max_documents", max_documents, 1)
    if token_file.num_documents == 0:
        raise invalid("token_file", "a file without documents", "at least one document")
    count = token_file.num_documents if max_documents is None else min(
        max_documents, token_file.num_documents)
    lengths = token_file.document_lengths()[:count] - 1  # targets per document
    order = sorted(range(count), key=lambda index: -int(lengths[index]))
    edges = bucket_edges(buckets, int(lengths.max()))
    edge_tensor = torch.tensor(edges, dtype=torch.long, device=device)
    sums = torch.zeros(len(edges) + 1, dtype=torch.float64, device=device)
    counts = torch.zeros(len(edges) + 1, dtype=torch.long, device=device)
    teach = uses_lm_teach_signal(model)
    total, done = int(lengths.sum()), 0
    was_training = model.training
    model.eval()
    try:
        for first in range(0, count, batch_size):
            rows = order[first:first + batch_size]
            inputs, targets = document_rows(token_file, rows)
            row_lengths = lengths[rows]
            state = None  # every document starts from the model's fresh state
            for offset in range(0, inputs.shape[1], segment_len):
                x = inputs[:, offset:offset + segment_len].to(device)
                y = targets[:, offset:offset + segment_len].to(device)
                with autocast or contextlib.nullcontext():
                    logits, state = scored_forward(model, x, y, state, teach=teach)
                losses = token_losses(logits, y).double()
                scored = y != IGNORE_INDEX
                where = torch.bucketize(torch.arange(offset, offset + y.shape[1], device=device),
                                        edge_tensor, right=True)
                sums.index_add_(0, where, (losses * scored).sum(0))
                counts.index_add_(0, where, scored.sum(0))
                done += int(np.clip(row_lengths - offset, 0, y.shape[1]).sum())
                if progress is not None:
                    progress(done, total)
    finally:
        model.train(was_training)
    sums, counts = sums.cpu(), counts.cpu()
    scored_total = int(counts.sum())
    loss = float(sums.sum()) / max(scored_total, 1)
    starts = (0, *edges)
    ends = (*edges, None)
    result_buckets = tuple(
        PositionBucket(start, end, float(s) / int(c) if int(c) else None, int(c))
        for start, end, s, c in zip(starts, ends, sums, counts, strict=True))
    return StreamEvalResult(
        loss=loss, ppl=math.exp(loss) if loss < 700 else math.inf,
        bpb=bits_per_byte(loss, tokens_per_byte(token_file)), tokens=scored_total,
        documents=count, segment_len=segment_len, buckets=result_buckets)
