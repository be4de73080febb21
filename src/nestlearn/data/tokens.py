"""Token files (memory-mapped) and the batches drawn from them.

Layout on disk, for a token file ``NAME``:

- ``NAME.bin``: the flat token stream ``EOD d1 EOD d2 EOD ... dn EOD`` (``EOD`` is the
  tokenizer's end-of-document id) as little-endian ``uint16`` (vocabularies up to 65,536) or
  ``uint32``. Empty documents are dropped.
- ``NAME.json``: metadata: dtype, token count, ``boundaries`` (the positions of the n + 1 EOD
  tokens), the tokenizer's description, the total UTF-8 bytes of the documents and the
  SHA-256 of ``NAME.bin``. Both files are written atomically, the ``.bin`` first.

Document i is the span ``tokens[boundaries[i] : boundaries[i + 1] + 1]``: it starts with the
EOD that ends the previous document (context "a new document starts here") and ends with its
own EOD, so every token of the document and its end are predicted exactly once.

Batches respect document boundaries: a window never holds tokens of two documents.
:class:`WindowSampler` draws windows of ``seq_len + 1`` tokens uniformly among all window
positions inside documents; a document shorter than a window gives one window holding the
whole document, right-padded with the tokenizer's pad id, whose padded targets are
``IGNORE_INDEX`` (-100, the default ``ignore_index`` of ``torch.nn.functional.cross_entropy``).
:class:`EvalWindows` walks every document in order, so each target is scored exactly once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nestlearn.atomic import atomic_open, atomic_write_json, sha256_file
from nestlearn.data.tokenizers import Tokenizer
from nestlearn.errors import NestlearnError, check_int, invalid
from nestlearn.losses import IGNORE_INDEX

FORMAT = "nestlearn-tokens"
FORMAT_VERSION = 1
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_ENCODE_BATCH = 256  # documents per tokenizer call while writing


def token_file_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(NAME.bin, NAME.json)`` for ``NAME`` or ``NAME.bin``."""
    base = Path(path).expanduser()
    if base.suffix == ".bin":
        base = base.with_suffix("")
    return base.parent / (base.name + ".bin"), base.parent / (base.name + ".json")


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest stored integer type that holds every id of the vocabulary."""
    if vocab_size <= 2**16:
        return "uint16"
    if vocab_size <= 2**32:
        return "uint32"
    raise invalid("vocab_size", vocab_size, "at most 2**32")


def write_token_file(
    path: str | os.PathLike[str], documents: Iterable[str], tokenizer: Tokenizer
) -> TokenFile:
    """Tokenize ``documents`` into the token file ``path`` (see the module docstring) and
    return it opened."""
    bin_path, meta_path = token_file_paths(path)
    if not bin_path.parent.is_dir():
        raise NestlearnError(f"token file: folder {str(bin_path.parent)!r} does not exist")
    dtype_name = dtype_for_vocab(tokenizer.vocab_size)
    dtype = _DTYPES[dtype_name]
    eod = np.array([tokenizer.eod_id], dtype=dtype)
    boundaries: list[int] = []
    num_tokens = 0
    num_bytes = 0
    digest = hashlib.sha256()

    def emit(chunk: np.ndarray) -> None:
        nonlocal num_tokens
        data = chunk.tobytes()
        digest.update(data)
        stream.write(data)
        num_tokens += len(chunk)

    try:
        with atomic_open(bin_path, "wb") as stream:
            for texts in _iter_batches(documents):
                batch = [text for text in texts if text]
                for text, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
                    if not boundaries:
                        boundaries.append(0)
                        emit(eod)
                    emit(np.asarray(ids, dtype=dtype))
                    boundaries.append(num_tokens)
                    emit(eod)
                    num_bytes += len(text.encode("utf-8"))
    except OSError as err:
        raise NestlearnError(
            f"token file: cannot write {str(bin_path)!r} ({err.strerror})"
        ) from err
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype_name,
        "num_tokens": num_tokens,
        "num_documents": max(len(boundaries) - 1, 0),
        "num_bytes": num_bytes,
        "sha256": digest.hexdigest(),
        "tokenizer": tokenizer.describe(),
        "boundaries": boundaries,
    }
    atomic_write_json(meta_path, meta)
    return TokenFile(bin_path)


def _iter_batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in documents:
        if not isinstance(text, str):
            raise invalid("documents", f"an item of type {type(text).__name__}", "str")
        batch.append(text)
        if len(batch) == _ENCODE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


class TokenFile:
    """A token file opened read-only and memory-mapped, its metadata checked.

    Raises NestlearnError when the metadata is missing or malformed, or disagrees with the
    ``.bin`` file (size, dtype, document boundaries); with ``verify_checksum=True`` the
    whole ``.bin`` is also hashed and compared with the stored SHA-256.
    """

    def __init__(self, path: str | os.PathLike[str], verify_checksum: bool = False) -> None:
        self.bin_path, self.meta_path = token_file_paths(path)
        meta = self._read_meta()
        self.meta = meta
        self.dtype = _DTYPES[meta["dtype"]]
        self.num_tokens: int = meta["num_tokens"]
        self.num_documents: int = meta["num_documents"]
        self.num_bytes: int = meta["num_bytes"]
        self.sha256: str = meta["sha256"]
        self.tokenizer_info: dict[str, Any] = meta["tokenizer"]
        self.vocab_size: int = self.tokenizer_info["vocab_size"]
        self.eod_id: int = self.tokenizer_info["eod_id"]
        self.pad_id: int = self.tokenizer_info["pad_id"]
        self.boundaries = np.asarray(meta["boundaries"], dtype=np.int64)
        self.tokens = self._map()
        self._check_boundaries()
        if verify_checksum:
            self.verify_checksum()

    def _fail(self, what: str) -> NestlearnError:
        return NestlearnError(f"token file {str(self.bin_path)!r}: {what}")

    def _read_meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise self._fail(f"metadata {str(self.meta_path)!r} does not exist") from err
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._fail(f"cannot read metadata {str(self.meta_path)!r} ({err})") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise self._fail(f"{str(self.meta_path)!r} is not nestlearn token metadata")
        if meta.get("format_version") != FORMAT_VERSION:
            raise self._fail(f"format_version {meta.get('format_version')!r}; allowed: 1")
        if meta.get("dtype") not in _DTYPES:
            raise self._fail(f"dtype {meta.get('dtype')!r}; allowed: uint16, uint32")
        for field in ("num_tokens", "num_documents", "num_bytes"):
            value = meta.get(field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise self._fail(f"{field} {value!r}; allowed: an integer >= 0")
        tokenizer = meta.get("tokenizer")
        if not isinstance(tokenizer, dict) or not all(
            isinstance(tokenizer.get(k), int) for k in ("vocab_size", "eod_id", "pad_id")
        ):
            raise self._fail("tokenizer description lacks vocab_size, eod_id or pad_id")
        if dtype_for_vocab(tokenizer["vocab_size"]) != meta["dtype"]:
            raise self._fail(
                f"dtype {meta['dtype']} does not match vocab_size {tokenizer['vocab_size']}"
            )
        if not isinstance(meta.get("boundaries"), list) or not isinstance(meta.get("sha256"), str):
            raise self._fail("metadata lacks the boundaries list or the sha256")
        return meta

    def _map(self) -> np.ndarray:
        try:
            size = self.bin_path.stat().st_size
        except FileNotFoundError as err:
            raise self._fail("the .bin file does not exist") from err
        expected = self.num_tokens * self.dtype.itemsize
        if size != expected:
            raise self._fail(
                f"size {size} bytes, but the metadata says {self.num_tokens} tokens of "
                f"{self.meta['dtype']} = {expected} bytes; rewrite the token file"
            )
        if self.num_tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def _check_boundaries(self) -> None:
        b = self.boundaries
        if self.num_documents == 0:
            if len(b) != 0 or self.num_tokens != 0:
                raise self._fail("no documents, but tokens or boundaries are present")
            return
        if len(b) != self.num_documents + 1:
            raise self._fail(
                f"{len(b)} boundaries for {self.num_documents} documents; expected "
                f"{self.num_documents + 1}"
            )
        if b[0] != 0 or b[-1] != self.num_tokens - 1 or np.any(np.diff(b) < 1):
            raise self._fail("document boundaries are not increasing from 0 to the last token")
        if np.any(self.tokens[b] != self.eod_id):
            raise self._fail("document boundaries do not hold the end-of-document id")

    def verify_checksum(self) -> None:
        if sha256_file(self.bin_path) != self.sha256:
            raise self._fail("SHA-256 of the .bin file differs from the metadata (corrupt file)")

    def document_lengths(self) -> np.ndarray:
        """Length of each document's span (its tokens plus the EOD on either side)."""
        return np.diff(self.boundaries) + 1

    def document(self, index: int) -> np.ndarray:
        """The span of document ``index``: EOD, its tokens, EOD."""
        if not 0 <= index < self.num_documents:
            raise invalid("document index", index, f"0 to {self.num_documents - 1}")
        return np.asarray(self.tokens[self.boundaries[index] : self.boundaries[index + 1] + 1])

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Raise unless ``tokenizer`` is the one this file was written with."""
        if tokenizer.describe() != self.tokenizer_info:
            raise self._fail(
                f"written with tokenizer {self.tokenizer_info}, not {tokenizer.describe()}"
            )

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (
            f"TokenFile({str(self.bin_path)!r}, tokens={self.num_tokens}, "
            f"documents={self.num_documents}, dtype={self.meta['dtype']})"
        )


def _check_ranks(batch_size: int, rank: int, world_size: int) -> None:
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0)
    if rank >= world_size:
        raise invalid("rank", rank, f"0 to world_size - 1 = {world_size - 1}")
    if batch_size % world_size:
        allowed = f"a multiple of world_size={world_size} (it is the global batch)"
        raise invalid("batch_size", batch_size, allowed)


def _window_tensors(
    token_file: TokenFile, starts: np.ndarray, ends: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows ``tokens[start:end]`` (at most seq_len + 1 long), right-padded, as
    ``(inputs, targets)`` with padded targets set to IGNORE_INDEX."""
    rows = np.full((len(starts), seq_len + 1), token_file.pad_id, dtype=np.int64)
    valid = np.zeros((len(starts), seq_len + 1), dtype=bool)
    for row, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        rows[row, : end - start] = token_file.tokens[start:end]
        valid[row, : end - start] = True
    targets = np.where(valid[:, 1:], rows[:, 1:], IGNORE_INDEX)
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(targets)


def set_sampler_fields(sampler: Any, token_file: TokenFile, seq_len: int, batch_size: int,
                       seed: int, rank: int, world_size: int) -> None:
    """Check and set what every training sampler holds: ``token_file``, ``seq_len``,
    ``batch_size`` (global), ``seed``, ``rank``, ``world_size`` and ``local_batch_size``."""
    if not isinstance(token_file, TokenFile):
        raise invalid("token_file", type(token_file).__name__, "a TokenFile")
    sampler.token_file = token_file
    sampler.seq_len = check_int("seq_len", seq_len, 1)
    sampler.batch_size = check_int("batch_size", batch_size, 1)
    sampler.seed = check_int("seed", seed, 0)
    _check_ranks(batch_size, rank, world_size)
    sampler.rank = rank
    sampler.world_size = world_size
    sampler.local_batch_size = batch_size // world_size


class WindowSampler:
    """Random training windows that never cross a document boundary.

    Every batch is a pure function of ``(seed, step)``: batch ``step`` draws ``batch_size``
    window positions uniformly from all positions where a window of ``seq_len + 1`` tokens
    fits inside one document (a document shorter than that counts as one position and is
    padded, see the module docstring). ``batch_size`` is the global batch: with
    ``world_size`` processes, process ``rank`` gets rows ``rank * b : (rank + 1) * b`` of it
    (``b = batch_size // world_size``), so the processes together see exactly the batch a
    single process would. ``state_dict()`` records the step; loading it into a new sampler
    continues with the same batches (also with a different world_size).
    """

    def __init__(
        self,
        token_file: TokenFile,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        set_sampler_fields(self, token_file, seq_len, batch_size, seed, rank, world_size)
        self.step = 0
        if token_file.num_documents == 0:
            raise NestlearnError(f"token file {str(token_file.bin_path)!r} has no documents")
        lengths = token_file.document_lengths()
        self._slots = np.maximum(lengths - seq_len, 1)
        self._slot_ends = np.cumsum(self._slots)
        self._total_slots = int(self._slot_ends[-1])

    @property
    def num_windows(self) -> int:
        """How many distinct windows the sampler draws from."""
        return self._total_slots

    def global_positions(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(start, end)`` token positions of the global batch ``step``."""
        rng = np.random.default_rng([self.seed, step])
        return self.window_positions(rng.integers(0, self._total_slots, size=self.batch_size))

    def window_positions(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(start, end)`` of windows numbered ``slots`` (0 to num_windows - 1): document by
        document, the windows starting at each possible offset in order."""
        documents = np.searchsorted(self._slot_ends, slots, side="right")
        offsets = slots - (self._slot_ends[documents] - self._slots[documents])
        b = self.token_file.boundaries
        starts = b[documents] + offsets
        ends = np.minimum(starts + self.seq_len + 1, b[documents + 1] + 1)
        return starts, ends

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, LongTensors [batch_size // world_size, seq_len]."""
        starts, ends = self.global_positions(self.step)
        rows = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        self.step += 1
        return _window_tensors(self.token_file, starts[rows], ends[rows], self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "step": self.step,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "token_file_sha256": self.token_file.sha256,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state made for another file or shape."""
        if not isinstance(state, dict):
            raise invalid("sampler state", type(state).__name__, "a dict from state_dict()")
        for field in ("seq_len", "batch_size", "token_file_sha256"):
            mine = getattr(self, field) if field != "token_file_sha256" else self.token_file.sha256
            if state.get(field) != mine:
                raise invalid(f"sampler state {field}", repr(state.get(field)), repr(mine))
        self.seed = check_int("sampler state seed", state.get("seed"), 0)
        self.step = check_int("sampler state step", state.get("step"), 0)


class EvalWindows:
    """Sequential evaluation batches: each document is cut into consecutive windows of
    ``seq_len`` targets (the last one padded), so every token after a document's leading
    EOD is a target exactly once. Batch ``k`` goes to process ``k % world_size``.

    Iterating yields ``(inputs, targets)`` LongTensors [<= batch_size, seq_len];
    ``num_targets`` is the number of scored tokens (all processes together).
    """

    def __init__(
        self,
        token_file: TokenFile,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.token_file = token_file
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        check_int("world_size", world_size, 1)
        if not 0 <= rank < world_size:
            raise invalid("rank", rank, f"0 to world_size - 1 = {world_size - 1}")
        self.rank = rank
        self.world_size = world_size
        starts, ends = [], []
        for first, last in itertools.pairwise(token_file.boundaries.tolist()):
            for start in range(first, last, seq_len):
                starts.append(start)
                ends.append(min(start + seq_len + 1, last + 1))
        self._starts = np.asarray(starts, dtype=np.int64)
        self._ends = np.asarray(ends, dtype=np.int64)
        self.num_targets = int(np.sum(self._ends - self._starts - 1)) if starts else 0
        self.num_batches = -(-len(starts) // batch_size)

    def __len__(self) -> int:
        """Batches this process yields."""
        return len(range(self.rank, self.num_batches, self.world_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in range(self.rank, self.num_batches, self.world_size):
            rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            starts, ends = self._starts[rows], self._ends[rows]
            yield _window_tensors(self.token_file, starts, ends, self.seq_len)
