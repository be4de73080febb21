"""``key_pass`` (one node, written backward) equals autograd of the plain key pass in float64:
its outputs, and the gradients of keys, values and every weight, whichever outputs the loss
reads; and it refuses a double backward."""

from __future__ import annotations

import pytest
import torch

from memory_chunk_cases import BATCH, DIM, HEADS, SIZE, random_weights, seeded_randn
from nestlearn.errors import NestlearnError
from nestlearn.ops._key_pass import key_pass, key_pass_reference


def case(layers: int, shared: bool, seed: int = 0
         ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Weights (``[H, out, in]`` if shared, else ``[B, H, out, in]``), keys and values
    ``[B, H, C, D]`` of a memory of ``layers`` layers."""
    randn = seeded_randn(seed)
    weights = random_weights(randn, layers, shared, 0.7)
    return weights, randn(BATCH, HEADS, SIZE, DIM), randn(BATCH, HEADS, SIZE, DIM)


def run(pass_fn, weights: list[torch.Tensor], keys: torch.Tensor, values: torch.Tensor,
        objective: str, activation: str, used: str) -> tuple[torch.Tensor, ...]:
    """Outputs and the gradients of (keys, values, weights) of a loss reading ``used``:
    "all" outputs, only the "errors", or only the layer "inputs" and z_0."""
    leaves = [w.clone().requires_grad_() for w in weights]
    k, v = keys.clone().requires_grad_(), values.clone().requires_grad_()
    batch = keys.shape[0]
    # shared initial weights reach the chunk broadcast over the batch, as batched_state passes
    passed = [w.expand(batch, *w.shape) if w.dim() == 3 else w for w in leaves]
    inputs, errors, first = pass_fn(passed, k, v, objective, activation)
    generator = torch.Generator().manual_seed(11)
    read = {"all": [*inputs, *errors, first], "errors": errors, "inputs": [*inputs, first]}[used]
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum()
               + (t * t).sum() for t in read)
    grads = torch.autograd.grad(loss, [k, v, *leaves], allow_unused=True)
    values_out = [t.detach() for t in (*inputs, *errors, first)]
    zero = [torch.zeros_like(t) for t in (k, v, *leaves)]
    return (*values_out, *(z if g is None else g for g, z in zip(grads, zero, strict=True)))


@pytest.mark.parametrize("activation", ["gelu", "silu", "relu", "tanh"])
@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize(("layers", "shared", "used"), [
    (2, False, "all"),
    (2, True, "errors"),
    (2, False, "inputs"),
    (3, False, "all"),
    (3, True, "errors"),
])
def test_the_written_backward_equals_autograd(activation: str, objective: str, layers: int,
                                              shared: bool, used: str) -> None:
    weights, keys, values = case(layers, shared)
    want = run(key_pass_reference, weights, keys, values, objective, activation, used)
    got = run(key_pass, weights, keys, values, objective, activation, used)
    assert len(got) == len(want)
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"output/grad {index}")


def test_gradcheck_and_a_refused_double_backward() -> None:
    weights, keys, values = case(2, False)
    leaves = [t.clone().requires_grad_() for t in (keys, values, *weights)]

    def flat(k: torch.Tensor, v: torch.Tensor, *ws: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs, errors, first = key_pass(list(ws), k, v, "l2", "gelu")
        return (*inputs[1:], *errors, first)

    assert torch.autograd.gradcheck(flat, tuple(leaves))
    out = flat(*leaves)
    with pytest.raises(NestlearnError, match="first-order"):
        torch.autograd.grad(sum(t.sum() for t in out), leaves[0], create_graph=True)
