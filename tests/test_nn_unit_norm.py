"""``unit_normalize`` equals ``F.normalize(x, dim=-1)`` in values and gradients (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.benchmarks.opcount import OpCounter
from nestlearn.errors import NestlearnError
from nestlearn.nn.unit_norm import EPS, unit_normalize


def rows() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    x[0, 0] = 0.0  # a zero row: clamped, its gradient g / eps
    x[1, 1] = 0.0
    x[1, 1, 2] = EPS  # a row whose norm is exactly the bound: the norm's gradient passes
    x[2, 3] *= 1e-14  # a row below the bound
    return x.requires_grad_()


def test_values_and_gradients_match_f_normalize() -> None:
    x = rows()
    grad = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = F.normalize(x, dim=-1)
    got = unit_normalize(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-13, atol=0)


def test_gradcheck() -> None:
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(unit_normalize, (x,))


def test_fewer_ops_than_autograd_of_f_normalize() -> None:
    def count(normalize: object) -> int:
        x = torch.randn(2, 16, 8, requires_grad=True)
        with OpCounter() as ops:
            normalize(x).sum().backward()
        return ops.total_kernels

    assert count(unit_normalize) < count(lambda x: F.normalize(x, dim=-1))


def test_a_double_backward_is_refused() -> None:
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NestlearnError, match="create_graph=True"):
        torch.autograd.grad(unit_normalize(x).sum(), (x,), create_graph=True)


@pytest.mark.parametrize("no_grad", [True, False])
def test_without_a_recorded_gradient_three_ops_and_the_same_values(no_grad: bool) -> None:
    x = rows().detach()
    with torch.set_grad_enabled(not no_grad), OpCounter() as ops:
        got = unit_normalize(x if no_grad else x.requires_grad_(False))
    torch.testing.assert_close(got, F.normalize(x, dim=-1), rtol=0, atol=0)
    assert got.grad_fn is None
    assert ops.total_kernels == 3  # the norm, the clamp, the division; no saved mask
