"""What the two memory layers share (Titans ``titans.py``, self-modifying Titans
``self_modifying.py``): width and gate options, the soft-capped momentum gate, the per-head
output norm and the conv-tail check of a stream state. See MEMORY_LAYERS.md.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.errors import check_fraction, check_int, check_positive, invalid
from nestlearn.nn.conv import CausalDepthwiseConv
from nestlearn.nn.transformer import RMSNorm

OBJECTIVES = ("l2", "dot")
ACTIVATIONS = ("gelu", "silu", "relu", "tanh")


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
