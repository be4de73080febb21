"""What the two memory layers share (Titans ``titans.py``, self-modifying Titans
``self_modifying.py``): width and gate options, the soft-capped momentum gate, the per-head
output norm and the conv-tail check of a stream state. See MEMORY_LAYERS.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.errors import check_fraction, check_int, check_positive, invalid
from nestlearn.nn.conv import CausalDepthwiseConv
from nestlearn.nn.memory_stream import ChunkedMemoryState, MemoryOp, ValueMap, run_chunked_memory
from nestlearn.nn.transformer import RMSNorm
from nestlearn.ops.deep_memory import deep_memory_apply

OBJECTIVES = ("l2", "dot")
ACTIVATIONS = ("gelu", "silu", "relu", "tanh")
# When a token reads the memory: after its own update, o_t = M_t(q_t) (the ops' convention), or
# with the memory as it was at the start of the token's chunk, o_t = M_{t'}(q_t) (the
# dual-form reading of "the state at the end of the previous chunk", Eq. 90; docs/paper.md 5).
READOUTS = ("after_update", "chunk_start")


class MemoryInputs(NamedTuple):
    """What a memory layer hands its main memory: queries, keys, values ``[B, T, H, D]`` and
    the gates ``[B, T, H]`` (retention alpha, learning rate eta, momentum theta or None)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    alpha: torch.Tensor
    eta: torch.Tensor
    theta: torch.Tensor | None


class GateOptions(Protocol):
    """The gate fields both memory configs carry (``NeuralMemoryConfig``,
    ``SelfModifyingTitansConfig``)."""

    chunk_step: float
    theta_max: float
    eta_init: float
    theta_init: float
    forget_init: float


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


def check_gate_options(config: GateOptions) -> None:
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


def run_memory(op: MemoryOp, state: ChunkedMemoryState, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, alpha: torch.Tensor, eta: torch.Tensor,
               theta: torch.Tensor | None, *, chunk_size: int, readout: str, activation: str,
               value_map: ValueMap | None = None, token_step: bool = True,
               **op_kwargs: object) -> tuple[torch.Tensor, ChunkedMemoryState]:
    """``run_chunked_memory`` with the read-out time ``readout`` (``READOUTS``).

    ``"chunk_start"`` reads each token with the memory at the start of its chunk (Eq. 90):
    the stream is cut at chunk boundaries, each piece is read by ``deep_memory_apply`` from
    the piece's chunk-start weights and written by ``op`` (whose own outputs are dropped), so
    the memory's trajectory is the same as with ``"after_update"``. ``token_step``: as in
    ``run_chunked_memory`` (False for a piece of a longer segment).
    """
    token_step = token_step and k.shape[1] == 1
    if readout == "after_update":
        return run_chunked_memory(op, state, q, k, v, alpha, eta, theta, chunk_size=chunk_size,
                                  value_map=value_map, token_step=token_step,
                                  activation=activation, **op_kwargs)
    outputs = []
    start = 0
    while start < k.shape[1]:
        stop = min(k.shape[1], start + chunk_size - state.pending)
        piece = slice(start, stop)
        outputs.append(deep_memory_apply(state.chunk_start.weights, q[:, piece],
                                         activation=activation))
        _, state = run_chunked_memory(
            op, state, q[:, piece], k[:, piece], v[:, piece], alpha[:, piece], eta[:, piece],
            None if theta is None else theta[:, piece], chunk_size=chunk_size,
            value_map=value_map, token_step=token_step, activation=activation, **op_kwargs)
        start = stop
    return torch.cat(outputs, 1), state
