"""Muon: momentum whose output passes through Newton-Schulz orthogonalization.

docs/paper.md section 2: W_{i+1} = W_i + sigma(m_{i+1}(u_i)) with a linear memory m (momentum) and
sigma = Newton-Schulz orthogonalization is Muon. The iteration maps a matrix U S V^T to about
U V^T (all singular values pushed near 1) with matmuls only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from nestlearn.errors import check_bool, check_choice, check_decay, check_int, invalid
from nestlearn.optim._base import (
    NestedOptimizer,
    as_matrix,
    decay_weights,
)

# Odd polynomial p(x) = a x + b x^3 + c x^5 applied to the singular values.
# "quintic": the tuned coefficients of Muon (fast: 5 steps bring singular values into about
# [0.7, 1.2] rather than exactly 1). "cubic": the classical (3x - x^3) / 2, which converges to
# exactly 1 but needs more steps.
NS_COEFFICIENTS: dict[str, tuple[float, float, float]] = {
    "quintic": (3.4445, -4.7750, 2.0315),
    "cubic": (1.5, -0.5, 0.0),
}


def newton_schulz(matrix: torch.Tensor, steps: int = 5, coefficients: str = "quintic",
                  eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonalization ``U S V^T -> U V^T`` of the last two dims of ``matrix``.

    The input is scaled to Frobenius norm 1 (so every singular value is <= 1, inside the
    iteration's basin) and iterated ``steps`` times with ``X <- a X + (b A + c A^2) X``,
    ``A = X X^T``, on the wide orientation (fewer rows than columns) for cheaper products.
    Works in the input's dtype; zero rows/columns stay zero.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() < 2:
        raise invalid("matrix", getattr(matrix, "shape", type(matrix).__name__),
                      "a tensor with at least 2 dims")
    check_int("steps", steps, 0)
    a, b, c = NS_COEFFICIENTS[check_choice("coefficients", coefficients, NS_COEFFICIENTS)]
    tall = matrix.shape[-2] > matrix.shape[-1]
    x = matrix.mT if tall else matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


def shape_scale(rows: int, cols: int) -> float:
    """sqrt(max(1, rows / cols)): keeps the per-element update size of tall matrices."""
    return max(1.0, rows / cols) ** 0.5


class Muon(NestedOptimizer):
    """Muon: ``buf <- mu buf + g;  W <- W - lr * s * NS(u)``, u = g + mu buf (Nesterov) or buf.

    ``s = sqrt(max(1, rows / cols))`` when ``scale_by_shape``. Conv kernels are orthogonalized
    as [out, in * k * k] matrices. Parameters with fewer than 2 dims use the AdamW fallback.

    Args:
        params: parameters or param groups.
        lr: learning rate (>= 0).
        momentum: ``mu`` in [0, 1).
        nesterov: use the Nesterov look-ahead ``g + mu buf``.
        ns_steps: Newton-Schulz iterations (>= 1).
        ns_coefficients: ``"quintic"`` (default) or ``"cubic"`` (see ``newton_schulz``).
        scale_by_shape: multiply by sqrt(max(1, rows / cols)).
        weight_decay: decoupled weight decay.
        fallback, fallback_lr, fallback_betas, fallback_eps: see ``NestedOptimizer``.
    """

    matrix_rule = True

    def __init__(self, params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_coefficients: str = "quintic",
                 scale_by_shape: bool = True, weight_decay: float = 0.0, fallback: str = "auto",
                 fallback_lr: float = 1e-3, fallback_betas: tuple[float, float] = (0.9, 0.999),
                 fallback_eps: float = 1e-8) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_coefficients=ns_coefficients, scale_by_shape=scale_by_shape,
                        weight_decay=weight_decay, fallback=fallback, fallback_lr=fallback_lr,
                        fallback_betas=fallback_betas, fallback_eps=fallback_eps)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_decay("momentum", group["momentum"])
        check_int("ns_steps", group["ns_steps"], 1)
        check_choice("ns_coefficients", group["ns_coefficients"], NS_COEFFICIENTS)
        for flag in ("nesterov", "scale_by_shape"):
            check_bool(flag, group[flag])

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                group: dict[str, Any]) -> None:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer = state["momentum_buffer"]
        buffer.mul_(group["momentum"]).add_(grad)
        direction = grad.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
        matrix = as_matrix(direction)
        update = newton_schulz(matrix, group["ns_steps"], group["ns_coefficients"])
        scale = shape_scale(*matrix.shape) if group["scale_by_shape"] else 1.0
        decay_weights(param, group)
        param.add_(update.reshape(param.shape), alpha=-group["lr"] * scale)
