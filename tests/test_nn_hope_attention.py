"""HOPE-Attention block: causal softmax attention (RoPE, pre-norm, KV cache) followed by CMS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.errors import NestlearnError
from nestlearn.nn.cms import CMSConfig
from nestlearn.nn.hope_attention import HOPEAttentionBlock, HOPEAttentionState
from nestlearn.nn.teach_signal import stream_with_teach_signal
from nestlearn.nn.transformer import TransformerBlock

DIM, HEADS, HIDDEN = 8, 2, 12


def make_block(seed: int = 0, **cms_kwargs) -> HOPEAttentionBlock:
    torch.manual_seed(seed)
    arguments = {"dim": DIM, "chunk_sizes": (2, 4), "hidden": HIDDEN, "inner_lr": (0.05, 0.02),
                 "init_std": 0.3, **cms_kwargs}
    block = HOPEAttentionBlock(DIM, HEADS, CMSConfig(**arguments), init_std=0.3).double()
    with torch.no_grad():
        for target in block.cms.local_targets.values():
            target.normal_(std=0.3)
    return block


def random_input(length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, DIM, generator=generator, dtype=torch.float64)


def test_block_is_attention_then_cms_token_by_token():
    block = make_block()
    x = random_input(11)
    y, state = block(x)
    # Reference: attention over the whole prefix, then the CMS token-by-token reference.
    mixed, _ = block.attn(block.attn_norm(x))
    y_ref, cms_ref = block.cms.forward_naive(x + mixed)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for level, level_ref in zip(state.cms.levels, cms_ref.levels, strict=True):
        for w, w_ref in zip(level.weights, level_ref.weights, strict=True):
            torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    assert state.attention.position == 11 and state.cms.position == 11


def test_causality():
    block = make_block()
    x = random_input(12)
    changed = x.clone()
    changed[:, 7] += 1.0
    y, _ = block(x)
    y_changed, _ = block(changed)
    torch.testing.assert_close(y_changed[:, :7], y[:, :7], rtol=0, atol=0)
    assert not torch.allclose(y_changed[:, 7:], y[:, 7:])


@pytest.mark.parametrize("mode", ["frozen", "zero_rates"])
def test_level_stacking_equals_the_transformer_block(mode):
    torch.manual_seed(7)
    transformer = TransformerBlock(DIM, HEADS, HIDDEN, init_std=0.3).double()
    with torch.no_grad():
        transformer.attn_norm.weight.uniform_(0.5, 1.5)
        transformer.mlp_norm.weight.uniform_(0.5, 1.5)
    # Level 1 from the Transformer's MLP; level 2 starts as the identity (zero output weights).
    extra = {"frozen": True} if mode == "frozen" else {"inner_lr": 0.0}
    block = make_block(**extra)
    block.load_from_transformer_block(transformer, level=0)
    with torch.no_grad():
        block.cms.initial[1].w_down.zero_()
    x = random_input(9)
    y, state = block(x)
    y_ref, _ = transformer(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-14)
    # Streaming with the KV cache also matches.
    first, state = block(x[:, :4])
    second, _ = block(x[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), y_ref, rtol=0, atol=1e-13)


class TinyAttentionLM(nn.Module):
    def __init__(self, vocab: int = 9) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(vocab, DIM)
        self.block = HOPEAttentionBlock(DIM, HEADS, CMSConfig(
            dim=DIM, chunk_sizes=(2, 4), hidden=HIDDEN, teach_signal="lm",
            inner_lr=(0.05, 0.02), init_std=0.3))
        self.head = nn.Linear(DIM, vocab, bias=False)

    def init_state(self, batch: int) -> HOPEAttentionState:
        return self.block.init_state(batch)

    def forward(self, ids, state=None, *, teach_hook=None):
        h, state = self.block(self.embed(ids), state, teach_hook=teach_hook)
        return self.head(h), state


def test_lm_teach_signal_through_the_block():
    model = TinyAttentionLM().double()
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 9, (2, 11), generator=generator)
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        logits, state = stream_with_teach_signal(model, ids, targets)
        parts, chained = [], None
        # Splits on multiples of the smallest chunk keep the same segments as one call.
        for start, stop in ((0, 4), (4, 6), (6, 10)):
            out, chained = stream_with_teach_signal(model, ids[:, start:stop],
                                                    targets[:, start:stop], chained)
            parts.append(out)
    torch.testing.assert_close(torch.cat(parts, dim=1), logits, rtol=1e-10, atol=1e-12)
    assert state.attention.position == 10 and state.cms.position == 10
    for index, level in enumerate(state.cms.levels):
        initial = model.block.cms.initial_weights(index)
        assert not torch.allclose(level.weights[0], initial[0])
    # Step 1 of the stream sees the initial weights; from token 2 on, level 1 has learned.
    first, _ = model(ids[:, :2], model.init_state(2))
    torch.testing.assert_close(logits[:, :2], first, rtol=1e-12, atol=1e-13)
    frozen_rest, _ = model(ids, model.init_state(2))
    assert not torch.allclose(logits[:, 2:], frozen_rest[:, 2:])
    loss = F.cross_entropy(logits.reshape(-1, 9), targets.reshape(-1))
    assert torch.isfinite(loss)


def test_bad_config_and_state_are_refused():
    with pytest.raises(NestlearnError, match=r"cms\.dim"):
        HOPEAttentionBlock(DIM, HEADS, CMSConfig(dim=DIM + 2))
    with pytest.raises(NestlearnError, match="cms"):
        HOPEAttentionBlock(DIM, HEADS, {"dim": DIM})
    with pytest.raises(NestlearnError, match="heads"):
        HOPEAttentionBlock(DIM, 3, CMSConfig(dim=DIM))
    with pytest.raises(NestlearnError, match="num_layers"):
        HOPEAttentionBlock(DIM, HEADS, CMSConfig(dim=DIM), num_layers=0)
    block = make_block()
    x = random_input(3)
    with pytest.raises(NestlearnError, match="HOPEAttentionState"):
        block(x, block.cms.init_state(2))
    other = make_block(chunk_sizes=(2, 8))
    _, foreign = other(x)
    with pytest.raises(NestlearnError, match=r"state\.config"):
        block(x, foreign)
