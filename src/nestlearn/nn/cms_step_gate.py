"""The CMS step ceiling's per-token gate as one autograd node with a written backward.

Per token t of a level's piece (CMS.md, "Step ceiling"; ``cms.token_curvature`` is the plain
form and the reference):

    kappa_t = ||h_t||^2 + ||n_t||^2 sum_i s_{t,i} c_i,   s_{t,i} = sum_k d^{(k)}_{t,i}^2,
    c_i = ||w_down[:, i]||^2,                             gate_t = b / max(kappa_t, b),

with h the hidden activations, n the level's input, d^{(k)} the hidden units' derivatives
(one for gelu, two for swiglu) and b the level's budget. Every level computes it for every
piece, forward and backward, and autograd of the plain form records about forty small ops
per piece for what is a few fused passes by hand. With G = dL/dgate and
k_t = -G_t gate_t / kappa_t where kappa_t >= b (the clamp passes the gradient there), else 0:

    dL/dh_t = 2 k_t h_t,      dL/dn_t = 2 k_t (s_t . c) n_t,
    dL/dd^{(k)}_{t,i} = 2 k_t ||n_t||^2 c_i d^{(k)}_{t,i},
    dL/dc_i = sum_t k_t ||n_t||^2 s_{t,i},      dL/dw_down[:, i] = 2 (dL/dc_i) w_down[:, i].

``tests/test_nn_cms_step_gate.py`` ties values and gradients to the plain form in float64.
"""

from __future__ import annotations

from typing import Any

import torch

from nestlearn.errors import invalid
from nestlearn.ops._first_order import check_first_order


def sum_squares(x: torch.Tensor) -> torch.Tensor:
    """``x.square().sum(-1)`` as one batched dot product."""
    return (x[..., None, :] @ x[..., :, None])[..., 0, 0]


def _slopes(derivatives: tuple[torch.Tensor, ...]) -> torch.Tensor:
    slopes = derivatives[0].square()
    for extra in derivatives[1:]:
        slopes = torch.addcmul(slopes, extra, extra)
    return slopes


def curvature_parts(hidden: torch.Tensor, n: torch.Tensor, w_down: torch.Tensor,
                    derivatives: tuple[torch.Tensor, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    """kappa_t ``[B, P]`` and the parts its gradient reads: ``(s, c, s . c, ||n||^2, kappa)``
    (``cms.token_curvature`` is its differentiable use, the gate node its other)."""
    slopes = _slopes(derivatives)
    columns = w_down.square().sum(-2)  # ||w_down[:, i]||^2: [H] (shared weights) or [B, H]
    # Sums over the last axis as matmuls (one kernel each, where square and sum are two).
    weighted = (slopes @ columns if columns.dim() == 1
                else (slopes @ columns[:, :, None])[..., 0])
    input_squares = sum_squares(n)
    kappa = torch.addcmul(sum_squares(hidden), input_squares, weighted)
    return slopes, columns, weighted, input_squares, kappa


class _StepGate(torch.autograd.Function):
    """``(hidden, n, w_down, derivative, second derivative or None, budget) -> gate [B, P, 1]``.
    A fixed signature (no ``*args``): torch.compile's tracing of a Function misplaced a
    leading float before variadic tensors. Reverse mode, first order only."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, n: torch.Tensor, w_down: torch.Tensor,
                first: torch.Tensor, second: torch.Tensor | None, budget: float
                ) -> torch.Tensor:
        derivatives = (first,) if second is None else (first, second)
        slopes, columns, weighted, input_squares, kappa = curvature_parts(hidden, n, w_down,
                                                                          derivatives)
        clamped = kappa.clamp_min(budget)
        gate = budget / clamped
        ctx.save_for_backward(hidden, n, w_down, slopes, columns, weighted, input_squares,
                              kappa, gate, *derivatives)
        ctx.budget = budget
        return gate[..., None]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        check_first_order("the CMS step gate")
        (hidden, n, w_down, slopes, columns, weighted, input_squares, kappa, gate,
         *derivatives) = ctx.saved_tensors
        need = ctx.needs_input_grad
        # dL/dkappa, doubled (every term below is a square's derivative): 2 k_t
        twice = torch.where(kappa >= ctx.budget, grad[..., 0] * gate / kappa * -2.0, 0.0)
        grads: list[torch.Tensor | None] = [None] * 6
        if need[0]:
            grads[0] = hidden * twice[..., None]
        if need[1]:
            grads[1] = n * (twice * weighted)[..., None]
        scaled = twice * input_squares  # 2 k_t ||n_t||^2
        if need[2]:
            # dL/dc_i = sum_t k_t ||n_t||^2 s_{t,i}; w_down's is 2 w_down dL/dc
            if columns.dim() == 1:
                column_grad = scaled.flatten() @ slopes.flatten(0, -2)
            else:
                column_grad = (scaled[:, None, :] @ slopes)[:, 0]
            grads[2] = w_down * column_grad[..., None, :]
        if need[3] or need[4]:
            spread = scaled[..., None] * (columns if columns.dim() == 1 else columns[:, None])
            for index, derivative in enumerate(derivatives):
                if need[3 + index]:
                    grads[3 + index] = derivative * spread
        return tuple(grads)


def step_gate_factor(budget: float, hidden: torch.Tensor, n: torch.Tensor,
                     w_down: torch.Tensor, derivatives: tuple[torch.Tensor, ...]
                     ) -> torch.Tensor:
    """``[B, P, 1]``: ``budget / max(kappa_t, budget)`` per token (``hidden [B, P, H]``,
    ``n [B, P, D]``, ``w_down`` ``[D, H]`` or ``[B, D, H]``, ``derivatives`` each like
    ``hidden``)."""
    if len(derivatives) not in (1, 2):
        raise invalid("derivatives", f"{len(derivatives)} tensors", "1 (gelu) or 2 (swiglu)")
    second = derivatives[1] if len(derivatives) == 2 else None
    return _StepGate.apply(hidden, n, w_down, derivatives[0], second, budget)
