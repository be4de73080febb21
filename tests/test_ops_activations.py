"""The memory activations' written derivatives (``ACTIVATIONS``: s, s', s'') equal autograd's
derivatives of s in float64, and ``activation_slope`` differentiates once more through s''.
The chunkwise forms' hand-written backwards use s' and s''; a wrong one would only show there
as a mismatch against the per-token references, so it is tied here on its own first."""

from __future__ import annotations

import math

import pytest
import torch

from nestlearn.ops._deep_memory_common import ACTIVATIONS, _unit_gradient, activation_slope

# The activations as plain expressions: autograd of F.gelu and F.silu runs the very kernels the
# slopes now call, so the references are differentiated from these instead.
PLAIN = {
    "gelu": lambda z: 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0))),
    "silu": lambda z: z * torch.sigmoid(z),
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
    "tanh": lambda z: torch.tanh(z),
}


def points() -> torch.Tensor:
    """Values around zero, far out on both sides, and a random batch ``[2, 3, 40]``."""
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(2, 3, 32, generator=generator, dtype=torch.float64) * 3
    edges = torch.tensor([0.0, 1e-8, -1e-8, 1.0, -1.0, 6.0, -6.0, 40.0], dtype=torch.float64)
    return torch.cat([spread, edges.expand(2, 3, 8)], dim=-1)


def autograd_derivative(fn, z: torch.Tensor) -> torch.Tensor:
    leaf = z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fn(leaf).sum(), leaf)
    return grad


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_slope_is_the_activations_derivative(name: str) -> None:
    _, slope, _ = ACTIVATIONS[name]
    z = points()
    if name == "relu":  # the slope at 0 is a convention (0, as autograd's relu): not compared
        z = z.masked_fill(z == 0, 0.5)
    torch.testing.assert_close(slope(z), autograd_derivative(PLAIN[name], z), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("name", ["gelu", "silu", "tanh"])
def test_curvature_is_the_slopes_derivative(name: str) -> None:
    _, _, curvature = ACTIVATIONS[name]
    z = points()

    def autograd_slope(t: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad(PLAIN[name](t).sum(), t, create_graph=True)
        return grad

    torch.testing.assert_close(curvature(z), autograd_derivative(autograd_slope, z),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_slope_backward_is_the_curvature(name: str) -> None:
    _, slope, curvature = ACTIVATIONS[name]
    z = points().requires_grad_()
    weights = torch.randn(z.shape, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)
    value = activation_slope(z, name)
    (grad,) = torch.autograd.grad((value * weights).sum(), z)
    torch.testing.assert_close(value, slope(z.detach()), rtol=0, atol=0)
    torch.testing.assert_close(grad, weights * curvature(z.detach()), rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_slope_keeps_the_input_dtype_and_shape(name: str) -> None:
    _, slope, _ = ACTIVATIONS[name]
    for dtype in (torch.float32, torch.float64):
        z = torch.randn(3, 5, dtype=dtype)
        out = slope(z)
        assert out.dtype == dtype and out.shape == z.shape


def test_the_unit_gradient_is_written_out_not_broadcast() -> None:
    # a broadcast scalar (stride 0) sends the backward kernels down their slower strided loop
    z = torch.randn(2, 3, 5)
    ones = _unit_gradient(z)
    assert ones.stride() == z.stride() and bool((ones == 1).all())
