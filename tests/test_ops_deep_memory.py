"""Deep (MLP) memory: the chunkwise form against the token-by-token reference, in float64."""

from __future__ import annotations

import itertools

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.ops.deep_memory import (
    DeepMemoryState,
    deep_memory,
    deep_memory_apply,
    deep_memory_chunk_step,
    deep_memory_naive,
    deep_memory_update,
    init_deep_memory_weights,
)

DTYPE = torch.float64
TOLERANCE = 1e-8


def make_case(batch=2, length=11, heads=2, dim=4, hidden=6, depth=2, momentum=True,
              batched_weights=False, seed=0):
    """Inputs of a well-conditioned run: unit-norm keys, moderate rates, random start state."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=DTYPE)

    def uniform(low, high):
        return low + (high - low) * torch.rand(batch, length, heads, generator=gen, dtype=DTYPE)

    q, k, v = randn(batch, length, heads, dim), randn(batch, length, heads, dim), \
        randn(batch, length, heads, dim)
    k = k / k.norm(dim=-1, keepdim=True)
    gates = {"alpha": uniform(0.6, 1.0), "eta": uniform(0.05, 0.6),
             "theta": uniform(0.1, 0.9) if momentum else None}
    weights = init_deep_memory_weights(heads, dim, hidden, depth, generator=gen, dtype=DTYPE)
    weights = tuple(w * 2 for w in weights)  # a larger W_L so every layer's error is sizeable
    if batched_weights:
        weights = tuple(w.expand(batch, *w.shape).clone() for w in weights)
    moms = tuple(0.1 * randn(batch, *w.shape[-3:]) for w in weights) if momentum else None
    return {"q": q, "k": k, "v": v, **gates, "weights": weights, "momentum": moms}


def run(fn, case, **options):
    state = DeepMemoryState(case["weights"], case["momentum"])
    return fn(case["q"], case["k"], case["v"], case["alpha"], case["eta"], case["theta"],
              initial_state=state, output_final_state=True, **options)


def flat_result(out, state):
    tensors = [out, *state.weights]
    if state.momentum is not None:
        tensors += list(state.momentum)
    return tensors


def rel_error(got, want):
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def assert_close_all(got, want, label):
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, f"{label}[{index}] shape {g.shape} != {w.shape}"
        err = rel_error(g, w)
        assert err < TOLERANCE, f"{label}[{index}] relative error {err:.3e}"


def leaves(case):
    names = ["q", "k", "v", "alpha", "eta"] + (["theta"] if case["theta"] is not None else [])
    tensors = [case[name] for name in names] + list(case["weights"])
    names += [f"W{i + 1}" for i in range(len(case["weights"]))]
    if case["momentum"] is not None:
        tensors += list(case["momentum"])
        names += [f"S{i + 1}" for i in range(len(case["momentum"]))]
    return names, tensors


def outputs_and_grads(fn, case, **options):
    names, tensors = leaves(case)
    for tensor in tensors:
        tensor.requires_grad_(True)
    result = flat_result(*run(fn, case, **options))
    gen = torch.Generator().manual_seed(123)
    loss = sum((r * torch.randn(r.shape, generator=gen, dtype=DTYPE)).sum() for r in result)
    grads = torch.autograd.grad(loss, tensors)
    return [r.detach() for r in result], dict(zip(names, grads, strict=True))


CASES = [
    pytest.param(objective, momentum, dgd, depth, length, chunk,
                 id=f"{objective}-{'mom' if momentum else 'nomom'}-{'dgd' if dgd else 'gd'}"
                    f"-L{depth}-T{length}-C{chunk}")
    for (objective, momentum, dgd, depth), (length, chunk) in itertools.product(
        itertools.product(["l2", "dot"], [True, False], [True, False], [2, 3]),
        [(11, 4), (5, 8), (6, 1)])
]


@pytest.mark.parametrize(("objective", "momentum", "dgd", "depth", "length", "chunk"), CASES)
def test_fast_matches_naive_outputs_state_and_gradients(objective, momentum, dgd, depth, length,
                                                        chunk):
    options = {"objective": objective, "dgd": dgd, "chunk_size": chunk}
    case = make_case(length=length, depth=depth, momentum=momentum, seed=depth + 7 * length)
    fast, fast_grads = outputs_and_grads(deep_memory, case, **options)
    case = make_case(length=length, depth=depth, momentum=momentum, seed=depth + 7 * length)
    slow, slow_grads = outputs_and_grads(deep_memory_naive, case, **options)
    assert_close_all(fast, slow, "outputs/state")
    for name in slow_grads:
        err = rel_error(fast_grads[name], slow_grads[name])
        assert err < TOLERANCE, f"grad {name}: relative error {err:.3e}"


@pytest.mark.parametrize("activation", ["gelu", "silu", "relu", "tanh"])
def test_every_activation_matches_naive(activation):
    case = make_case(momentum=True, depth=3)
    fast, fast_grads = outputs_and_grads(deep_memory, case, activation=activation, dgd=True,
                                         chunk_size=4)
    case = make_case(momentum=True, depth=3)
    slow, slow_grads = outputs_and_grads(deep_memory_naive, case, activation=activation,
                                         dgd=True, chunk_size=4)
    assert_close_all(fast, slow, activation)
    assert_close_all(list(fast_grads.values()), list(slow_grads.values()), f"{activation} grads")


def test_uneven_hidden_widths_match_naive():
    case = make_case(momentum=True, depth=3)
    gen = torch.Generator().manual_seed(3)
    heads, dim = case["q"].shape[2], case["q"].shape[3]
    shapes = [(heads, 5, dim), (heads, 7, 5), (heads, dim, 7)]
    case["weights"] = tuple(torch.randn(s, generator=gen, dtype=DTYPE) / s[-1] ** 0.5
                            for s in shapes)
    case["momentum"] = tuple(0.1 * torch.randn(2, *s, generator=gen, dtype=DTYPE)
                             for s in shapes)
    fast, fast_grads = outputs_and_grads(deep_memory, case, dgd=True, chunk_size=4)
    slow, slow_grads = outputs_and_grads(deep_memory_naive, case, dgd=True, chunk_size=4)
    assert [tuple(w.shape[-2:]) for w in fast[1:4]] == [s[1:] for s in shapes]
    assert_close_all(fast, slow, "outputs/state")
    assert_close_all(list(fast_grads.values()), list(slow_grads.values()), "grads")


def test_unbatched_initial_weights_broadcast_and_receive_gradients():
    case = make_case(momentum=True, batched_weights=False)
    assert case["weights"][0].dim() == 3
    fast, fast_grads = outputs_and_grads(deep_memory, case, dgd=True, chunk_size=4)
    batched = make_case(momentum=True, batched_weights=True)
    slow, slow_grads = outputs_and_grads(deep_memory_naive, batched, dgd=True, chunk_size=4)
    assert_close_all(fast, slow, "outputs/state")
    for index in (1, 2):
        want = slow_grads[f"W{index}"].sum(0)  # a broadcast leaf gets the sum over the batch
        assert fast_grads[f"W{index}"].shape == want.shape
        assert rel_error(fast_grads[f"W{index}"], want) < TOLERANCE


@pytest.mark.parametrize("fn", [deep_memory, deep_memory_naive])
@pytest.mark.parametrize("dgd", [False, True])
def test_one_pass_equals_chained_segments(fn, dgd):
    case = make_case(length=13, momentum=True, depth=3)
    out, state = run(fn, case, dgd=dgd, chunk_size=4)
    split = 8  # a chunk boundary, so both runs take gradients at the same weights
    first = {**case, **{n: case[n][:, :split] for n in ("q", "k", "v", "alpha", "eta", "theta")}}
    second = {n: case[n][:, split:] for n in ("q", "k", "v", "alpha", "eta", "theta")}
    out1, mid = run(fn, first, dgd=dgd, chunk_size=4)
    out2, end = run(fn, {**second, "weights": mid.weights, "momentum": mid.momentum}, dgd=dgd,
                    chunk_size=4)
    assert_close_all(flat_result(torch.cat([out1, out2], dim=1), end),
                     flat_result(out, state), "chained")


@pytest.mark.parametrize(("momentum", "dgd", "objective"),
                         list(itertools.product([True, False], [True, False], ["l2", "dot"])))
def test_update_equals_naive_chunk_end_state(momentum, dgd, objective):
    case = make_case(length=7, momentum=momentum, depth=3)
    _, want = run(deep_memory_naive, case, dgd=dgd, objective=objective, chunk_size=7)
    got = deep_memory_update(DeepMemoryState(case["weights"], case["momentum"]), case["k"],
                             case["v"], case["alpha"], case["eta"], case["theta"],
                             objective=objective, dgd=dgd)
    assert_close_all(flat_result(case["q"], got)[1:], flat_result(case["q"], want)[1:], "state")


def test_no_momentum_equals_zero_momentum_gate():
    case = make_case(momentum=False)
    out, state = run(deep_memory, case, dgd=True, chunk_size=4)
    zero = {**case, "theta": torch.zeros_like(case["alpha"])}
    out0, state0 = run(deep_memory, zero, dgd=True, chunk_size=4)
    assert state.momentum is None and state0.momentum is not None
    assert_close_all([out, *state.weights], [out0, *state0.weights], "theta=None vs theta=0")


def test_missing_momentum_starts_at_zero_and_final_state_is_optional():
    case = make_case(momentum=True)
    zeros = {**case, "momentum": tuple(torch.zeros_like(m) for m in case["momentum"])}
    out, state = run(deep_memory, {**case, "momentum": None}, dgd=True, chunk_size=4)
    want_out, want_state = run(deep_memory_naive, zeros, dgd=True, chunk_size=4)
    assert_close_all(flat_result(out, state), flat_result(want_out, want_state), "zero momentum")
    state_obj = DeepMemoryState(case["weights"], case["momentum"])
    plain, none = deep_memory(case["q"], case["k"], case["v"], case["alpha"], case["eta"],
                              case["theta"], initial_state=state_obj, dgd=True, chunk_size=4)
    full, _ = run(deep_memory, case, dgd=True, chunk_size=4)
    assert none is None
    assert rel_error(plain, full) < 1e-14


def zero_gate_case():
    case = make_case(momentum=True)
    case["alpha"][:, 3] = 0.0  # forget everything at token 3 ...
    case["theta"][:, 5] = 0.0  # ... and drop the momentum at token 5
    return case


def test_zero_gates_stay_finite_and_exact_with_gradients():
    fast, fast_grads = outputs_and_grads(deep_memory, zero_gate_case(), dgd=True, chunk_size=4)
    slow, slow_grads = outputs_and_grads(deep_memory_naive, zero_gate_case(), dgd=True,
                                         chunk_size=4)
    assert all(torch.isfinite(t).all() for t in [*fast, *fast_grads.values()])
    assert_close_all(fast, slow, "zero gates")
    assert fast_grads["alpha"][:, 3].abs().max() > 1e-3  # a zero gate still gets its gradient
    for name in slow_grads:
        err = rel_error(fast_grads[name], slow_grads[name])
        assert err < TOLERANCE, f"grad {name}: relative error {err:.3e}"


def test_apply_is_the_memory_forward_and_the_read_out_with_frozen_weights():
    case = make_case(momentum=False, depth=3)
    x = case["q"]
    w1, w2, w3 = case["weights"]
    act = torch.nn.functional.gelu
    manual = x + torch.einsum("hoi,bthi->btho", w3,
                              act(torch.einsum("hoi,bthi->btho", w2,
                                               act(torch.einsum("hoi,bthi->btho", w1, x)))))
    assert rel_error(deep_memory_apply(case["weights"], x), manual) < 1e-12
    frozen = {**case, "alpha": torch.ones_like(case["alpha"]),
              "eta": torch.zeros_like(case["eta"])}
    out, _ = run(deep_memory, frozen, chunk_size=4)
    assert rel_error(out, manual) < 1e-12


@pytest.mark.parametrize(("momentum", "dgd", "depth", "objective", "activation"),
                         [(True, True, 2, "l2", "gelu"), (False, False, 3, "dot", "silu")])
def test_gradcheck_tiny(momentum, dgd, depth, objective, activation):
    case = make_case(batch=1, length=3, heads=1, dim=2, hidden=3, depth=depth,
                     momentum=momentum)
    _, tensors = leaves(case)
    inputs = [t.clone().requires_grad_(True) for t in tensors]
    n_gates = 3 if momentum else 2
    n_w = len(case["weights"])

    def fn(q, k, v, *rest):
        gates, state = rest[:n_gates], rest[n_gates:]
        theta = gates[2] if momentum else None
        initial = DeepMemoryState(tuple(state[:n_w]), tuple(state[n_w:]) if momentum else None)
        out, final = deep_memory(q, k, v, gates[0], gates[1], theta, initial_state=initial,
                                 objective=objective, activation=activation, dgd=dgd,
                                 output_final_state=True, chunk_size=2)
        return (out, *final.weights, *(final.momentum or ()))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_larger_chunks_match_naive():
    options = {"dgd": True, "chunk_size": 16}
    case = make_case(length=37, dim=8, hidden=16, depth=2, momentum=True, seed=5)
    fast, fast_grads = outputs_and_grads(deep_memory, case, **options)
    case = make_case(length=37, dim=8, hidden=16, depth=2, momentum=True, seed=5)
    slow, slow_grads = outputs_and_grads(deep_memory_naive, case, **options)
    assert_close_all(fast, slow, "outputs/state")
    assert_close_all(list(fast_grads.values()), list(slow_grads.values()), "grads")


@pytest.mark.slow
@pytest.mark.parametrize("dgd", [False, True])
def test_default_chunk_long_sequence_matches_naive(dgd):
    options = {"dgd": dgd, "chunk_size": 64}
    case = make_case(length=200, heads=2, dim=16, hidden=32, depth=3, momentum=True, seed=9)
    fast, fast_grads = outputs_and_grads(deep_memory, case, **options)
    case = make_case(length=200, heads=2, dim=16, hidden=32, depth=3, momentum=True, seed=9)
    slow, slow_grads = outputs_and_grads(deep_memory_naive, case, **options)
    assert_close_all(fast, slow, "outputs/state")
    assert_close_all(list(fast_grads.values()), list(slow_grads.values()), "grads")


def test_float32_runs_close_to_the_float64_reference():
    case = make_case(length=20, dim=8, hidden=16, momentum=True)
    want, _ = run(deep_memory_naive, case, dgd=True, chunk_size=8)
    single = {name: (value.float() if isinstance(value, torch.Tensor) else
                     tuple(t.float() for t in value) if value is not None else None)
              for name, value in case.items()}
    got, state = run(deep_memory, single, dgd=True, chunk_size=8)
    assert got.dtype == torch.float32 and state.weights[0].dtype == torch.float32
    assert rel_error(got.double(), want) < 1e-5


def test_init_weights_shapes():
    weights = init_deep_memory_weights(3, 8, 16, depth=3, dtype=DTYPE)
    assert [tuple(w.shape) for w in weights] == [(3, 16, 8), (3, 16, 16), (3, 8, 16)]
    assert all(w.dtype == DTYPE for w in weights)
    with pytest.raises(NestlearnError, match="depth"):
        init_deep_memory_weights(3, 8, 16, depth=1)


def bad_call(**overrides):
    case = make_case(batch=2, length=5, heads=2, dim=4, hidden=6, momentum=True)
    args = {**case, **overrides}
    state = overrides.get("initial_state",
                          DeepMemoryState(args["weights"], args["momentum"]))
    options = {k: args[k] for k in ("objective", "activation", "chunk_size") if k in args}
    return deep_memory(args["q"], args["k"], args["v"], args["alpha"], args["eta"],
                       args["theta"], initial_state=state, **options)


BAD_INPUTS = {
    "q.shape": lambda c: {"q": c["q"][0]},
    "k.shape": lambda c: {"k": c["k"][:, :, :1]},
    "v.shape": lambda c: {"v": torch.cat([c["v"], c["v"]], dim=-1)},
    "alpha.shape": lambda c: {"alpha": c["alpha"][:, :, :1]},
    "alpha": lambda c: {"alpha": c["alpha"] + 1.0},
    "eta": lambda c: {"eta": -c["eta"]},
    "theta": lambda c: {"theta": c["theta"] * 3.0},
    "chunk_size": lambda c: {"chunk_size": 0},
    "objective": lambda c: {"objective": "huber"},
    "activation": lambda c: {"activation": "swish2"},
    "k.dtype": lambda c: {"k": c["k"].float()},
    "eta.dtype": lambda c: {"eta": c["eta"].float()},
    "initial_state": lambda c: {"initial_state": None},
    "initial_state.weights": lambda c: {"weights": c["weights"][:1]},
    "initial_state.weights[0].shape": lambda c: {"weights": (c["weights"][0][:1],
                                                             c["weights"][1])},
    "initial_state.weights[1].shape": lambda c: {"weights": (c["weights"][0],
                                                             c["weights"][1][..., :3])},
    "initial_state.weights[0].dtype": lambda c: {"weights": (c["weights"][0].float(),
                                                             c["weights"][1])},
    "initial_state.momentum[0].shape": lambda c: {"momentum": (c["momentum"][0][:1],
                                                               c["momentum"][1])},
    "initial_state.momentum": lambda c: {"theta": None},
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_names_the_argument(name):
    case = make_case(batch=2, length=5, heads=2, dim=4, hidden=6, momentum=True)
    with pytest.raises(NestlearnError) as info:
        bad_call(**BAD_INPUTS[name](case))
    assert str(info.value).startswith(f"{name}:"), str(info.value)


def test_bad_device_is_named():
    case = make_case(momentum=False)
    meta = case["eta"].to("meta")
    with pytest.raises(NestlearnError, match=r"^eta\.device"):
        deep_memory(case["q"], case["k"], case["v"], case["alpha"], meta,
                    initial_state=DeepMemoryState(case["weights"]))


def test_update_and_apply_reject_bad_input():
    case = make_case(momentum=False)
    with pytest.raises(NestlearnError, match=r"^alpha"):
        deep_memory_update(DeepMemoryState(case["weights"]), case["k"], case["v"],
                           case["alpha"] * 2, case["eta"])
    with pytest.raises(NestlearnError, match=r"^k\.shape"):
        deep_memory_update(DeepMemoryState(case["weights"]), case["k"][0], case["v"],
                           case["alpha"], case["eta"])
    with pytest.raises(NestlearnError, match=r"^state\.weights\[1\]\.shape"):
        deep_memory_update(DeepMemoryState((case["weights"][0], case["weights"][1][:1])),
                           case["k"], case["v"], case["alpha"], case["eta"])
    with pytest.raises(NestlearnError, match=r"^x"):
        deep_memory_apply(case["weights"], case["q"][0])
    with pytest.raises(NestlearnError, match=r"^weights\[0\]"):
        deep_memory_apply((case["weights"][0][..., :2], case["weights"][1]), case["q"])


@pytest.mark.parametrize("dgd", [True, False])
def test_chunk_step_is_one_chunk_of_the_op_and_reads_only_the_last_heads(dgd):
    # the layer-driven chunk step on heads-first tensors equals deep_memory over one chunk;
    # read_heads=1 reads out only the last head, given theta's segment products or not
    from nestlearn.ops._chunking import segment_products

    case = make_case(length=5, heads=3, batched_weights=True)
    out_ref, state_ref = run(deep_memory, case, chunk_size=5, dgd=dgd)

    def first(x):
        return x.transpose(1, 2).contiguous()

    gates = [first(case[name]) for name in ("alpha", "eta", "theta")]
    for read_heads, products in ((None, None), (1, segment_products(gates[2]))):
        queries = first(case["q"]) if read_heads is None else first(case["q"])[:, -1:]
        out, weights, momentum = deep_memory_chunk_step(
            list(case["weights"]), list(case["momentum"]), queries, first(case["k"]),
            first(case["v"]), *gates, dgd=dgd, read_heads=read_heads,
            momentum_products=products)
        want = out_ref.transpose(1, 2)
        want = want if read_heads is None else want[:, -1:]
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        for got, ref in zip([*weights, *momentum], [*state_ref.weights, *state_ref.momentum],
                            strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
