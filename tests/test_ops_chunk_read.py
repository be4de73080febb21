"""``chunk_read`` (one node, written backward) equals autograd of the plain read-out in float64:
output and the gradient of every input, for every option the deep memory passes; and it
refuses a double backward."""

from __future__ import annotations

import pytest
import torch

from memory_chunk_cases import (
    BATCH,
    DIM,
    HEADS,
    HIDDEN,
    SIZE,
    layer_widths,
    random_weights,
    seeded_randn,
)
from nestlearn.errors import NestlearnError
from nestlearn.ops._chunk_read import chunk_read, chunk_read_reference


def case(layers: int, momentum: bool, pseudo: bool, shared: bool, seed: int = 0
         ) -> tuple[list[torch.Tensor | None], dict[str, int]]:
    """Inputs of a read of ``layers`` layers, float64."""
    randn = seeded_randn(seed)
    batch, heads, size, dim, hidden = BATCH, HEADS, SIZE, DIM, HIDDEN
    widths = layer_widths(layers)
    weights = random_weights(randn, layers, shared, 0.5)
    moments = random_weights(randn, layers, shared, 0.5)
    inputs = [randn(batch, heads, size, widths[i]) for i in range(layers)]
    errors = [randn(batch, heads, size, widths[i + 1]) for i in range(layers)]
    tril = torch.ones(size, size, dtype=torch.float64).tril()
    tensors = [randn(batch, heads, size, dim), randn(batch, heads, size),
               randn(batch, heads, size, size) * tril,
               randn(batch, heads, size) if momentum else None,
               randn(batch, heads, size, size) * tril if pseudo else None,
               randn(batch, heads, size, hidden) if pseudo else None,
               *weights, *(moments if momentum else [None] * layers), *inputs, *errors]
    return tensors, {"layers": layers, "batch": batch}


def run(read, activation: str, tensors: list[torch.Tensor | None], layers: int,
        batch: int) -> tuple[torch.Tensor, ...]:
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    queries, scale, coef, carry, decay, pseudo = leaves[:6]
    rest = leaves[6:]
    weights, moments = rest[:layers], rest[layers:2 * layers]
    inputs, errors = rest[2 * layers:3 * layers], rest[3 * layers:]
    # a shared (3-D) initial state reaches the read broadcast over the batch, as batched_state
    # passes it
    weights_in = [w.expand(batch, *w.shape) if w.dim() == 3 else w for w in weights]
    moments_in = None if carry is None else [
        m.expand(batch, *m.shape) if m.dim() == 3 else m for m in moments]
    out = read(activation, queries, scale, coef, carry, decay, pseudo, weights_in,
               moments_in, inputs, errors)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7),
                           dtype=out.dtype)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wanted, grad_out, allow_unused=True)
    return (out.detach(), *grads)


@pytest.mark.parametrize("activation", ["gelu", "silu", "relu", "tanh"])
@pytest.mark.parametrize(("layers", "momentum", "pseudo", "shared"), [
    (2, True, True, False),  # HOPE's stacked memory: momentum and delta gradient descent
    (2, True, False, False),  # titans
    (2, False, False, False),  # no momentum
    (2, False, True, True),  # DGD without momentum, shared initial weights
    (3, True, True, True),  # a deeper memory
])
def test_the_written_backward_equals_autograd(activation: str, layers: int, momentum: bool,
                                              pseudo: bool, shared: bool) -> None:
    tensors, sizes = case(layers, momentum, pseudo, shared)
    want = run(chunk_read_reference, activation, tensors, **sizes)
    got = run(chunk_read, activation, tensors, **sizes)
    assert len(got) == len(want)
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a is not None and b is not None, index
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"output/grad {index}")


def test_the_same_tensor_as_coef_and_eta_decay_gets_both_gradients() -> None:
    # without momentum the deep memory's coef is its eta_decay: one tensor, two roles
    tensors, sizes = case(2, False, True, False)
    tensors[2] = tensors[4]
    leaves_want = run(chunk_read_reference, "gelu", tensors, **sizes)
    leaves_got = run(chunk_read, "gelu", tensors, **sizes)
    for a, b in zip(leaves_got, leaves_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_a_refused_double_backward() -> None:
    tensors, sizes = case(2, True, True, False)
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    layers = sizes["layers"]

    def read(*args: torch.Tensor) -> torch.Tensor:
        rest = args[6:]
        return chunk_read("gelu", *args[:6], list(rest[:layers]),
                          list(rest[layers:2 * layers]), list(rest[2 * layers:3 * layers]),
                          list(rest[3 * layers:]))

    assert torch.autograd.gradcheck(read, tuple(leaves))
    out = read(*leaves)
    (grad_queries,) = torch.autograd.grad(out.sum(), leaves[0], create_graph=False)
    assert grad_queries.shape == leaves[0].shape
    with pytest.raises(NestlearnError, match="first-order"):
        torch.autograd.grad(out.sum(), leaves[0], create_graph=True)
