"""The MLP of one CMS level as pure functions of explicit (fast) weights.

A CMS level keeps its weights in the layer state, one copy per batch element once it has
changed in context, so the MLP is written here as functions of a weight tuple rather than as an
``nn.Module``. Weights are ``[out, in]`` (shared by the batch: the meta-learned parameters
before any update) or ``[B, out, in]`` (per batch element).

Two kinds (both bias-free, so a Transformer++ MLP can be loaded as a level):
- ``"swiglu"``: weights ``(w_gate [H, D], w_up [H, D], w_down [D, H])``,
  ``mlp(n) = w_down (silu(w_gate n) * (w_up n))`` (the Transformer++ MLP);
- ``"gelu"``: weights ``(w_in [H, D], w_out [D, H])``, ``mlp(n) = w_out gelu(w_in n)`` (exact
  erf GELU); with the level's residual this is the paper's residual 2-layer MLP.

``level_grad_factors`` with ``outer_sum`` gives the exact gradient, summed over the tokens of
a piece, of ``sum_t 1/2 ||mlp(n_t) - v_t||^2`` given the error ``e_t = mlp(n_t) - v_t``:
every per-token gradient of a linear map is a rank-1 outer product (error x input), so the sum
over the piece is one matmul per weight (docs/paper.md section 3: a chunk's tokens have no
sequential dependency).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nestlearn.ops._deep_memory_common import activation_slope

MLP_KINDS = ("swiglu", "gelu")


def weight_shapes(kind: str, dim: int, hidden: int) -> tuple[tuple[int, int], ...]:
    """Shapes ``[out, in]`` of the weight tuple of one level (input side first)."""
    if kind == "swiglu":
        return ((hidden, dim), (hidden, dim), (dim, hidden))
    return ((hidden, dim), (dim, hidden))


def weight_names(kind: str) -> tuple[str, ...]:
    """Parameter names matching ``weight_shapes``."""
    if kind == "swiglu":
        return ("w_gate", "w_up", "w_down")
    return ("w_in", "w_out")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [B, P, in]`` times a shared ``[out, in]`` or per-batch ``[B, out, in]`` weight."""
    if weight.dim() == 2:
        return F.linear(x, weight)
    return torch.matmul(x, weight.transpose(-1, -2))


def level_forward(kind: str, weights: tuple[torch.Tensor, ...],
                  n: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``mlp(n)`` for ``n [B, P, D]``; also returns the activations ``level_grad_factors``
    needs."""
    if kind == "swiglu":
        w_gate, w_up, w_down = weights
        gate = linear(n, w_gate)
        up = linear(n, w_up)
        hidden = F.silu(gate) * up
        return linear(hidden, w_down), (gate, up, hidden)
    w_in, w_out = weights
    pre = linear(n, w_in)
    hidden = F.gelu(pre)
    return linear(hidden, w_out), (pre, hidden)


def outer_sum(error: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``sum_t error_t inputs_t^T`` per batch element: ``[B, P, out], [B, P, in]`` to
    ``[B, out, in]``."""
    return torch.matmul(error.transpose(1, 2), inputs)


def level_derivatives(kind: str, activations: tuple[torch.Tensor, ...]
                      ) -> tuple[torch.Tensor, ...]:
    """The hidden units' derivatives that the step ceiling (``cms.step_gate``) and the
    gradient (``level_grad_factors``) both read, made once for both: swiglu
    ``(silu(gate), up * silu'(gate))`` (d hidden / d up and d hidden / d gate), gelu
    ``(gelu'(pre),)``."""
    if kind == "swiglu":
        gate, up, _ = activations
        return F.silu(gate), up * activation_slope(gate, "silu")
    return (activation_slope(activations[0], "gelu"),)


def level_grad_factors(kind: str, weights: tuple[torch.Tensor, ...], n: torch.Tensor,
                       activations: tuple[torch.Tensor, ...], error: torch.Tensor,
                       derivatives: tuple[torch.Tensor, ...] | None = None
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Rank-1 factors of the per-token gradients of ``1/2 ||mlp(n_t) - v_t||^2``.

    ``error`` is ``mlp(n) - v`` ``[B, P, D]``. For each weight, ``(left [B, P, out],
    right [B, P, in])`` with gradient ``sum_t left_t right_t^T`` (see ``outer_sum``); factors of
    several pieces of one chunk can be concatenated along P and summed in one matmul.
    Differentiable (plain tensor ops), so outer gradients flow through the in-context update.
    ``derivatives``: ``level_derivatives(kind, activations)`` if already made.
    """
    if derivatives is None:
        derivatives = level_derivatives(kind, activations)
    if kind == "swiglu":
        _, _, w_down = weights
        hidden = activations[2]
        silu_gate, up_slope = derivatives
        d_hidden = linear_transpose(error, w_down)
        return (d_hidden * up_slope, n), (d_hidden * silu_gate, n), (error, hidden)
    _, w_out = weights
    hidden = activations[1]
    d_pre = linear_transpose(error, w_out) * derivatives[0]
    return (d_pre, n), (error, hidden)


def linear_transpose(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [B, P, out]`` times ``weight`` (``[out, in]`` or ``[B, out, in]``): the backward of
    ``linear``."""
    return torch.matmul(x, weight)


def init_level_weights(kind: str, dim: int, hidden: int, init_std: float,
                       out_init_std: float) -> tuple[torch.Tensor, ...]:
    """Normal initial weights (input side ``init_std``, output side ``out_init_std``)."""
    shapes = weight_shapes(kind, dim, hidden)
    stds = [init_std] * (len(shapes) - 1) + [out_init_std]
    return tuple(torch.randn(shape) * std for shape, std in zip(shapes, stds, strict=True))
