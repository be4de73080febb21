"""The stream sampler: every target once per epoch, document order, new-document flags,
determinism, DDP rows disjoint and equal to one process, bit-exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nestlearn.data.streams import StreamSampler
from nestlearn.data.tokenizers import ByteTokenizer
from nestlearn.data.tokens import IGNORE_INDEX, TokenFile, write_token_file
from nestlearn.errors import NestlearnError

BYTE = ByteTokenizer()
SEQ = 8


@pytest.fixture
def token_file(tmp_path) -> TokenFile:
    rng = np.random.default_rng(0)
    # lengths around a segment: shorter, exactly one (7 chars + 2 EOD = 9 tokens), several
    lengths = [1, 3, 7, 8, 15, 16, 23, 40, 5, 2, 31, 9]
    docs = ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, n)) for n in lengths]
    return write_token_file(tmp_path / "train", docs, BYTE)


def _walk(sampler: StreamSampler, steps: int) -> list:
    return [sampler.next_batch() for _ in range(steps)]


def _row_epoch_steps(sampler: StreamSampler, row: int) -> int:
    """Segments in one epoch of ``row``: ceil(targets / seq_len) per document."""
    spans = sampler.token_file.document_lengths() - 1
    return int(sum(-(-int(spans[d]) // SEQ) for d in sampler.row_documents(row)))


def test_every_target_scored_exactly_once_per_epoch_in_document_order(token_file):
    batch = 3
    sampler = StreamSampler(token_file, SEQ, batch, seed=5)
    owned = [set(sampler.row_documents(r).tolist()) for r in range(batch)]
    assert set().union(*owned) == set(range(token_file.num_documents))
    assert sum(len(o) for o in owned) == token_file.num_documents  # rows partition documents
    epochs = [_row_epoch_steps(sampler, r) for r in range(batch)]
    batches = _walk(sampler, max(epochs))
    tokens = torch.from_numpy(token_file.tokens.astype(np.int64))
    b = token_file.boundaries
    for row in range(batch):
        scored, texts = [], []
        for step in range(epochs[row]):
            inputs, targets, new = (t[row] for t in batches[step])
            valid = targets != IGNORE_INDEX
            # inputs are the targets shifted by one (a contiguous piece of the token stream)
            assert torch.equal(inputs[1:][valid[:-1]], targets[:-1][valid[:-1]])
            if bool(new):
                assert int(inputs[0]) == BYTE.eod_id  # a document starts with its leading EOD
                texts.append([])
            texts[-1].extend(targets[valid].tolist())
            scored.append(int(valid.sum()))
        # each document read whole and in one piece: its targets are its span after the EOD
        documents = {}
        for d in owned[row]:
            documents[tuple(tokens[b[d] + 1:b[d + 1] + 1].tolist())] = d
        read = [documents[tuple(t)] for t in texts]
        assert sorted(read) == sorted(owned[row])
        assert sum(scored) == sum(int(b[d + 1] - b[d]) for d in owned[row])
        # the next epoch starts with a new document, in another seeded order
        if epochs[row] < len(batches):
            assert bool(batches[epochs[row]].new_document[row])


def test_padding_only_at_a_document_end(token_file):
    sampler = StreamSampler(token_file, SEQ, 2, seed=0)
    for _, targets, _ in _walk(sampler, 30):
        for row in range(2):
            valid = (targets[row] != IGNORE_INDEX).tolist()
            # scored targets come first; padding, if any, fills the rest of the segment
            assert valid == sorted(valid, reverse=True)
            if not all(valid):
                assert int(targets[row][sum(valid) - 1]) == BYTE.eod_id


def test_deterministic_and_seed_dependent(token_file):
    one = _walk(StreamSampler(token_file, SEQ, 4, seed=1), 12)
    two = _walk(StreamSampler(token_file, SEQ, 4, seed=1), 12)
    other = _walk(StreamSampler(token_file, SEQ, 4, seed=2), 12)
    assert all(torch.equal(a, b) for x, y in zip(one, two, strict=True)
               for a, b in zip(x, y, strict=True))
    assert not all(torch.equal(x.inputs, y.inputs) for x, y in zip(one, other, strict=True))


def test_ddp_ranks_get_disjoint_rows_of_the_single_process_batch(token_file):
    single = _walk(StreamSampler(token_file, SEQ, 4, seed=3), 10)
    ranks = [_walk(StreamSampler(token_file, SEQ, 4, seed=3, rank=r, world_size=2), 10)
             for r in range(2)]
    for step, whole in enumerate(single):
        for field in range(3):
            joined = torch.cat([ranks[0][step][field], ranks[1][step][field]])
            assert torch.equal(joined, whole[field])
    sampler = StreamSampler(token_file, SEQ, 4, seed=3)
    assert not set(sampler.row_documents(0)) & set(sampler.row_documents(2))


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_is_bit_exact(token_file, world_size):
    straight = StreamSampler(token_file, SEQ, 4, seed=7)
    expected = _walk(straight, 40)
    first = StreamSampler(token_file, SEQ, 4, seed=7)
    _walk(first, 17)
    state = first.state_dict()
    resumed = [StreamSampler(token_file, SEQ, 4, seed=7, rank=r, world_size=world_size)
               for r in range(world_size)]
    for sampler in resumed:
        sampler.load_state_dict(state)
    for step in range(17, 40):
        parts = [s.next_batch() for s in resumed]
        for field in range(3):
            got = torch.cat([p[field] for p in parts])
            assert torch.equal(got, expected[step][field])
    assert resumed[0].state_dict() == straight.state_dict()


def test_refusals(token_file, tmp_path):
    with pytest.raises(NestlearnError, match=r"data\.batch_size: got 13; allowed: at most the 12"):
        StreamSampler(token_file, SEQ, 13)
    sampler = StreamSampler(token_file, SEQ, 2)
    state = sampler.state_dict()
    with pytest.raises(NestlearnError, match="sampler state seq_len"):
        StreamSampler(token_file, SEQ + 1, 2).load_state_dict(state)
    with pytest.raises(NestlearnError, match="a stream sampler's state_dict"):
        sampler.load_state_dict({"seed": 0, "step": 3})
    bad = {**state, "rows": [[0, 0, 3], [0, 0, 0]]}
    with pytest.raises(NestlearnError, match=r"sampler state rows\[0\]"):
        sampler.load_state_dict(bad)
    bad = {**state, "rows": [[0, 99, 0], [0, 0, 0]]}
    with pytest.raises(NestlearnError, match=r"sampler state rows\[0\]"):
        sampler.load_state_dict(bad)
    assert sampler.state_dict() == state  # a refused state changes nothing
