import math

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.nn.transformer import (
    AttentionState,
    CausalSelfAttention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TransformerBlock,
    banded_attention,
)


def reference_attention(layer: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token softmax attention with explicit RoPE angles and an explicit window."""
    batch, length, dim = x.shape
    heads, hd = layer.heads, layer.head_dim
    q, k, v = layer.qkv(x).view(batch, length, 3, heads, hd).unbind(dim=2)
    half = hd // 2

    def rotate(t: torch.Tensor, pos: int) -> torch.Tensor:
        out = t.clone()
        for i in range(half):
            angle = pos * layer.rotary.base ** (-i / half)
            c, s = math.cos(angle), math.sin(angle)
            out[..., i] = t[..., i] * c - t[..., i + half] * s
            out[..., i + half] = t[..., i + half] * c + t[..., i] * s
        return out

    outputs = []
    for t in range(length):
        start = 0 if layer.window is None else max(0, t - layer.window + 1)
        qt = rotate(q[:, t], t)
        keys = torch.stack([rotate(k[:, j], j) for j in range(start, t + 1)], dim=1)
        scores = torch.einsum("bhd,bjhd->bhj", qt, keys) / math.sqrt(hd)
        weights = scores.softmax(dim=-1)
        outputs.append(torch.einsum("bhj,bjhd->bhd", weights, v[:, start:t + 1]))
    out = torch.stack(outputs, dim=1).reshape(batch, length, dim)
    return layer.out(out)


def test_rmsnorm_matches_formula():
    norm = RMSNorm(6, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 6))
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rotary_offset_equals_slice_and_scores_are_relative():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 10, 3, 8, dtype=torch.float64)
    full = rope(x)
    torch.testing.assert_close(rope(x[:, 4:], offset=4), full[:, 4:])
    q, k = torch.randn(2, 1, 1, 8, dtype=torch.float64).unbind(0)
    score_a = (rope(q[None], 7) * rope(k[None], 3)).sum()
    score_b = (rope(q[None], 104) * rope(k[None], 100)).sum()
    torch.testing.assert_close(score_a, score_b)


def test_swiglu_matches_formula():
    mlp = SwiGLU(4, 6).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    gate = x @ mlp.gate.weight.T
    expected = (gate * torch.sigmoid(gate) * (x @ mlp.up.weight.T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("window", [None, 1, 3])
def test_attention_matches_reference(window):
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 2, window=window).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    out, state = layer(x)
    torch.testing.assert_close(out, reference_attention(layer, x))
    assert state.position == 9
    kept = 9 if window is None else window - 1
    assert state.key.shape == (2, 2, kept, 8)


@pytest.mark.parametrize("window,cached,length", [(1, 0, 5), (4, 0, 5), (4, 3, 12),
                                                  (4, 2, 14), (5, 6, 11), (3, 1, 3)])
def test_banded_attention_equals_one_masked_pass(window, cached, length):
    # O(T * window) blocks against the full [T, S] band mask; cached >= window too (keys no
    # query can see), and T not a multiple of the window
    torch.manual_seed(2)
    q = torch.randn(2, 3, length, 4, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 3, cached + length, 4, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 3, cached + length, 4, dtype=torch.float64, requires_grad=True)
    query_pos = torch.arange(length)[:, None] + cached
    key_pos = torch.arange(cached + length)[None, :]
    mask = (key_pos <= query_pos) & (query_pos - key_pos < window)
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    out = banded_attention(q, keys, values, window)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [q, keys, values])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [q, keys, values])
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_block_causality_and_state():
    torch.manual_seed(2)
    block = TransformerBlock(16, 2, 24, window=None, num_layers=2).double()
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    y, _ = block(x)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(1, 3, 16, dtype=torch.float64)
    y2, _ = block(x2)
    torch.testing.assert_close(y[:, :5], y2[:, :5])
    assert not torch.allclose(y[:, 5:], y2[:, 5:])
    y_a, state = block(x[:, :6])
    y_b, _ = block(x[:, 6:], state)
    torch.testing.assert_close(torch.cat([y_a, y_b], dim=1), y)


def test_bad_inputs_name_the_argument():
    layer = CausalSelfAttention(16, 2)
    with pytest.raises(NestlearnError, match="heads"):
        CausalSelfAttention(16, 3)
    with pytest.raises(NestlearnError, match="window"):
        CausalSelfAttention(16, 2, window=0)
    with pytest.raises(NestlearnError, match=r"x\.shape"):
        layer(torch.randn(2, 5, 8))
    with pytest.raises(NestlearnError, match="T >= 1"):
        layer(torch.randn(2, 0, 16))
    _, state = layer(torch.randn(2, 3, 16))
    with pytest.raises(NestlearnError, match=r"state\.key\.shape"):
        layer(torch.randn(3, 3, 16), state)
    with pytest.raises(NestlearnError, match="state"):
        layer(torch.randn(2, 3, 16), (state.key, state.value))
    with pytest.raises(NestlearnError, match=r"state\.key"):
        layer(torch.randn(2, 3, 16, dtype=torch.float64),
              AttentionState(state.key, state.value, 3))
    with pytest.raises(NestlearnError, match="head_dim"):
        RotaryEmbedding(7)
    with pytest.raises(NestlearnError, match="offset"):
        RotaryEmbedding(8)(torch.randn(1, 2, 1, 8), offset=-1)
