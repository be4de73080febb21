"""The deep-memory chunk coefficients' written backward against autograd of the plain
expressions (float64, gates at exactly 0 and 1, any subset of the outputs used)."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.ops._chunk_coefficients import chunk_coefficients
from nestlearn.ops._chunking import segment_products

deep_memory_module = sys.modules["nestlearn.ops.deep_memory"]

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


@pytest.mark.parametrize("previous,momentum,frozen",
                         [(p, m, None) for p, m in itertools.product([False, True], repeat=2)]
                         + [(True, True, "alpha"), (True, True, "eta"), (True, True, "theta"),
                            (False, False, "alpha"), (True, False, "eta")])
def test_values_and_gradients_match_the_plain_expressions(previous: bool, momentum: bool,
                                                          frozen: str | None) -> None:
    """Every output and every output's gradient alone; ``frozen``: that gate needs no
    gradient (the node's needs_input_grad branches)."""
    inputs = gates(5, momentum)
    names = ("alpha", "eta", "theta")
    if frozen is not None:
        inputs[names.index(frozen)].requires_grad_(False)
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

        wrt = [x for x in inputs if x.requires_grad]
        plain_loss = loss(plain_coefficients(*inputs[:2], theta, previous))
        fast_loss = loss(chunk_coefficients(*inputs[:2], theta, previous))
        if not plain_loss.requires_grad:  # outputs of the frozen gate alone
            continue
        want = torch.autograd.grad(plain_loss, wrt, allow_unused=True, materialize_grads=True)
        got = torch.autograd.grad(fast_loss, wrt, allow_unused=True, materialize_grads=True)
        wrt_names = [gate for gate, x in zip(names, inputs, strict=False) if x.requires_grad]
        for name, w, g in zip(wrt_names, want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14, msg=f"{subset}: {name}")


@pytest.mark.parametrize("momentum", [False, True])
def test_gradcheck(momentum: bool) -> None:
    inputs = gates(4, momentum)

    def every_output(*gate: torch.Tensor) -> tuple[torch.Tensor, ...]:
        coeffs = chunk_coefficients(gate[0], gate[1], gate[2] if momentum else None, True)
        return tuple(getattr(coeffs, n) for n in NAMES if getattr(coeffs, n) is not None)

    assert torch.autograd.gradcheck(every_output, tuple(inputs))


def test_momentum_products_given_by_the_caller() -> None:
    """theta's products computed outside (as the self-modifying layer does for all chunks at
    once): the same values, and gradients reach theta through them, or not when detached."""
    alpha, eta, theta = gates(6, True)
    for detached in (False, True):
        products = segment_products(theta)
        if detached:
            products = products.detach()
        given = chunk_coefficients(alpha, eta, theta, True, momentum_products=products)
        plain = plain_coefficients(alpha, eta, theta if not detached else theta.detach(), True)
        loss_given = sum(getattr(given, n).sum() * (i + 1) for i, n in enumerate(NAMES))
        loss_plain = sum(plain[n].sum() * (i + 1) for i, n in enumerate(NAMES))
        wrt = (alpha, eta) if detached else (alpha, eta, theta)
        for g, w in zip(torch.autograd.grad(loss_given, wrt),
                        torch.autograd.grad(loss_plain, wrt), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("length", "chunk", "momentum", "dgd"),
                         [(11, 4, True, True), (8, 4, False, True), (5, 8, True, False),
                          (6, 1, True, True)])
def test_every_chunk_of_a_sequence_equals_the_plain_expressions(length: int, chunk: int,
                                                                momentum: bool,
                                                                dgd: bool) -> None:
    """``deep_memory``'s coefficients of a whole sequence (whole chunks batched, a partial
    last chunk on its own) against the plain expressions on each chunk's own gates."""
    torch.manual_seed(length + chunk)
    alpha, eta, theta = (torch.rand(2, length, 3, dtype=torch.float64) for _ in range(3))
    alpha[0, 1, 0] = 0.0
    theta = theta if momentum else None
    every = deep_memory_module._all_coefficients(alpha, eta, theta, chunk, dgd)
    assert len(every) == -(-length // chunk)
    for index, coeffs in enumerate(every):
        part = slice(index * chunk, (index + 1) * chunk)
        plain = plain_coefficients(*(None if g is None else g[:, part].transpose(1, 2)
                                     for g in (alpha, eta, theta)), previous=dgd)
        for name in NAMES:
            if plain[name] is None:
                assert getattr(coeffs, name) is None, name
            else:
                torch.testing.assert_close(getattr(coeffs, name), plain[name], rtol=1e-13,
                                           atol=1e-15, msg=name)


def test_a_partial_chunk_equals_the_padded_chunk_cropped() -> None:
    """Tokens padded after the real ones (alpha = theta = 1, eta = 0) change no coefficient of
    a real token: row t only involves tokens <= t. So a partial chunk computed alone equals a
    whole one padded and cropped, its end rows the padded matrices' row at its last token."""
    alpha, eta, theta = (g.detach() for g in gates(3, True))

    def padded(gate: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(gate, (0, 2), value=value)

    alone = chunk_coefficients(alpha, eta, theta, True)
    whole = chunk_coefficients(padded(alpha, 1.0), padded(eta, 0.0), padded(theta, 1.0), True)
    for name in ("eta_decay", "coef", "prev_eta_decay", "prev_coef"):
        torch.testing.assert_close(getattr(alone, name), getattr(whole, name)[..., :3, :3],
                                   rtol=0, atol=1e-15, msg=name)
    for name in ("scale", "carry", "prev_scale", "prev_carry"):
        torch.testing.assert_close(getattr(alone, name), getattr(whole, name)[..., :3],
                                   rtol=0, atol=1e-15, msg=name)
    for name in ("eta_decay", "coef"):
        torch.testing.assert_close(getattr(alone, f"end_{name}"),
                                   getattr(whole, name)[..., 2, :3], rtol=0, atol=1e-15)
    for name in ("scale", "carry"):
        torch.testing.assert_close(getattr(alone, f"end_{name}"), getattr(whole, name)[..., 2],
                                   rtol=0, atol=1e-15)


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


def test_a_double_backward_is_refused() -> None:
    alpha, eta, theta = gates(4, True)
    coeffs = chunk_coefficients(alpha, eta, theta, True)
    with pytest.raises(NestlearnError, match="create_graph=True"):
        torch.autograd.grad(coeffs.coef.sum(), (alpha,), create_graph=True)


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
