"""Stream batches: every batch row reads its own documents in order, segment after segment.

For training with a carried state (truncated backprop through time), row ``r`` of the global
batch owns a fixed share of the documents (a seeded permutation of all documents, dealt
round-robin: row ``r`` gets positions ``r, r + B, r + 2B, ...``) and walks through them one
after another, each epoch in its own seeded order. Each batch gives every row the next
``seq_len`` targets of its current document.

Document ends are **padded, not packed**: a segment never holds tokens of two documents. The
last segment of a document is right-padded (targets ``IGNORE_INDEX``) and the next document
starts at the next segment, flagged in ``new_document``. So "reset the state at a document
boundary" is exact: a reset happens only between segments, and the state carried into a
document's first segment can be replaced by a fresh one without touching any token of the
previous document. Segments cut a document exactly as :class:`nestlearn.data.EvalWindows`
does (starting at its leading EOD, ``seq_len`` targets each), so within one epoch of a row
every target of its documents is scored exactly once.

Under DDP (``world_size`` processes) process ``rank`` gets rows
``rank * b : (rank + 1) * b`` (``b = batch_size // world_size``) of the global batch, so
processes read disjoint documents and together see what one process would. Every process
tracks the positions of all rows (a few integers each), so ``state_dict()`` from any rank
resumes the whole stream, bit for bit, also with another number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from nestlearn.data.tokens import TokenFile, _window_tensors, set_sampler_fields
from nestlearn.errors import NestlearnError, check_int, invalid


class StreamBatch(NamedTuple):
    """One step of every row: ``inputs``/``targets`` LongTensors ``[b, seq_len]`` and
    ``new_document`` BoolTensor ``[b]`` (True: this row's segment starts a document)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    new_document: torch.Tensor


class StreamSampler:
    """Consecutive segments of each row's documents; see the module docstring.

    A row's position is ``(epoch, index, offset)``: the ``index``-th document of its order in
    ``epoch``, at token ``offset`` (a multiple of ``seq_len``) of that document's span.
    """

    def __init__(self, token_file: TokenFile, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        set_sampler_fields(self, token_file, seq_len, batch_size, seed, rank, world_size)
        if token_file.num_documents < batch_size:
            documents = token_file.num_documents
            raise NestlearnError(
                f"data.batch_size: got {batch_size}; allowed: at most the {documents}"
                f" documents of {str(token_file.bin_path)!r} (stream sampling gives every batch "
                "row its own documents)")
        dealt = np.random.default_rng([self.seed]).permutation(token_file.num_documents)
        self._owned = [dealt[row::batch_size] for row in range(batch_size)]
        self.step = 0
        self._positions = [(0, 0, 0)] * batch_size
        self._orders = [self._order(row, 0) for row in range(batch_size)]

    def _order(self, row: int, epoch: int) -> np.ndarray:
        """Documents of ``row`` in the order it reads them in ``epoch``."""
        owned = self._owned[row]
        return owned[np.random.default_rng([self.seed, row, epoch]).permutation(len(owned))]

    def row_documents(self, row: int) -> np.ndarray:
        """The documents global row ``row`` owns (sorted)."""
        return np.sort(self._owned[row])

    def _segment(self, row: int) -> tuple[int, int, bool]:
        """``(start, end, new document)`` token positions of ``row``'s current segment."""
        _, index, offset = self._positions[row]
        document = int(self._orders[row][index])
        first, last = self.token_file.boundaries[document:document + 2].tolist()
        start = first + offset
        return start, min(start + self.seq_len + 1, last + 1), offset == 0

    def _advance(self, row: int) -> None:
        epoch, index, offset = self._positions[row]
        document = int(self._orders[row][index])
        first, last = self.token_file.boundaries[document:document + 2].tolist()
        offset += self.seq_len
        if first + offset >= last:  # every target of the document was in a segment
            offset, index = 0, index + 1
            if index == len(self._orders[row]):
                epoch, index = epoch + 1, 0
                self._orders[row] = self._order(row, epoch)
        self._positions[row] = (epoch, index, offset)

    def next_batch(self) -> StreamBatch:
        """This process's rows of the next global step (every row advances)."""
        segments = [self._segment(row) for row in range(self.batch_size)]
        for row in range(self.batch_size):
            self._advance(row)
        self.step += 1
        mine = segments[self.rank * self.local_batch_size:
                        (self.rank + 1) * self.local_batch_size]
        starts = np.asarray([s for s, _, _ in mine], dtype=np.int64)
        ends = np.asarray([e for _, e, _ in mine], dtype=np.int64)
        inputs, targets = _window_tensors(self.token_file, starts, ends, self.seq_len)
        return StreamBatch(inputs, targets, torch.tensor([new for _, _, new in mine]))

    def __iter__(self) -> Iterator[StreamBatch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "stream",
            "seed": self.seed,
            "step": self.step,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "token_file_sha256": self.token_file.sha256,
            "rows": [list(position) for position in self._positions],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state made for another file, shape or sampler."""
        if not isinstance(state, dict) or state.get("kind") != "stream":
            got = state.get("kind", "windows") if isinstance(state, dict) else type(state).__name__
            raise invalid("sampler state", repr(got), "a stream sampler's state_dict()")
        mine = {"seq_len": self.seq_len, "batch_size": self.batch_size, "seed": self.seed,
                "token_file_sha256": self.token_file.sha256}
        for field, value in mine.items():
            if state.get(field) != value:
                raise invalid(f"sampler state {field}", repr(state.get(field)), repr(value))
        step = check_int("sampler state step", state.get("step"), 0)
        rows = state.get("rows")
        if not isinstance(rows, list) or len(rows) != self.batch_size:
            raise invalid("sampler state rows", type(rows).__name__,
                          f"a list of {self.batch_size} [epoch, index, offset] positions")
        positions, orders = [], []
        for row, position in enumerate(rows):
            if not isinstance(position, list) or len(position) != 3:
                raise invalid(f"sampler state rows[{row}]", repr(position),
                              "[epoch, index, offset]")
            epoch = check_int(f"sampler state rows[{row}] epoch", position[0], 0)
            index = check_int(f"sampler state rows[{row}] index", position[1], 0)
            offset = check_int(f"sampler state rows[{row}] offset", position[2], 0)
            order = self._order(row, epoch)
            span = 0
            if index < len(order):
                first, last = self.token_file.boundaries[order[index]:order[index] + 2].tolist()
                span = last - first
            if offset >= span or offset % self.seq_len:
                raise invalid(f"sampler state rows[{row}]", repr(position),
                              f"an index below {len(order)} and an offset inside that document, "
                              f"a multiple of seq_len={self.seq_len}")
            positions.append((epoch, index, offset))
            orders.append(order)
        self.step, self._positions, self._orders = step, positions, orders
