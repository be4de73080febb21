"""Titans long-term neural memory as a layer (PAPER.md section 4; Titans, arXiv 2501.00663).

x -> q, k, v projections -> depthwise causal conv (width 4) -> SiLU -> L2-normalized q, k ->
deep residual MLP memory per head, learned in context by gradient steps with data-dependent
learning rate eta_t, momentum theta_t and retention alpha_t (``nestlearn.ops.deep_memory``)
-> read-out o_t = M_t(q_t) -> per-head RMSNorm -> output gate SiLU(x W_g) -> output projection.
The memory's initial weights are ordinary parameters (meta-learned by the outer optimizer).
See MEMORY_LAYERS.md for the choices where the paper leaves room.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.errors import check_fraction, check_int, check_positive, invalid
from nestlearn.nn.conv import CausalDepthwiseConv
from nestlearn.nn.memory_stream import ChunkedMemoryState, empty_chunked_state, run_chunked_memory
from nestlearn.nn.transformer import RMSNorm, check_input
from nestlearn.ops.deep_memory import (
    DeepMemoryState,
    deep_memory,
    deep_memory_naive,
    init_deep_memory_weights,
)
from nestlearn.state import TreeState, state_dataclass, static_field

if TYPE_CHECKING:
    from nestlearn.nn.self_modifying import SelfModifyingTitansConfig

OBJECTIVES = ("l2", "dot")
ACTIVATIONS = ("gelu", "silu", "relu", "tanh")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise invalid(name, repr(value), " or ".join(repr(c) for c in choices))


def resolve_head_dim(dim: int, heads: int, head_dim: int | None) -> int:
    """Check a memory's width and heads; ``head_dim`` defaults to ``dim // heads``."""
    check_int("dim", dim, 1)
    check_int("heads", heads, 1)
    if head_dim is None:
        if dim % heads:
            raise invalid("heads", heads, f"a divisor of dim={dim}, or set head_dim")
        head_dim = dim // heads
    check_int("head_dim", head_dim, 1)
    return head_dim


def derived_eta_max(chunk_step: float, chunk_size: int, expansion: int,
                    theta_max: float | None) -> float:
    """The per-token ceiling of eta_t that bounds a whole chunk's step (MEMORY_LAYERS.md).

    All gradients of a chunk are taken at its starting weights, so a chunk applies the sum of
    its tokens' steps at once; momentum multiplies each step by up to 1 / (1 - theta_max); the
    output matrix's curvature at unit-norm keys is ||s(W_1 k)||^2 <= ||W_1 k||^2, about
    ``expansion`` at initialization (|s(z)| <= |z| for every activation offered). Dividing
    ``chunk_step`` by these three factors makes ``chunk_step`` the largest fraction of the
    error a chunk of identical keys can remove in that worst case (< 2 is stable, 1 exact).
    """
    momentum_gain = 1.0 if theta_max is None else 1.0 / (1.0 - theta_max)
    return chunk_step / (chunk_size * expansion * momentum_gain)


def check_gate_options(config: NeuralMemoryConfig | SelfModifyingTitansConfig) -> None:
    """The gate options both memory configs share: ``chunk_step`` > 0, the caps and initial
    values fractions in (0, 1), and the momentum gate starting below its cap."""
    check_positive("chunk_step", config.chunk_step)
    for name in ("theta_max", "eta_init", "theta_init", "forget_init"):
        check_fraction(name, getattr(config, name))
    if not config.theta_init < config.theta_max:
        raise invalid("theta_init", config.theta_init,
                      f"a number below theta_max={config.theta_max}")


def logit(p: float) -> float:
    """sigmoid^-1(p)."""
    return math.log(p / (1.0 - p))


def capped_logit(raw: torch.Tensor, maximum: float) -> torch.Tensor:
    """A soft cap of a gate logit: sigmoid of the result stays below ``maximum`` < 1.

    c - softplus(c - raw) with c = logit(maximum) is < c for every raw and ~raw for raw << c,
    so gradients keep flowing near the cap (unlike a hard clamp).
    """
    cap = logit(maximum)
    return cap - F.softplus(cap - raw)


def capped_logit_inverse(value: float, maximum: float) -> float:
    """The raw logit z with sigmoid(capped_logit(z, maximum)) = value (< maximum)."""
    cap = logit(maximum)
    return cap - math.log(math.expm1(cap - logit(value)))


class CappedLinear(nn.Linear):
    """A linear gate-logit projection whose sigmoid never exceeds ``maximum`` (``capped_logit``).

    The momentum gate theta_t = sigmoid(CappedLinear(x)) < theta_max bounds the momentum's
    amplification 1 / (1 - theta) of the inner steps.
    """

    def __init__(self, in_features: int, out_features: int, maximum: float) -> None:
        super().__init__(in_features, out_features)
        check_fraction("theta_max", maximum)
        self.maximum = maximum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return capped_logit(super().forward(x), self.maximum)


@dataclass
class NeuralMemoryConfig:
    """Configuration of :class:`NeuralMemory`.

    Attributes:
        dim: model width D of the input and output.
        heads: number of independent memories H.
        head_dim: width of each memory (default ``dim // heads``).
        depth: matrices in each memory MLP, >= 2 (M(x) = x + W_L s(... s(W_1 x)))).
        expansion: hidden width of the memory MLP as a multiple of ``head_dim``.
        chunk_size: tokens whose gradients are taken at the same (chunk-start) memory state.
        momentum: use the surprise momentum S_t (theta_t gate); off = plain gradient steps.
        weight_decay: use the forgetting gate (retention alpha_t = 1 - forget_t); off = alpha 1.
        objective: inner loss, ``"l2"`` 1/2 ||M(k) - v||^2 or ``"dot"`` -<M(k), v>.
        activation: the memory MLP's non-linearity.
        conv: depthwise causal convolution after the q/k/v projections.
        conv_width: its width (4 in the paper).
        persistent_tokens: learnable tokens fed to the memory once, at the start of a stream.
        eta_max: the learning-rate gate is eta_t = eta_max * sigmoid(x W_eta + b). None
            (default): derived from ``chunk_step`` (``derived_eta_max``), so the bound on a
            whole chunk's step holds whatever the chunk size, memory width and momentum cap.
            The resolved number is stored here.
        chunk_step: the largest fraction of the error a chunk of identical unit keys can remove
            with eta and theta at their maxima (only used to derive ``eta_max``).
        theta_max: soft cap of the momentum gate (theta_t < theta_max), bounding the momentum's
            amplification 1 / (1 - theta_t) of the steps.
        normalize_values: L2-normalize each head of the values v, like the keys: the memory
            then maps unit vectors to unit vectors and its weights keep the scale they start
            with, whatever the input's scale.
        eta_init, theta_init, forget_init: the gates' values at initialization (as fractions:
            eta_t / eta_max, theta_t, forget_t = 1 - alpha_t), set through the biases.
        dgd: delta gradient descent (the (alpha I - eta k k^T) factor of HOPE) in the update.
        use_naive: run the per-token reference op instead of the chunkwise one (for tests).
    """

    dim: int
    heads: int = 1
    head_dim: int | None = None
    depth: int = 2
    expansion: int = 4
    chunk_size: int = 64
    momentum: bool = True
    weight_decay: bool = True
    objective: str = "l2"
    activation: str = "gelu"
    conv: bool = True
    conv_width: int = 4
    persistent_tokens: int = 0
    eta_max: float | None = None
    chunk_step: float = 1.0
    theta_max: float = 0.9
    normalize_values: bool = True
    eta_init: float = 0.5
    theta_init: float = 0.5
    forget_init: float = 0.0001
    dgd: bool = False
    use_naive: bool = False

    def __post_init__(self) -> None:
        self.head_dim = resolve_head_dim(self.dim, self.heads, self.head_dim)
        check_int("depth", self.depth, 2)
        check_int("expansion", self.expansion, 1)
        check_int("chunk_size", self.chunk_size, 1)
        check_int("conv_width", self.conv_width, 1)
        check_int("persistent_tokens", self.persistent_tokens, 0)
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_gate_options(self)
        if self.eta_max is None:
            self.eta_max = derived_eta_max(self.chunk_step, self.chunk_size, self.expansion,
                                           self.theta_max if self.momentum else None)
        check_positive("eta_max", self.eta_max)
        for name in ("momentum", "weight_decay", "conv", "dgd", "use_naive",
                     "normalize_values"):
            if not isinstance(getattr(self, name), bool):
                raise invalid(name, repr(getattr(self, name)), "True or False")

    @property
    def hidden(self) -> int:
        return self.expansion * self.head_dim


@state_dataclass
class NeuralMemoryState(TreeState):
    """Stream state of :class:`NeuralMemory`.

    ``memory`` is the memory at the start of the current chunk with the pending tokens of that
    chunk (see ``nestlearn.nn.memory_stream``); ``conv_tail`` the last ``conv_width - 1``
    projections (None without conv); ``position`` the number of input tokens seen.
    """

    memory: ChunkedMemoryState
    conv_tail: torch.Tensor | None
    position: int = static_field()


class HeadRMSNorm(RMSNorm):
    """RMSNorm over the last dim of ``[..., H, D]`` with a learned gain per head and channel."""

    def __init__(self, heads: int, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps)
        self.weight = nn.Parameter(torch.ones(check_int("heads", heads), dim))


def check_tail(tail: torch.Tensor | None, conv: CausalDepthwiseConv | None, batch: int) -> None:
    """A state's conv tail fits the layer's convolution (None when it has none)."""
    if conv is None:
        if tail is not None:
            raise invalid("state.conv_tail", "a tensor", "None (this layer has no conv)")
        return
    shape = (batch, conv.width - 1, conv.channels)
    if not isinstance(tail, torch.Tensor) or tuple(tail.shape) != shape:
        got = tuple(tail.shape) if isinstance(tail, torch.Tensor) else type(tail).__name__
        raise invalid("state.conv_tail.shape", got, f"{shape}")


class NeuralMemory(nn.Module):
    """Titans long-term memory layer: ``forward(x [B, T, D], state) -> (y [B, T, D], state)``."""

    def __init__(self, config: NeuralMemoryConfig) -> None:
        super().__init__()
        if not isinstance(config, NeuralMemoryConfig):
            raise invalid("config", type(config).__name__, "a NeuralMemoryConfig")
        self.config = config
        c = config
        inner = c.heads * c.head_dim
        self.qkv = nn.Linear(c.dim, 3 * inner, bias=False)
        self.conv = CausalDepthwiseConv(3 * inner, c.conv_width) if c.conv else None
        # One projection gives the three gate logits per head: eta, theta, forget.
        self.gates = nn.Linear(c.dim, 3 * c.heads)
        self.out_gate = nn.Linear(c.dim, inner, bias=False)
        self.norm = HeadRMSNorm(c.heads, c.head_dim)
        self.out = nn.Linear(inner, c.dim, bias=False)
        initial = init_deep_memory_weights(c.heads, c.head_dim, c.hidden, c.depth)
        self.memory_weights = nn.ParameterList([nn.Parameter(w.clone()) for w in initial])
        self.persistent = (nn.Parameter(torch.randn(c.persistent_tokens, c.dim) * 0.02)
                           if c.persistent_tokens else None)
        with torch.no_grad():
            # The gates start at eta_init * eta_max, theta_init and forget_init (sigmoid^-1).
            bias = self.gates.bias.view(3, c.heads)
            bias[0].fill_(logit(c.eta_init))
            bias[1].fill_(capped_logit_inverse(c.theta_init, c.theta_max))
            bias[2].fill_(logit(c.forget_init))

    def init_state(self, batch: int, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> NeuralMemoryState:
        """The state of an empty stream (the meta-learned initial memory, no pending tokens)."""
        check_int("batch", batch, 1)
        c = self.config
        like = self.memory_weights[0]
        like = like.new_zeros(()).to(device=device or like.device, dtype=dtype or like.dtype)
        memory = DeepMemoryState(tuple(self.memory_weights), None)
        chunked = empty_chunked_state(memory, batch, c.heads, c.head_dim, c.momentum, like)
        tail = (self.conv.init_tail(batch, device=like.device, dtype=like.dtype)
                if self.conv is not None else None)
        return NeuralMemoryState(chunked, tail, 0)

    def gate_values(self, x: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(alpha, eta, theta)`` per token and head, each ``[B, T, H]``, in their ranges.

        eta in (0, eta_max), theta in (0, theta_max) (None without momentum), alpha = 1 - forget in
        (0, 1) (exactly 1 without weight decay).
        """
        c = self.config
        logits = self.gates(x).unflatten(-1, (3, c.heads))
        eta = c.eta_max * torch.sigmoid(logits[..., 0, :])
        theta = (torch.sigmoid(capped_logit(logits[..., 1, :], c.theta_max))
                 if c.momentum else None)
        # alpha = 1 - sigmoid(forget logit), written as sigmoid(-logit) to avoid cancellation
        alpha = torch.sigmoid(-logits[..., 2, :]) if c.weight_decay else torch.ones_like(eta)
        return alpha, eta, theta

    def forward(self, x: torch.Tensor, state: NeuralMemoryState | None = None
                ) -> tuple[torch.Tensor, NeuralMemoryState]:
        c = self.config
        x = check_input(x, c.dim, self.qkv.weight.dtype)
        batch, length, _ = x.shape
        if state is None:
            state = self.init_state(batch, device=x.device, dtype=x.dtype)
        elif not isinstance(state, NeuralMemoryState):
            raise invalid("state", type(state).__name__, "a NeuralMemoryState or None")
        state.memory.check("state.memory", batch, c.heads, c.head_dim, x.dtype, c.chunk_size,
                           c.momentum)
        check_tail(state.conv_tail, self.conv, batch)
        stream = x
        if self.persistent is not None and state.position == 0:
            # Persistent memory: learnable tokens the memory reads once, before the stream.
            prefix = self.persistent.to(x.dtype).unsqueeze(0).expand(batch, -1, -1)
            stream = torch.cat([prefix, x], 1)
        projected = self.qkv(stream)
        tail = state.conv_tail
        if self.conv is not None:
            projected, tail = self.conv(projected, tail)
        q, k, v = F.silu(projected).unflatten(-1, (3, c.heads, c.head_dim)).unbind(2)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        if c.normalize_values:
            v = F.normalize(v, dim=-1)
        alpha, eta, theta = self.gate_values(stream)
        op = deep_memory_naive if c.use_naive else deep_memory
        o, memory = run_chunked_memory(op, state.memory, q, k, v, alpha, eta, theta,
                                       chunk_size=c.chunk_size, objective=c.objective,
                                       activation=c.activation, dgd=c.dgd)
        o = self.norm(o[:, o.shape[1] - length:]).flatten(2)
        y = self.out(o * F.silu(self.out_gate(x)))
        return y, NeuralMemoryState(memory, tail, state.position + length)
