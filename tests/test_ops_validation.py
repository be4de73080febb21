"""Bad input to the linear-memory ops fails with a NestlearnError naming the argument."""

from __future__ import annotations

import re

import pytest
import torch

from nestlearn.errors import NestlearnError, NonFiniteError
from nestlearn.ops import (
    TitansLinearState,
    gated_delta_rule,
    gated_delta_rule_naive,
    gated_linear_attention,
    gated_linear_attention_naive,
    titans_linear,
    titans_linear_naive,
)

B, T, H, D = 2, 6, 3, 4

RULES = {
    "gla": (gated_linear_attention, ("alpha", "eta")),
    "gla_naive": (gated_linear_attention_naive, ("alpha", "eta")),
    "delta": (gated_delta_rule, ("alpha", "eta")),
    "delta_naive": (gated_delta_rule_naive, ("alpha", "eta")),
    "titans": (titans_linear, ("alpha", "eta", "theta")),
    "titans_naive": (titans_linear_naive, ("alpha", "eta", "theta")),
}


def good_inputs(gates: tuple[str, ...]) -> dict:
    inputs = {
        "q": torch.randn(B, T, H, D),
        "k": torch.randn(B, T, H, D),
        "v": torch.randn(B, T, H, D),
    }
    for gate in gates:
        inputs[gate] = torch.full((B, T, H), 0.5)
    return inputs


def good_state(fn):
    memory = torch.zeros(B, H, D, D)
    if fn in (titans_linear, titans_linear_naive):
        return TitansLinearState(memory, memory.clone())
    return memory


def expect_error(fn, inputs: dict, argument: str, **kwargs) -> str:
    with pytest.raises(NestlearnError, match=rf"^{re.escape(argument)}: got ") as info:
        fn(**inputs, **kwargs)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "got" in message and "allowed" in message
    return message


BAD_TENSORS = {
    # case: (argument named in the message, function producing the bad value from the good one)
    "q-rank-3": ("q.shape", "q", lambda x: x[..., 0]),
    "k-shape": ("k.shape", "k", lambda x: x[:, :, :, :2]),
    "v-heads": ("v.shape", "v", lambda x: x[:, :, :2]),
    "v-length": ("v.shape", "v", lambda x: x[:, :4]),
    "k-dtype": ("k.dtype", "k", lambda x: x.double()),
    "v-device": ("v.device", "v", lambda x: torch.empty(x.shape, device="meta")),
    "q-integer": ("q.dtype", "q", lambda x: x.long()),
    "q-not-tensor": ("q", "q", lambda x: x.tolist()),
    "q-empty": ("q.shape", "q", lambda x: x[:, :0]),
    "alpha-shape": ("alpha.shape", "alpha", lambda x: x[:, :, :2]),
    "alpha-above-1": ("alpha", "alpha", lambda x: x + 0.6),
    "alpha-below-0": ("alpha", "alpha", lambda x: x - 0.6),
    "alpha-dtype": ("alpha.dtype", "alpha", lambda x: x.double()),
    "eta-negative": ("eta", "eta", lambda x: x - 1.0),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
@pytest.mark.parametrize("rule", RULES)
def test_bad_tensor_names_the_argument(rule, case):
    fn, gates = RULES[rule]
    argument, name, corrupt = BAD_TENSORS[case]
    inputs = good_inputs(gates)
    if case == "q-empty":
        # An empty q with matching k, v: the length itself is what is wrong.
        inputs = {n: (x[:, :0] if n in ("q", "k", "v") else x) for n, x in inputs.items()}
    else:
        inputs[name] = corrupt(inputs[name])
    expect_error(fn, inputs, argument)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("rule", RULES)
def test_non_finite_gate_is_a_non_finite_error(rule, bad):
    # values gone bad, not bad input: a separate error the trainer stops on
    fn, gates = RULES[rule]
    inputs = good_inputs(gates)
    inputs["alpha"][0, 1, 2] = bad
    with pytest.raises(NonFiniteError,
                       match=r"^alpha: got non-finite values; allowed: finite values$"):
        fn(**inputs)


@pytest.mark.parametrize("rule", ["titans", "titans_naive"])
@pytest.mark.parametrize(("corrupt", "argument"), [
    (lambda x: x + 0.6, "theta"),
    (lambda x: x - 0.6, "theta"),
    (lambda x: x[:, :3], "theta.shape"),
])
def test_bad_momentum_gate(rule, corrupt, argument):
    fn, gates = RULES[rule]
    inputs = good_inputs(gates)
    inputs["theta"] = corrupt(inputs["theta"])
    message = expect_error(fn, inputs, argument)
    if argument == "theta":
        assert "[0.0, 1.0]" in message


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_bad_chunk_size(rule, chunk_size):
    fn, gates = RULES[rule]
    message = expect_error(fn, good_inputs(gates), "chunk_size", chunk_size=chunk_size)
    assert repr(chunk_size) in message


@pytest.mark.parametrize("rule", RULES)
def test_good_input_passes(rule):
    fn, gates = RULES[rule]
    out, state = fn(**good_inputs(gates), initial_state=good_state(fn), output_final_state=True,
                    chunk_size=4)
    assert out.shape == (B, T, H, D)
    assert state is not None


@pytest.mark.parametrize("rule", ["gla", "gla_naive", "delta", "delta_naive"])
@pytest.mark.parametrize(("state", "argument"), [
    (torch.zeros(B, H, D), "initial_state.shape"),
    (torch.zeros(B, H + 1, D, D), "initial_state.shape"),
    (torch.zeros(B, H, D, D, dtype=torch.float64), "initial_state.dtype"),
    ("zeros", "initial_state"),
])
def test_bad_matrix_state(rule, state, argument):
    fn, gates = RULES[rule]
    expect_error(fn, good_inputs(gates), argument, initial_state=state)


@pytest.mark.parametrize("rule", ["titans", "titans_naive"])
@pytest.mark.parametrize(("state", "argument"), [
    (torch.zeros(B, H, D, D), "initial_state"),
    (TitansLinearState(torch.zeros(B, H, D, 2), torch.zeros(B, H, D, D)),
     "initial_state.memory.shape"),
    (TitansLinearState(torch.zeros(B, H, D, D), torch.zeros(1, H, D, D)),
     "initial_state.momentum.shape"),
    (TitansLinearState(torch.zeros(B, H, D, D), torch.zeros(B, H, D, D, dtype=torch.float64)),
     "initial_state.momentum.dtype"),
])
def test_bad_titans_state(rule, state, argument):
    fn, gates = RULES[rule]
    expect_error(fn, good_inputs(gates), argument, initial_state=state)


@pytest.mark.parametrize(("argv", "argument"), [
    (["--rules", "gla", "bogus"], "--rules"),
    (["--lengths", "64", "0"], "--lengths"),
    (["--chunk-size", "0"], "--chunk-size"),
    (["--max-gb", "-1"], "--max-gb"),
])
def test_bench_ops_rejects_bad_arguments(argv, argument, capsys, tmp_path):
    from nestlearn.cli import main

    assert main(["bench", "ops", *argv, "--out", str(tmp_path)]) == 2
    assert f"error: {argument}: got " in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("rule", ["gla", "delta", "titans", "deep_memory"])
@pytest.mark.parametrize("variant", ["chunkwise", "naive"])
def test_bench_ops_workload_runs(rule, variant):
    """The benchmark's forward+backward workload runs for every rule (tiny size)."""
    from nestlearn.benchmarks.ops import make_workload

    make_workload(rule, variant, length=5, batch=1, heads=2, dim=4, chunk_size=2)()
