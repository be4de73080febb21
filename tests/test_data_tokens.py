"""Token files (round trip, corrupt or mismatched metadata refused) and the batch samplers
(determinism, document boundaries, padding, resume, rank split, sequential evaluation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nestlearn.data.tokenizers import BPETokenizer, ByteTokenizer
from nestlearn.data.tokens import (
    IGNORE_INDEX,
    EvalWindows,
    TokenFile,
    WindowSampler,
    write_token_file,
)
from nestlearn.errors import NestlearnError

DOCS = [
    "short",
    "",
    "a medium length document, with ünïcode ✓",
    "x" * 97,
    "the quick brown fox jumps over the lazy dog " * 3,
]
BYTE = ByteTokenizer()


@pytest.fixture
def token_file(tmp_path) -> TokenFile:
    return write_token_file(tmp_path / "train", DOCS, BYTE)


def test_round_trip(token_file, tmp_path):
    assert token_file.bin_path == tmp_path / "train.bin"
    assert (tmp_path / "train.json").is_file()
    assert token_file.meta["dtype"] == "uint16" and token_file.tokens.dtype == np.uint16
    kept = [d for d in DOCS if d]
    assert token_file.num_documents == len(kept)
    assert token_file.num_bytes == sum(len(d.encode()) for d in kept)
    for index, text in enumerate(kept):
        span = token_file.document(index)
        assert span[0] == span[-1] == BYTE.eod_id
        assert BYTE.decode(span.tolist()) == text
    reopened = TokenFile(tmp_path / "train.bin", verify_checksum=True)
    assert np.array_equal(reopened.tokens, token_file.tokens)
    token_file.check_tokenizer(BYTE)


def test_wide_vocab_uses_uint32_and_tokenizer_mismatch_refused(tmp_path):
    class WideTokenizer(ByteTokenizer):
        @property
        def vocab_size(self) -> int:
            return 70_000

        def encode(self, text):
            return [69_999, *super().encode(text)]

    wide = write_token_file(tmp_path / "wide", ["ab"], WideTokenizer())
    assert wide.meta["dtype"] == "uint32"
    assert wide.document(0).tolist() == [256, 69_999, 97, 98, 256]
    with pytest.raises(NestlearnError, match="written with tokenizer"):
        wide.check_tokenizer(BYTE)


def test_bpe_token_file(tmp_path):
    bpe = BPETokenizer.train(DOCS * 5, vocab_size=280)
    tf = write_token_file(tmp_path / "bpe", DOCS, bpe)
    assert bpe.decode(tf.document(1).tolist()) == DOCS[2]  # the empty document is dropped
    tf.check_tokenizer(bpe)


def _edit_meta(tmp_path, **changes):
    path = tmp_path / "train.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dtype": "uint32"}, "does not match vocab_size"),
        ({"dtype": "float32"}, "dtype 'float32'"),
        ({"num_tokens": 10}, "size .* bytes, but the metadata says 10 tokens"),
        ({"num_documents": 3}, "5 boundaries for 3 documents"),
        ({"format_version": 2}, "format_version 2"),
        ({"format": "other"}, "not nestlearn token metadata"),
        ({"tokenizer": {"vocab_size": 258}}, "lacks vocab_size, eod_id or pad_id"),
    ],
)
def test_mismatched_metadata_refused(token_file, tmp_path, changes, message):
    _edit_meta(tmp_path, **changes)
    with pytest.raises(NestlearnError, match=message):
        TokenFile(tmp_path / "train")


def test_corrupt_files_refused(token_file, tmp_path):
    meta = json.loads((tmp_path / "train.json").read_text())
    moved = list(meta["boundaries"])
    moved[1] += 1
    _edit_meta(tmp_path, boundaries=moved)
    with pytest.raises(NestlearnError, match="do not hold the end-of-document id"):
        TokenFile(tmp_path / "train")
    _edit_meta(tmp_path, boundaries=meta["boundaries"])
    data = bytearray((tmp_path / "train.bin").read_bytes())
    data[5] ^= 1
    (tmp_path / "train.bin").write_bytes(bytes(data))
    TokenFile(tmp_path / "train")  # same size and boundaries: only the checksum notices
    with pytest.raises(NestlearnError, match="SHA-256"):
        TokenFile(tmp_path / "train", verify_checksum=True)
    (tmp_path / "train.bin").write_bytes(bytes(data[:-2]))
    with pytest.raises(NestlearnError, match="size"):
        TokenFile(tmp_path / "train")
    (tmp_path / "train.json").unlink()
    with pytest.raises(NestlearnError, match="does not exist"):
        TokenFile(tmp_path / "train")
    (tmp_path / "train.json").write_text("{")
    with pytest.raises(NestlearnError, match="cannot read metadata"):
        TokenFile(tmp_path / "train")


def _batches(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_deterministic_given_seed(token_file):
    first = _batches(WindowSampler(token_file, seq_len=16, batch_size=4, seed=3), 5)
    again = _batches(WindowSampler(token_file, seq_len=16, batch_size=4, seed=3), 5)
    other = _batches(WindowSampler(token_file, seq_len=16, batch_size=4, seed=4), 5)
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))
    x, y = first[0]
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (4, 16)


def test_windows_stay_inside_documents(token_file):
    sampler = WindowSampler(token_file, seq_len=16, batch_size=8, seed=0)
    spans = [token_file.document(i).tolist() for i in range(token_file.num_documents)]
    seen_documents = set()
    for x, y in _batches(sampler, 40):
        for inputs, targets in zip(x.tolist(), y.tolist(), strict=True):
            valid = [t for t in targets if t != IGNORE_INDEX]
            window = [inputs[0], *valid]
            # Targets are the inputs shifted by one; padding only after the end.
            assert inputs[1 : len(valid) + 1] == valid[: len(inputs) - 1]
            assert all(t == IGNORE_INDEX for t in targets[len(valid) :])
            assert all(t == BYTE.pad_id for t in inputs[len(valid) + 1 :])
            # The window is a contiguous piece of exactly one document's span.
            owners = [i for i, s in enumerate(spans) if _contains(s, window)]
            assert owners
            seen_documents.update(owners)
            # An end-of-document id only at the window's edges, never inside.
            assert BYTE.eod_id not in window[1:-1]
    assert seen_documents == set(range(len(spans)))


def _contains(span, window):
    n = len(window)
    return any(span[i : i + n] == window for i in range(len(span) - n + 1))


def test_short_document_padded_once(tmp_path):
    tf = write_token_file(tmp_path / "short", ["abc"], BYTE)
    x, y = WindowSampler(tf, seq_len=8, batch_size=2, seed=0).next_batch()
    assert x[0].tolist() == [256, 97, 98, 99, 256, 257, 257, 257]
    assert y[0].tolist() == [97, 98, 99, 256, -100, -100, -100, -100]
    assert torch.equal(x[0], x[1])


def test_resume_continues_with_the_same_batches(token_file):
    uninterrupted = WindowSampler(token_file, seq_len=16, batch_size=4, seed=7)
    expected = _batches(uninterrupted, 8)
    first = WindowSampler(token_file, seq_len=16, batch_size=4, seed=7)
    _batches(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = WindowSampler(token_file, seq_len=16, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected[5:], _batches(resumed, 3), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    wrong = WindowSampler(token_file, seq_len=32, batch_size=4, seed=7)
    with pytest.raises(NestlearnError, match="sampler state seq_len: got 16"):
        wrong.load_state_dict(state)


def test_ranks_split_the_global_batch(token_file):
    single = _batches(WindowSampler(token_file, seq_len=16, batch_size=6, seed=1), 3)
    ranks = [
        _batches(WindowSampler(token_file, 16, 6, seed=1, rank=r, world_size=3), 3)
        for r in range(3)
    ]
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][step][0] for r in range(3)]), x)
        assert torch.equal(torch.cat([ranks[r][step][1] for r in range(3)]), y)
    with pytest.raises(NestlearnError, match="batch_size: got 6; allowed: a multiple of"):
        WindowSampler(token_file, 16, 6, world_size=4)
    with pytest.raises(NestlearnError, match="rank: got 2"):
        WindowSampler(token_file, 16, 6, rank=2, world_size=2)


def test_eval_windows_score_every_token_once(token_file):
    windows = EvalWindows(token_file, seq_len=10, batch_size=3)
    targets = [t for _, y in windows for t in y.flatten().tolist() if t != IGNORE_INDEX]
    assert targets == token_file.tokens[1:].tolist()
    assert windows.num_targets == len(targets) == token_file.num_tokens - 1
    for x, y in windows:
        valid = y != IGNORE_INDEX
        assert torch.equal(x[:, 1:][valid[:, :-1]], y[:, :-1][valid[:, :-1]])
    per_rank = [list(EvalWindows(token_file, 10, 3, rank=r, world_size=2)) for r in range(2)]
    merged = [per_rank[k % 2][k // 2] for k in range(windows.num_batches)]
    for (x, y), (x2, y2) in zip(windows, merged, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_bad_sampler_arguments(token_file, tmp_path):
    with pytest.raises(NestlearnError, match="seq_len: got 0"):
        WindowSampler(token_file, 0, 4)
    with pytest.raises(NestlearnError, match="token_file: got"):
        WindowSampler("train.bin", 8, 4)
    empty = write_token_file(tmp_path / "empty", ["", ""], BYTE)
    assert empty.num_tokens == 0 and empty.num_documents == 0
    with pytest.raises(NestlearnError, match="has no documents"):
        WindowSampler(empty, 8, 4)
    assert list(EvalWindows(empty, 8, 4)) == []


def test_window_numbering_matches_a_naive_enumeration(token_file):
    """The vectorised slot -> window mapping against a loop over documents and offsets."""
    seq_len = 16
    naive = []
    for index in range(token_file.num_documents):
        first, last = token_file.boundaries[index], token_file.boundaries[index + 1]
        length = last - first + 1
        if length <= seq_len + 1:
            naive.append((first, last + 1))
        else:
            naive.extend((first + o, first + o + seq_len + 1) for o in range(length - seq_len))
    sampler = WindowSampler(token_file, seq_len=seq_len, batch_size=1)
    assert sampler.num_windows == len(naive)
    starts, ends = sampler.window_positions(np.arange(len(naive)))
    assert list(zip(starts.tolist(), ends.tolist(), strict=True)) == naive
