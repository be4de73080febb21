"""``unit_lower_solve`` equals ``torch.linalg.solve_triangular(..., unitriangular=True)`` in
values and gradients (float64), reads only the strictly lower part, and refuses a double
backward."""

from __future__ import annotations

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.ops._unit_triangular import unit_lower_solve


def reference(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)


def case(batch: tuple[int, ...], size: int, columns: int, seed: int = 0
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A DGD-like system (scaled Gram of unit keys, with garbage on and above the diagonal,
    which neither solve may read), a right-hand side and an output gradient."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(
        torch.randn(*batch, size, 8, generator=generator, dtype=torch.float64), dim=-1)
    rates = torch.rand(*batch, size, 1, generator=generator, dtype=torch.float64)
    system = rates * (keys @ keys.transpose(-1, -2))
    system = system + 5.0 * torch.randn(size, size, generator=generator,
                                        dtype=torch.float64).triu()
    rhs = torch.randn(*batch, size, columns, generator=generator, dtype=torch.float64)
    grad = torch.randn(*batch, size, columns, generator=generator, dtype=torch.float64)
    return system, rhs, grad


def gradients(solve, system: torch.Tensor, rhs: torch.Tensor, grad: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    system = system.clone().requires_grad_()
    rhs = rhs.clone().requires_grad_()
    out = solve(system, rhs)
    grad_system, grad_rhs = torch.autograd.grad(out, (system, rhs), grad)
    return out.detach(), grad_system, grad_rhs


@pytest.mark.parametrize(("batch", "size", "columns"), [
    ((1, 20), 16, 152),  # HOPE's stacked DGD chunk
    ((2, 3), 64, 38),  # a chunk of 64, fewer columns than rows
    ((2, 2, 5), 8, 12),  # the delta rule's [B, H, chunks, C, C]
    ((3,), 1, 4),  # a one-token chunk: the identity
    ((2, 1), 7, 5),  # a partial chunk
])
def test_values_and_gradients_match_solve_triangular(batch: tuple[int, ...], size: int,
                                                     columns: int) -> None:
    system, rhs, grad = case(batch, size, columns)
    want = gradients(reference, system, rhs, grad)
    got = gradients(unit_lower_solve, system, rhs, grad)
    for name, a, b in zip(("solution", "grad system", "grad rhs"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    # only the strictly lower entries are read, so only they get a gradient
    assert torch.count_nonzero(got[1].triu()) == 0


def test_reads_only_the_strictly_lower_part() -> None:
    system, rhs, _ = case((2, 3), 6, 4)
    changed = system + torch.randn(system.shape, dtype=torch.float64).triu()
    torch.testing.assert_close(unit_lower_solve(changed, rhs), unit_lower_solve(system, rhs),
                               rtol=0, atol=0)
    # a zero strictly lower part (every eta or gate 0) solves to the right-hand side itself
    torch.testing.assert_close(unit_lower_solve(system.triu(), rhs), rhs, rtol=0, atol=0)


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_one_input_needing_a_gradient(needs: tuple[bool, bool]) -> None:
    system, rhs, grad = case((2,), 5, 3)
    _, want_system, want_rhs = gradients(reference, system, rhs, grad)
    system.requires_grad_(needs[0])
    rhs.requires_grad_(needs[1])
    leaf = system if needs[0] else rhs
    (got,) = torch.autograd.grad(unit_lower_solve(system, rhs), leaf, grad)
    torch.testing.assert_close(got, want_system if needs[0] else want_rhs, rtol=1e-12,
                               atol=1e-12)


def test_broadcast_batch_dims_sum_their_gradients() -> None:
    system, _, _ = case((1, 3), 6, 4)
    rhs = torch.randn(4, 3, 6, 4, dtype=torch.float64)
    grad = torch.randn(4, 3, 6, 4, dtype=torch.float64)
    want = gradients(reference, system, rhs, grad)
    got = gradients(unit_lower_solve, system, rhs, grad)
    assert got[1].shape == system.shape
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck() -> None:
    system, rhs, _ = case((2,), 4, 3)
    assert torch.autograd.gradcheck(
        unit_lower_solve, (system.requires_grad_(), rhs.requires_grad_()))


def test_double_backward_is_refused() -> None:
    system, rhs, grad = case((2,), 4, 3)
    system.requires_grad_()
    out = unit_lower_solve(system, rhs)
    with pytest.raises(NestlearnError, match="first-order"):
        torch.autograd.grad(out, system, grad, create_graph=True)
