"""The deep-memory chunk coefficients' written backward against autograd of the plain
expressions (float64, gates at exactly 0 and 1, any subset of the outputs used)."""

from __future__ import annotations

import itertools

import pytest
import torch

from nestlearn.ops._chunk_coefficients import chunk_coefficients
from nestlearn.ops._chunking import segment_products

NAMES = ("scale", "eta_decay", "coef", "carry", "prev_scale", "prev_eta_decay", "prev_coef",
         "prev_carry", "end_scale", "end_eta_decay", "end_coef", "end_carry", "end_momentum",
         "theta_end")


def plain_coefficients(alpha: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor | None,
                       previous: bool) -> dict[str, torch.Tensor | None]:
    """The coefficients written as plain differentiable expressions of the segment products,
    rows sliced out of the full matrices."""
    products = segment_products(alpha)
    eta_cols = eta[..., None, :]
    out: dict[str, torch.Tensor | None] = dict.fromkeys(NAMES)
    out["scale"] = products[..., 1:, 0]
    out["eta_decay"] = products[..., 1:, 1:] * eta_cols
    if previous:
        out["prev_scale"] = products[..., :-1, 0]
        out["prev_eta_decay"] = products[..., :-1, 1:] * eta_cols
    if theta is None:
        out["coef"], out["prev_coef"] = out["eta_decay"], out["prev_eta_decay"]
    else:
        momentum = segment_products(theta)
        # c_{t,i} = sum_{j=i..t} (A_t / A_j)(Theta_j / Theta_i) eta_i, s_t = sum_j (A_t/A_j) Theta_j
        out["coef"] = (products[..., 1:, 1:] @ momentum[..., 1:, 1:]) * eta_cols
        out["carry"] = (products[..., 1:, 1:] @ momentum[..., 1:, :1])[..., 0]
        if previous:
            out["prev_coef"] = (products[..., :-1, 1:] @ momentum[..., 1:, 1:]) * eta_cols
            out["prev_carry"] = (products[..., :-1, 1:] @ momentum[..., 1:, :1])[..., 0]
        out["end_momentum"] = momentum[..., -1, 1:] * eta
        out["theta_end"] = momentum[..., -1, 0]
        out["end_carry"] = out["carry"][..., -1]
    out["end_scale"] = out["scale"][..., -1]
    out["end_eta_decay"] = out["eta_decay"][..., -1, :]
    out["end_coef"] = out["coef"][..., -1, :]
    return out


def gates(size: int, momentum: bool) -> list[torch.Tensor]:
    torch.manual_seed(size)
    alpha = torch.rand(2, 3, size, dtype=torch.float64) * 0.5 + 0.5
    eta = torch.rand(2, 3, size, dtype=torch.float64)
    theta = torch.rand(2, 3, size, dtype=torch.float64)
    # exact zeros and ones: no ratio or logarithm may break them
    alpha[0, 0, 1], alpha[1, 2, 0], eta[0, 1, 2], theta[1, 0, 1] = 0.0, 1.0, 0.0, 0.0
    alpha[0, 1, -1], theta[0, 2, 0] = 0.0, 1.0
    return [g.requires_grad_() for g in (alpha, eta, theta if momentum else None)
            if g is not None]


@pytest.mark.parametrize("previous,momentum", list(itertools.product([False, True], repeat=2)))
def test_values_and_gradients_match_the_plain_expressions(previous: bool,
                                                          momentum: bool) -> None:
    inputs = gates(5, momentum)
    theta = inputs[2] if momentum else None
    fast = chunk_coefficients(inputs[0], inputs[1], theta, previous)
    plain = plain_coefficients(inputs[0], inputs[1], theta, previous)
    used = [name for name in NAMES if plain[name] is not None]
    assert used == [name for name in NAMES if getattr(fast, name) is not None]
    for name in used:
        torch.testing.assert_close(getattr(fast, name), plain[name], rtol=0, atol=1e-15)
    generator = torch.Generator().manual_seed(7)
    # every output alone, the end rows alone, and all of them together
    subsets = [[name] for name in used] + [[n for n in used if n.startswith("end_")], used]
    for subset in subsets:
        weights = {name: torch.randn(plain[name].shape, generator=generator,
                                     dtype=torch.float64) for name in subset}

        def loss(values: object, weights: dict = weights) -> torch.Tensor:
            get = values.get if isinstance(values, dict) else lambda n: getattr(values, n)
            return sum((get(name) * weight).sum() for name, weight in weights.items())

        want = torch.autograd.grad(loss(plain_coefficients(*inputs[:2], theta, previous)),
                                   inputs, allow_unused=True, materialize_grads=True)
        got = torch.autograd.grad(loss(chunk_coefficients(*inputs[:2], theta, previous)),
                                  inputs, allow_unused=True, materialize_grads=True)
        for name, w, g in zip(("alpha", "eta", "theta"), want, got, strict=False):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14, msg=f"{subset}: {name}")


@pytest.mark.parametrize("momentum", [False, True])
def test_gradcheck(momentum: bool) -> None:
    inputs = gates(4, momentum)

    def every_output(*gate: torch.Tensor) -> tuple[torch.Tensor, ...]:
        coeffs = chunk_coefficients(gate[0], gate[1], gate[2] if momentum else None, True)
        return tuple(getattr(coeffs, n) for n in NAMES if getattr(coeffs, n) is not None)

    assert torch.autograd.gradcheck(every_output, tuple(inputs))


def test_per_chunk_equals_each_chunk_alone() -> None:
    alpha, eta, theta = gates(12, True)
    batched = chunk_coefficients(*(g.unflatten(-1, (3, 4)) for g in (alpha, eta, theta)),
                                 True).per_chunk()
    for index, chunk in enumerate(batched):
        part = slice(4 * index, 4 * index + 4)
        alone = chunk_coefficients(alpha[..., part], eta[..., part], theta[..., part], True)
        for name in NAMES:
            torch.testing.assert_close(getattr(chunk, name), getattr(alone, name), rtol=0,
                                       atol=1e-15)


def test_fewer_ops_than_autograd_of_the_plain_expressions() -> None:
    """The point of the node: its forward and backward issue fewer ops than autograd does."""
    from nestlearn.benchmarks.opcount import OpCounter

    def count(make: object) -> int:
        inputs = gates(16, True)
        with OpCounter() as ops:
            values = make(*inputs)
            get = values.get if isinstance(values, dict) else lambda n: getattr(values, n)
            total = sum(get(name).sum() for name in NAMES if get(name) is not None)
            total.backward()
        return ops.total_kernels

    fast = count(lambda a, e, t: chunk_coefficients(a, e, t, True))
    plain = count(lambda a, e, t: plain_coefficients(a, e, t, True))
    assert fast < plain
