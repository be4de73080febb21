"""L2 normalization of the last dim with a written backward: ``F.normalize``'s values, fewer ops.

The self-modifying layer normalizes its keys (and values) once per inner chunk, inside the
chunk loop, so every op of the normalization and of its backward runs once per chunk, per
memory, per block. Autograd of ``x / max(||x||, eps)`` records about thirteen ops in the
backward (the division's two sides, the clamp's mask, the norm's own backward); written out,
the gradient takes five:

    y = x / d,  d = max(||x||, eps):   dL/dx = (g - [||x|| >= eps] y <y, g>) / d,

the bracket being the clamp's gradient mask (torch's ``clamp_min`` passes the gradient where
the input is >= the bound). ``tests/test_nn_unit_norm.py`` ties values and gradients to
``F.normalize`` in float64, zero rows and rows at the bound included.
"""

from __future__ import annotations

from typing import Any

import torch

from nestlearn.ops._first_order import check_first_order

# F.normalize's default
EPS = 1e-12


class _UnitNorm(torch.autograd.Function):
    """``(x, eps) -> x / max(||x||, eps)`` with the backward above. Reverse mode, first order
    only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, eps: float) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        denominator = norm.clamp_min(eps)
        y = x / denominator
        ctx.save_for_backward(y, denominator, norm >= eps)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        check_first_order("unit_normalize")
        y, denominator, through_norm = ctx.saved_tensors
        along = (y * grad).sum(-1, keepdim=True) * through_norm
        return torch.addcmul(grad, y, along, value=-1.0) / denominator, None


def unit_normalize(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``x / max(||x||_2, eps)`` over the last dim: ``torch.nn.functional.normalize(x, dim=-1)``
    with a backward of a few fused ops (reverse mode only). Where no gradient is recorded
    (decoding, evaluation) the same three ops run without the node and its saved mask."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)
    return _UnitNorm.apply(x, eps)
