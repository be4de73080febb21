"""Evaluation windows batched by length, so a batch is only as wide as its longest window.

The windows are those of ``nestlearn.data.tokens.EvalWindows`` (each document cut into
consecutive windows of ``seq_len`` targets, every target once), but sorted by length, longest
first, before they are batched: full windows go together, and the short last windows of
documents go together in narrow batches instead of being padded to ``seq_len``. On a corpus
of paragraphs (documents of 100 to 200 bytes) at ``seq_len`` 256 this runs the model on about
1.03 token slots per target instead of 2.9. Each window is still read from an empty state, so
the scores are those of ``EvalWindows`` (tested).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from nestlearn.errors import check_int
from nestlearn.losses import IGNORE_INDEX


class LengthSortedWindows:
    """``(inputs, targets)`` batches [<= batch_size, longest window of the batch]; padded
    targets are ``IGNORE_INDEX``. ``num_targets``: the scored targets of all batches."""

    def __init__(self, token_file: Any, seq_len: int, batch_size: int) -> None:
        self.token_file = token_file
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        starts, ends = [], []
        for first, last in itertools.pairwise(token_file.boundaries.tolist()):
            for start in range(first, last, seq_len):
                starts.append(start)
                ends.append(min(start + seq_len + 1, last + 1))
        order = np.argsort(-(np.asarray(ends) - np.asarray(starts)), kind="stable")
        self._starts = np.asarray(starts, dtype=np.int64)[order]
        self._ends = np.asarray(ends, dtype=np.int64)[order]
        self.num_targets = int(np.sum(self._ends - self._starts - 1)) if starts else 0

    def __len__(self) -> int:
        return -(-len(self._starts) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        tokens = self.token_file.tokens
        for first in range(0, len(self._starts), self.batch_size):
            starts = self._starts[first:first + self.batch_size]
            ends = self._ends[first:first + self.batch_size]
            width = int((ends - starts).max()) - 1
            inputs = np.full((len(starts), width), self.token_file.pad_id, dtype=np.int64)
            targets = np.full((len(starts), width), IGNORE_INDEX, dtype=np.int64)
            for row, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(),
                                                   strict=True)):
                span = np.asarray(tokens[start:end], dtype=np.int64)
                inputs[row, :len(span) - 1] = span[:-1]
                targets[row, :len(span) - 1] = span[1:]
            yield torch.from_numpy(inputs), torch.from_numpy(targets)
