"""Chunkwise linear-memory ops against their token-by-token references, in float64."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import pytest
import torch

from nestlearn.ops import (
    TitansLinearState,
    gated_delta_rule,
    gated_delta_rule_naive,
    gated_linear_attention,
    gated_linear_attention_naive,
    titans_linear,
    titans_linear_naive,
)
from nestlearn.state import tree_map

DTYPE = torch.float64
TOLERANCE = 1e-8


@dataclass(frozen=True)
class Rule:
    fast: Callable
    naive: Callable
    gates: tuple[str, ...]
    # Whether the result depends on where chunks start (gradients at the chunk's start state).
    chunk_semantics: bool


RULES = {
    "gla": Rule(gated_linear_attention, gated_linear_attention_naive, ("alpha", "eta"), False),
    "delta": Rule(gated_delta_rule, gated_delta_rule_naive, ("alpha", "eta"), False),
    "titans": Rule(titans_linear, titans_linear_naive, ("alpha", "eta", "theta"), True),
}


def make_inputs(rule: Rule, batch: int, length: int, heads: int, dk: int, dv: int,
                seed: int = 0) -> dict:
    """Random inputs with L2-normalized keys and gates inside their ranges (all need grads)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=DTYPE)

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=gen, dtype=DTYPE)

    inputs = {
        "q": rand(batch, length, heads, dk),
        "k": torch.nn.functional.normalize(rand(batch, length, heads, dk), dim=-1),
        "v": rand(batch, length, heads, dv),
        "alpha": uniform(0.6, 1.0, batch, length, heads),
        "eta": uniform(0.05, 1.0, batch, length, heads),
        "theta": uniform(0.3, 1.0, batch, length, heads),
    }
    inputs = {name: inputs[name] for name in ("q", "k", "v", *rule.gates)}
    state_shape = (batch, heads, dv, dk)
    if rule.fast is titans_linear:
        inputs["initial_state"] = TitansLinearState(rand(*state_shape), rand(*state_shape))
    else:
        inputs["initial_state"] = rand(*state_shape)
    return inputs


def leaves(inputs: dict) -> dict[str, torch.Tensor]:
    """Every tensor input by name, the state's parts included."""
    out = {}
    for name, value in inputs.items():
        if isinstance(value, TitansLinearState):
            out[f"{name}.memory"], out[f"{name}.momentum"] = value.memory, value.momentum
        else:
            out[name] = value
    return out


def fresh(inputs: dict) -> dict:
    """A copy of ``inputs`` whose tensors (the state's parts too) are new leaves requiring
    grad."""
    return tree_map(lambda t: t.detach().clone().requires_grad_(), inputs)


def state_tensors(state) -> list[torch.Tensor]:
    return [state.memory, state.momentum] if isinstance(state, TitansLinearState) else [state]


def run_with_grads(fn: Callable, inputs: dict, chunk_size: int):
    """Outputs, final state and gradients of a fixed random linear function of both."""
    inputs = fresh(inputs)
    out, state = fn(**inputs, output_final_state=True, chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=DTYPE)).sum()
    for part in state_tensors(state):
        loss = loss + (part * torch.randn(part.shape, generator=gen, dtype=DTYPE)).sum()
    named = leaves(inputs)
    grads = torch.autograd.grad(loss, list(named.values()))
    return out, state_tensors(state), dict(zip(named, grads, strict=True))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, what
    error = relative_error(got, want)
    assert error < TOLERANCE, f"{what}: relative error {error:.3g}"


CASES = {
    # batch, length, heads, dk, dv, chunk_size
    "T-not-multiple": (2, 37, 3, 5, 4, 8),
    "T-below-chunk": (2, 5, 2, 4, 4, 8),
    "chunk-1": (2, 7, 2, 3, 5, 1),
    "T-multiple": (1, 24, 2, 6, 6, 6),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", RULES)
def test_chunkwise_matches_naive(name, case):
    rule = RULES[name]
    batch, length, heads, dk, dv, chunk = CASES[case]
    inputs = make_inputs(rule, batch, length, heads, dk, dv)
    out, state, grads = run_with_grads(rule.fast, inputs, chunk)
    ref_out, ref_state, ref_grads = run_with_grads(rule.naive, inputs, chunk)
    assert_close(out, ref_out, "output")
    for got, want in zip(state, ref_state, strict=True):
        assert_close(got, want, "final state")
    assert set(grads) == {"q", "k", "v", *rule.gates, *leaves({"initial_state":
                                                             inputs["initial_state"]})}
    for arg in grads:
        assert_close(grads[arg], ref_grads[arg], f"grad of {arg}")


@pytest.mark.parametrize("name", RULES)
def test_gates_at_their_bounds(name):
    """Gates of exactly 0 and 1 (a hard reset, no decay, no write) keep exact finite grads."""
    rule = RULES[name]
    inputs = make_inputs(rule, 1, 11, 2, 3, 3, seed=3)
    for gate in rule.gates:
        values = inputs[gate].clone()
        values[0, 2, 0] = 0.0
        values[0, 6, 1] = 0.0
        values[0, 4, :] = 0.0 if gate == "eta" else 1.0
        inputs[gate] = values
    out, state, grads = run_with_grads(rule.fast, inputs, 4)
    ref_out, ref_state, ref_grads = run_with_grads(rule.naive, inputs, 4)
    assert_close(out, ref_out, "output")
    for got, want in zip(state, ref_state, strict=True):
        assert_close(got, want, "final state")
    for arg in grads:
        assert torch.isfinite(grads[arg]).all(), arg
        assert_close(grads[arg], ref_grads[arg], f"grad of {arg}")


@pytest.mark.parametrize("name", RULES)
def test_no_initial_state_means_zeros(name):
    rule = RULES[name]
    inputs = make_inputs(rule, 2, 9, 2, 3, 4)
    zeros = tree_map(torch.zeros_like, inputs["initial_state"])
    with_zeros, _ = rule.fast(**{**inputs, "initial_state": zeros}, chunk_size=4)
    without, final = rule.fast(**{**inputs, "initial_state": None}, chunk_size=4)
    assert final is None
    assert_close(without, with_zeros, "output")


@pytest.mark.parametrize("name", RULES)
def test_chained_segments_equal_one_pass(name):
    rule = RULES[name]
    chunk = 4
    inputs = make_inputs(rule, 2, 30, 2, 4, 3, seed=5)
    whole, whole_state = rule.fast(**inputs, output_final_state=True, chunk_size=chunk)
    # Rules whose gradients are taken at each chunk's start need segments made of whole
    # chunks; the others may be cut anywhere.
    cuts = [0, 8, 20, 30] if rule.chunk_semantics else [0, 7, 8, 21, 30]
    state = inputs["initial_state"]
    pieces = []
    for start, stop in pairwise(cuts):
        segment = {name_: inputs[name_][:, start:stop] for name_ in ("q", "k", "v", *rule.gates)}
        out, state = rule.fast(**segment, initial_state=state, output_final_state=True,
                               chunk_size=chunk)
        pieces.append(out)
    assert_close(torch.cat(pieces, dim=1), whole, "output")
    for got, want in zip(state_tensors(state), state_tensors(whole_state), strict=True):
        assert_close(got, want, "final state")


def test_titans_chunk_is_part_of_the_semantics():
    """Chunk 1 is the per-token recurrence; larger chunks take gradients at the chunk start."""
    rule = RULES["titans"]
    inputs = make_inputs(rule, 1, 6, 1, 3, 3, seed=7)
    q, k, v, alpha, eta, theta = (inputs[n] for n in ("q", "k", "v", "alpha", "eta", "theta"))
    memory, momentum = inputs["initial_state"].memory, inputs["initial_state"].momentum
    outputs = []
    for t in range(6):
        error = memory[0, 0] @ k[0, t, 0] - v[0, t, 0]
        momentum = theta[0, t, 0] * momentum - eta[0, t, 0] * torch.outer(error, k[0, t, 0])
        memory = alpha[0, t, 0] * memory + momentum
        outputs.append(memory[0, 0] @ q[0, t, 0])
    per_token, _ = titans_linear(**inputs, chunk_size=1)
    assert_close(per_token[0, :, 0], torch.stack(outputs), "chunk 1 vs recurrence")
    chunked, _ = titans_linear(**inputs, chunk_size=3)
    assert relative_error(chunked, per_token) > 1e-3


def inner_loss_step(memory, key, value, objective):
    """Gradient of the inner loss at ``memory``: 1/2 ||M k - v||^2 or -<M k, v>."""
    memory = memory.detach().requires_grad_()
    prediction = memory @ key
    if objective == "l2":
        loss = 0.5 * (prediction - value).square().sum()
    else:
        loss = -(prediction * value).sum()
    (grad,) = torch.autograd.grad(loss, memory)
    return grad


@pytest.mark.parametrize(("name", "objective"), [("gla", "dot"), ("delta", "l2")])
def test_one_token_is_one_gradient_step(name, objective):
    """M_1 = alpha M_0 - eta grad l(M_0; k, v), o = M_1 q: the convention of API.md."""
    rule = RULES[name]
    inputs = make_inputs(rule, 1, 1, 1, 3, 2, seed=11)
    memory = inputs["initial_state"][0, 0]
    key, value = inputs["k"][0, 0, 0], inputs["v"][0, 0, 0]
    alpha, eta = inputs["alpha"][0, 0, 0], inputs["eta"][0, 0, 0]
    grad = inner_loss_step(memory, key, value, objective)
    # The decay multiplies M_0 while the gradient is taken at M_0 itself (DGD for "l2").
    expected = alpha * memory - eta * grad
    out, state = rule.fast(**inputs, output_final_state=True)
    assert_close(state[0, 0], expected, "memory after one token")
    assert_close(out[0, 0, 0], expected @ inputs["q"][0, 0, 0], "read-out after the update")


@pytest.mark.parametrize("name", RULES)
def test_gradcheck(name):
    rule = RULES[name]
    inputs = fresh(make_inputs(rule, 1, 5, 1, 2, 3, seed=13))
    names = list(leaves(inputs))

    def fn(*tensors):
        named = dict(zip(names, tensors, strict=True))
        args = {n: named[n] for n in ("q", "k", "v", *rule.gates)}
        if rule.fast is titans_linear:
            state = TitansLinearState(named["initial_state.memory"],
                                      named["initial_state.momentum"])
        else:
            state = named["initial_state"]
        out, final = rule.fast(**args, initial_state=state, output_final_state=True,
                               chunk_size=2)
        return (out, *state_tensors(final))

    assert torch.autograd.gradcheck(fn, tuple(leaves(inputs).values()))


@pytest.mark.parametrize("name", RULES)
def test_initial_state_shared_by_the_batch(name):
    """An initial state without the batch dim broadcasts; its gradient sums over the batch."""
    rule = RULES[name]
    inputs = make_inputs(rule, 3, 10, 2, 3, 4, seed=17)
    state = inputs["initial_state"]
    if isinstance(state, TitansLinearState):
        inputs["initial_state"] = TitansLinearState(state.memory[0], state.momentum[1])
    else:
        inputs["initial_state"] = state[0]
    out, final, grads = run_with_grads(rule.fast, inputs, 4)
    ref_out, ref_final, ref_grads = run_with_grads(rule.naive, inputs, 4)
    assert_close(out, ref_out, "output")
    for got, want in zip(final, ref_final, strict=True):
        assert got.shape[0] == 3
        assert_close(got, want, "final state")
    for arg in grads:
        assert_close(grads[arg], ref_grads[arg], f"grad of {arg}")
    shared = leaves({"initial_state": inputs["initial_state"]})
    expanded = {"initial_state": tree_map(lambda t: t.expand(3, *t.shape),
                                          inputs["initial_state"])}
    batched_out, _ = rule.fast(**{**inputs, **expanded}, chunk_size=4)
    assert_close(out, batched_out, "output with the state expanded by hand")
    assert all(grads[arg].dim() == 3 for arg in shared)
