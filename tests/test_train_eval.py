import math

import pytest
import torch
from torch import nn

from nestlearn.data.tokenizers import ByteTokenizer
from nestlearn.data.tokens import TokenFile, write_token_file
from nestlearn.evaluate.perplexity import evaluate_batches, evaluate_split, tokens_per_byte


class Uniform(nn.Module):
    """Equal logits for every token: loss ln V per target."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids, state=None):
        return torch.zeros(*ids.shape, self.vocab), state


class Oracle(nn.Module):
    """Puts almost all mass on the true next token of a fixed stream."""

    def __init__(self, vocab: int, stream: dict) -> None:
        super().__init__()
        self.vocab = vocab
        self.stream = stream

    def forward(self, ids, state=None):
        logits = torch.full((*ids.shape, self.vocab), -30.0)
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                logits[b, t, self.stream.get(int(ids[b, t]), 0)] = 30.0
        return logits, state


@pytest.fixture
def token_file(tmp_path):
    docs = ["abcabcabc" * 5, "hello world, hello", "x"]
    return write_token_file(tmp_path / "split", docs, ByteTokenizer())


def test_uniform_model_scores_log_vocab(token_file):
    result = evaluate_split(Uniform(258), token_file, seq_len=8, batch_size=2)
    assert result.tokens == token_file.num_tokens - 1  # every target once
    assert result.loss == pytest.approx(math.log(258))
    assert result.ppl == pytest.approx(258)
    # bits per byte: log2(V) bits per target, times targets per UTF-8 byte of the split
    ratio = (token_file.num_tokens - 1) / token_file.num_bytes
    assert result.bpb == pytest.approx(math.log2(258) * ratio)
    assert tokens_per_byte(token_file) == pytest.approx(ratio)


def test_padding_targets_are_not_scored(tmp_path):
    token_file = write_token_file(tmp_path / "s", ["ab"], ByteTokenizer())  # EOD a b EOD
    inputs = torch.tensor([[256, 97, 98, 256, 257, 257]])
    targets = torch.tensor([[97, 98, 256, -100, -100, -100]])
    oracle = Oracle(258, {256: 97, 97: 98, 98: 256})
    result = evaluate_batches(oracle, [(inputs, targets)], tokens_per_byte(token_file))
    assert result.tokens == 3 and result.loss < 1e-6 and result.ppl == pytest.approx(1.0)


def test_max_batches_stops_early(token_file):
    reopened = TokenFile(token_file.bin_path)
    full = evaluate_split(Uniform(258), reopened, seq_len=4, batch_size=1)
    part = evaluate_split(Uniform(258), reopened, seq_len=4, batch_size=1, max_batches=2)
    assert part.batches == 2 and part.tokens == 8 and full.batches > 2
