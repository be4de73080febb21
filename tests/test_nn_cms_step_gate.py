"""The CMS step gate's written backward against autograd of the plain form
``budget / token_curvature(...).clamp_min(budget)`` (float64)."""

from __future__ import annotations

import pytest
import torch

from nestlearn.benchmarks.opcount import OpCounter
from nestlearn.errors import NestlearnError
from nestlearn.nn.cms import token_curvature
from nestlearn.nn.cms_levels import level_derivatives, level_forward, weight_shapes
from nestlearn.nn.cms_step_gate import step_gate_factor


def level_inputs(kind: str, batched: bool) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    lead = (2,) if batched else ()
    weights = tuple((torch.randn(*lead, *shape, generator=generator, dtype=torch.float64)
                     * 0.4).requires_grad_() for shape in weight_shapes(kind, 5, 7))
    n = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64)
    n[0, 1] *= 0.01  # tokens of small curvature: below the budget, gate exactly 1
    n[1, 4] *= 0.02
    return weights, n.requires_grad_()


def budget_for(kappa: torch.Tensor) -> float:
    """A budget between the tokens' curvatures: some gated, some not, one exactly at it."""
    return float(kappa.detach().flatten().sort().values[5])


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("batched", [False, True])
def test_values_and_gradients_match_the_plain_form(kind: str, batched: bool) -> None:
    weights, n = level_inputs(kind, batched)
    grad = torch.randn(2, 6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def gates(fast: bool) -> torch.Tensor:
        _, activations = level_forward(kind, weights, n)
        derivatives = level_derivatives(kind, activations)
        kappa = token_curvature(kind, weights, n, activations, derivatives)
        budget = budget_for(kappa)
        if fast:
            return step_gate_factor(budget, activations[-1], n, weights[-1], derivatives)
        return (budget / kappa.clamp_min(budget))[..., None]

    plain, fast = gates(False), gates(True)
    assert (plain == 1).any() and (plain < 1).any()
    torch.testing.assert_close(fast, plain, rtol=1e-14, atol=0)
    want = torch.autograd.grad(plain, (n, *weights), grad)
    got = torch.autograd.grad(fast, (n, *weights), grad)
    for name, w, g in zip(("n", "w0", "w1", "w2"), want, got, strict=False):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15, msg=name)


def test_gradcheck() -> None:
    generator = torch.Generator().manual_seed(5)
    hidden, d0, d1 = (torch.randn(2, 3, 4, generator=generator, dtype=torch.float64,
                                  requires_grad=True) for _ in range(3))
    n = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(2, 5, 4, generator=generator, dtype=torch.float64,
                         requires_grad=True)
    with torch.no_grad():
        columns = w_down.square().sum(-2)[:, None]
        kappa = (hidden.square().sum(-1) + n.square().sum(-1)
                 * ((d0.square() + d1.square()) * columns).sum(-1)).flatten().sort().values
    # a budget halfway between two tokens' curvatures: both regimes, neither near the kink
    budget = float(kappa[2] + kappa[3]) / 2
    gate = step_gate_factor(budget, hidden, n, w_down, (d0, d1))
    assert (gate == 1).any() and (gate < 1).any()
    assert torch.autograd.gradcheck(
        lambda *x: step_gate_factor(budget, x[0], x[1], x[2], x[3:]),
        (hidden, n, w_down, d0, d1))


def test_a_double_backward_is_refused() -> None:
    weights, n = level_inputs("gelu", False)
    _, activations = level_forward("gelu", weights, n)
    gate = step_gate_factor(1e-3, activations[-1], n, weights[-1],
                            level_derivatives("gelu", activations))
    with pytest.raises(NestlearnError, match="create_graph=True"):
        torch.autograd.grad(gate.sum(), (n,), create_graph=True)


def test_fewer_ops_than_autograd_of_the_plain_form() -> None:
    def count(fast: bool) -> int:
        weights, n = level_inputs("swiglu", True)
        with OpCounter() as ops:
            _, activations = level_forward("swiglu", weights, n)
            derivatives = level_derivatives("swiglu", activations)
            if fast:
                gate = step_gate_factor(1.0, activations[-1], n, weights[-1], derivatives)
            else:
                gate = 1.0 / token_curvature("swiglu", weights, n, activations,
                                             derivatives).clamp_min(1.0)
            gate.sum().backward()
        return ops.total_kernels

    assert count(True) < count(False)
