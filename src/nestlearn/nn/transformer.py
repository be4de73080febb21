"""Transformer++ parts: RMSNorm, rotary embeddings, SwiGLU, causal attention with a KV cache.

The baseline the paper compares against (Llama-style "Transformer++"). Attention keeps its
keys and values in an explicit state, so a sequence can be processed in segments (and decoded
token by token) with exactly the outputs of one pass; an optional sliding window bounds that
state, which the Titans MAG hybrid uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.errors import check_int, check_number, invalid
from nestlearn.state import TreeState, state_dataclass, static_field


def check_input(x: object, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` is a floating ``[B, T, dim]`` tensor with T >= 1, of ``dtype`` when given.

    ``dtype`` is the layer's parameter dtype; under autocast the layer casts for itself, so
    any floating dtype passes.
    """
    if not isinstance(x, torch.Tensor):
        raise invalid("x", type(x).__name__, f"a torch.Tensor of shape [B, T, {dim}]")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise invalid("x.shape", tuple(x.shape), f"[B, T, {dim}]")
    if x.shape[1] == 0:
        raise invalid("x.shape", tuple(x.shape), "a sequence length T >= 1")
    if not x.is_floating_point():
        raise invalid("x.dtype", x.dtype, "a floating dtype")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise invalid("x.dtype", x.dtype, f"the layer's dtype ({dtype})")
    return x


class RMSNorm(nn.Module):
    """Root-mean-square normalization with a learned gain (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        if not eps > 0:
            raise invalid("eps", eps, "a float > 0")
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x * scale * self.weight


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, "rotate half" layout) with a position offset.

    ``forward(x [B, T, H, D], offset)`` rotates the pair (x_i, x_{i + D/2}) of the token at
    absolute position ``offset + t`` by the angle ``(offset + t) * base^(-2i / D)``. Angles are
    computed in float64 so a long offset loses no precision before the cast to ``x``'s dtype.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        check_int("head_dim", head_dim)
        if head_dim % 2:
            raise invalid("head_dim", head_dim, "an even int (RoPE rotates pairs)")
        if not base > 1:
            raise invalid("base", base, "a float > 1")
        self.head_dim = head_dim
        self.base = float(base)

    def cos_sin(self, length: int, offset: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.head_dim // 2
        inv_freq = self.base ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
        positions = torch.arange(offset, offset + length, dtype=torch.float64, device=device)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise invalid("x.shape", tuple(x.shape), f"[B, T, H, {self.head_dim}]")
        check_int("offset", offset, 0)
        cos, sin = self.cos_sin(x.shape[1], offset, x.device, x.dtype)
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
        return x * cos + rotated * sin


class SwiGLU(nn.Module):
    """The gated MLP of Transformer++: ``down(silu(gate(x)) * up(x))``, no biases.

    Stateless (its weights change only by the outer optimizer), so ``forward(x) -> y``.
    """

    def __init__(self, dim: int, hidden: int, init_std: float = 0.02,
                 out_init_std: float | None = None) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.hidden = check_int("hidden", hidden)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        nn.init.normal_(self.gate.weight, std=init_std)
        nn.init.normal_(self.up.weight, std=init_std)
        nn.init.normal_(self.down.weight, std=init_std if out_init_std is None else out_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


@state_dataclass
class AttentionState(TreeState):
    """KV cache of one attention layer.

    ``key`` and ``value`` are ``[B, H, S, Dh]`` (keys already rotated); ``position`` is the
    absolute position of the next token. With a sliding window only the last ``window - 1``
    positions are kept, so the state stops growing.
    """

    key: torch.Tensor
    value: torch.Tensor
    position: int = static_field()


def banded_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     window: int) -> torch.Tensor:
    """Causal sliding-window attention in blocks of ``window`` queries: O(T * window).

    ``q`` ``[B, H, T, Dh]`` are the last T of the ``S = cached + T`` positions of ``keys`` and
    ``values`` (any ``cached``; keys older than the window are dropped). Query block b attends
    to the 2 * window key positions ending with its own last one, under the band mask
    ``key <= query < key + window`` (and, in the first block, only keys that exist); the
    same outputs as one masked pass over all S keys, without its T x S scores.
    """
    length = q.shape[2]
    cached = keys.shape[2] - length
    blocks = -(-length // window)
    tail = blocks * window - length

    def pad(x: torch.Tensor, front: int, back: int) -> torch.Tensor:
        return F.pad(x, (0, 0, front, back))

    # window - cached zero positions in front (a negative pad crops keys no query can see):
    # block b's keys are then positions
    # [b * window, b * window + 2 * window) of the padded sequence
    key_blocks = pad(keys, window - cached, tail).unfold(2, 2 * window, window)
    value_blocks = pad(values, window - cached, tail).unfold(2, 2 * window, window)
    query_blocks = pad(q, 0, tail).unflatten(2, (blocks, window))
    row = torch.arange(window, device=q.device)[:, None]
    col = torch.arange(2 * window, device=q.device)[None, :]
    band = (col > row) & (col <= row + window)  # key = col - window relative to the block
    mask = band.expand(blocks, window, 2 * window).clone()
    mask[0] &= col >= window - cached  # the front padding holds no keys
    out = F.scaled_dot_product_attention(query_blocks, key_blocks.transpose(-1, -2),
                                         value_blocks.transpose(-1, -2), attn_mask=mask)
    return out.flatten(2, 3)[:, :, :length]


@dataclass(frozen=True)
class AttentionConfig:
    """The options of a model's softmax attention (its width and heads are the model's).

    ``window``: sliding-window length (each token sees itself and the ``window - 1`` tokens
    before it), or None for global attention. ``rope_base``: base of the rotary embedding's
    frequencies, > 1.
    """

    window: int | None = None
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.window is not None:
            check_int("window", self.window)
        check_number("rope_base", self.rope_base, 1, open_low=True)


class CausalSelfAttention(nn.Module):
    """Multi-head causal softmax attention with RoPE and a KV cache (``forward(x, state)``).

    ``window`` (optional) limits each token to itself and the ``window - 1`` tokens before it.
    """

    def __init__(self, dim: int, heads: int, window: int | None = None,
                 rope_base: float = 10000.0, init_std: float = 0.02,
                 out_init_std: float | None = None) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.heads = check_int("heads", heads)
        if dim % heads:
            raise invalid("heads", heads, f"a divisor of dim={dim}")
        if window is not None:
            check_int("window", window)
        self.window = window
        self.head_dim = dim // heads
        self.rotary = RotaryEmbedding(self.head_dim, rope_base)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.qkv.weight, std=init_std)
        nn.init.normal_(self.out.weight, std=init_std if out_init_std is None else out_init_std)

    def init_state(self, batch: int, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> AttentionState:
        """An empty cache at position 0."""
        weight = self.qkv.weight
        empty = torch.zeros(batch, self.heads, 0, self.head_dim,
                            device=device or weight.device, dtype=dtype or weight.dtype)
        return AttentionState(key=empty, value=empty.clone(), position=0)

    def _check_state(self, state: object, x: torch.Tensor) -> AttentionState:
        if not isinstance(state, AttentionState):
            raise invalid("state", type(state).__name__, "an AttentionState or None")
        expected = (x.shape[0], self.heads, self.head_dim)
        got = (state.key.shape[0], state.key.shape[1], state.key.shape[3])
        if state.key.dim() != 4 or got != expected or state.value.shape != state.key.shape:
            raise invalid("state.key.shape", tuple(state.key.shape),
                          f"[B, H, S, Dh] with B, H, Dh = {expected}")
        if state.key.dtype != x.dtype or state.key.device != x.device:
            raise invalid("state.key", f"{state.key.dtype} on {state.key.device}",
                          f"the dtype and device of x ({x.dtype} on {x.device})")
        return state

    def _mask(self, length: int, cached: int, device: torch.device) -> torch.Tensor | None:
        """Boolean [T, S + T] mask (True = attend) or None when no mask or plain causal
        suffices (no cache, or one new token that sees the whole cache)."""
        if self.window is None and (cached == 0 or length == 1):
            return None
        query_pos = torch.arange(length, device=device)[:, None] + cached
        key_pos = torch.arange(cached + length, device=device)[None, :]
        allowed = key_pos <= query_pos
        if self.window is not None:
            allowed = allowed & (query_pos - key_pos < self.window)
        return allowed

    def forward(self, x: torch.Tensor,
                state: AttentionState | None = None) -> tuple[torch.Tensor, AttentionState]:
        check_input(x, self.dim)
        batch, length, _ = x.shape
        state = (self.init_state(batch, device=x.device, dtype=x.dtype) if state is None
                 else state)
        state = self._check_state(state, x)
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).unbind(dim=2)
        q = self.rotary(q, state.position).transpose(1, 2)
        k = self.rotary(k, state.position).transpose(1, 2)
        v = v.transpose(1, 2)
        cached = state.key.shape[2]
        keys = torch.cat([state.key, k], dim=2) if cached else k
        values = torch.cat([state.value, v], dim=2) if cached else v
        if self.window is not None and length > self.window:
            out = banded_attention(q, keys, values, self.window)
        else:
            mask = self._mask(length, cached, x.device)
            if mask is None:
                out = F.scaled_dot_product_attention(q, keys, values, is_causal=cached == 0)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = self.out(out.transpose(1, 2).reshape(batch, length, self.dim))
        if self.window is not None:
            keep = self.window - 1
            keys = keys[:, :, keys.shape[2] - min(keep, keys.shape[2]):]
            values = values[:, :, values.shape[2] - min(keep, values.shape[2]):]
        return out, AttentionState(key=keys, value=values, position=state.position + length)


class TransformerBlock(nn.Module):
    """Pre-norm Transformer++ block: ``x + attn(norm(x))`` then ``x + swiglu(norm(x))``.

    Output projections start with std ``init_std / sqrt(2 * num_layers)`` (GPT-2 style) so the
    residual stream's variance does not grow with depth.
    """

    def __init__(self, dim: int, heads: int, mlp_hidden: int, window: int | None = None,
                 rope_base: float = 10000.0, norm_eps: float = 1e-6, init_std: float = 0.02,
                 num_layers: int = 1) -> None:
        super().__init__()
        check_int("num_layers", num_layers)
        out_std = init_std / math.sqrt(2 * num_layers)
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = CausalSelfAttention(dim, heads, window, rope_base, init_std, out_std)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden, init_std, out_std)

    def init_state(self, batch: int, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> AttentionState:
        return self.attn.init_state(batch, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor,
                state: AttentionState | None = None) -> tuple[torch.Tensor, AttentionState]:
        check_input(x, self.attn.dim, self.attn_norm.weight.dtype)
        mixed, state = self.attn(self.attn_norm(x), state)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state
