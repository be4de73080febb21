"""Unit lower-triangular solves as an explicit inverse and one product, with a written backward.

The DGD pseudo-values (``deep_memory``) and the gated delta rule's writes (``delta_rule``) solve
``(I + N) X = R`` per chunk, N strictly lower triangular (C x C) and R with many more columns
than rows (C x D, D up to 10 C). ``torch.linalg.solve_triangular(..., unitriangular=True)`` runs
forward substitution across all D columns, and its backward runs a second such solve. Here the
inverse comes from forward substitution on the identity (C columns, not D), and the solution
is one batched product ``(I + N)^-1 R``; the backward is two products:

    dR = (I + N)^-T G,     dN = -tril(dR X^T, -1)

(only the strictly lower entries of the system are read, so only they get a gradient, as with
``unitriangular=True``). The same transform (the "UT transform" of DeltaNet) is how the
linear-attention field runs these solves. ``tests/test_ops_unit_triangular.py`` ties values and
gradients to ``torch.linalg.solve_triangular`` in float64; ``nestlearn bench`` timings in
BENCHMARKS.md, "Faster triangular solves".
"""

from __future__ import annotations

from typing import Any

import torch

from nestlearn.ops._first_order import check_first_order


class _UnitLowerSolve(torch.autograd.Function):
    """``(system, rhs) -> (I + strict_lower(system))^-1 rhs``; reverse mode, first order."""

    @staticmethod
    def forward(ctx: Any, system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        identity = torch.eye(system.shape[-1], dtype=system.dtype, device=system.device)
        inverse = torch.linalg.solve_triangular(system, identity, upper=False,
                                                unitriangular=True)
        solution = inverse @ rhs
        ctx.save_for_backward(inverse, solution)
        ctx.shapes = (system.shape, rhs.shape)
        return solution

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        check_first_order("unit_lower_solve")
        inverse, solution = ctx.saved_tensors
        system_shape, rhs_shape = ctx.shapes
        grad_rhs = inverse.transpose(-1, -2) @ grad
        grad_system = None
        if ctx.needs_input_grad[0]:
            grad_system = torch.tril(grad_rhs @ solution.transpose(-1, -2), -1).neg_()
            grad_system = grad_system.sum_to_size(system_shape)
        if not ctx.needs_input_grad[1]:
            return grad_system, None
        return grad_system, grad_rhs.sum_to_size(rhs_shape)


def unit_lower_solve(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``X`` with ``(I + N) X = rhs``, N the strictly lower part of ``system`` ``[..., C, C]``
    (its diagonal and upper part are not read): the values of
    ``torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)``, computed as
    an explicit inverse times ``rhs`` ``[..., C, D]``, with a backward of two products."""
    return _UnitLowerSolve.apply(system, rhs)
