"""Under autocast the memory ops run in float32 (nestlearn.ops._precision): bf16 inputs are
raised, the result equals the float32 op on the same values, and every model trains."""

from __future__ import annotations

import pytest
import torch

from model_cases import tiny_config
from nestlearn.models import ARCHS, build_model
from nestlearn.ops import (
    DeepMemoryState,
    deep_memory,
    deep_memory_apply,
    deep_memory_naive,
    deep_memory_update,
    gated_delta_rule,
    gated_delta_rule_naive,
    gated_linear_attention,
    gated_linear_attention_naive,
    init_deep_memory_weights,
    titans_linear,
    titans_linear_naive,
)

B, T, H, D = 2, 9, 2, 8


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    gates = {name: low + (high - low) * torch.rand(B, T, H, generator=gen)
             for name, low, high in (("alpha", 0.8, 1.0), ("eta", 0.05, 0.3),
                                     ("theta", 0.1, 0.8))}
    # bf16 values, as autocast's projections would hand them over
    return {name: t.bfloat16() for name, t in {"q": q, "k": k, "v": v, **gates}.items()}


def _weights() -> tuple[torch.Tensor, ...]:
    return init_deep_memory_weights(H, D, 16, 2, generator=torch.Generator().manual_seed(1))


def _call(name: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    if name.startswith("deep_memory"):
        op = deep_memory if name == "deep_memory" else deep_memory_naive
        return op(x["q"], x["k"], x["v"], x["alpha"], x["eta"], x["theta"],
                  initial_state=DeepMemoryState(_weights()), chunk_size=4)[0]
    if name == "deep_memory_update":
        state = deep_memory_update(DeepMemoryState(_weights()), x["k"], x["v"], x["alpha"],
                                   x["eta"], x["theta"])
        return torch.cat([w.flatten() for w in state.weights + state.momentum])
    if name == "deep_memory_apply":
        return deep_memory_apply(_weights(), x["q"])
    ops = {"gla": (gated_linear_attention, gated_linear_attention_naive),
           "delta": (gated_delta_rule, gated_delta_rule_naive),
           "titans": (titans_linear, titans_linear_naive)}
    rule, form = name.rsplit("_", 1)
    op = ops[rule][form == "naive"]
    gates = [x["alpha"], x["eta"]] + ([x["theta"]] if rule == "titans" else [])
    return op(x["q"], x["k"], x["v"], *gates, chunk_size=4)[0]


OPS = ["deep_memory", "deep_memory_naive", "deep_memory_update", "deep_memory_apply",
       "gla_chunk", "gla_naive", "delta_chunk", "delta_naive", "titans_chunk", "titans_naive"]


@pytest.mark.parametrize("name", OPS)
def test_op_under_autocast_equals_float32_op(name):
    x = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _call(name, x)
    assert out.dtype == torch.float32
    expected = _call(name, {key: value.float() for key, value in x.items()})
    assert torch.equal(out, expected)


def test_no_autocast_means_no_cast():
    x = {key: value.double() for key, value in _inputs().items()}
    out = gated_delta_rule(x["q"], x["k"], x["v"], x["alpha"], x["eta"], chunk_size=4)[0]
    assert out.dtype == torch.float64
    # bf16 stays bf16 without autocast, and inside a region that switches it off
    x = _inputs()
    for region in (torch.autocast("cpu", enabled=False), torch.no_grad()):
        with region:
            out = gated_linear_attention(x["q"], x["k"], x["v"], x["alpha"], x["eta"],
                                         chunk_size=4)[0]
        assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["transformer", "hope", "hope-attention", "titans",
                                  "titans-mag"])
def test_every_model_trains_under_bf16_autocast(arch):
    torch.manual_seed(0)
    cms = {"chunk_sizes": (4, 8)} if ARCHS[arch].cms else None
    attention = {"window": 8} if arch == "titans-mag" else None
    config = tiny_config(arch, chunk=4, vocab_size=32, layers=1, cms=cms, attention=attention)
    model = build_model(config)
    ids = torch.randint(0, 32, (2, 19))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_keyword_inputs_and_low_precision_states_are_raised_too():
    # tensors passed by keyword and bf16 states (a tensor, a dataclass of tuples) are cast
    # like positional ones, so the op neither runs in bf16 nor refuses a dtype mismatch
    x = _inputs()
    memory = torch.randn(B, H, D, D, generator=torch.Generator().manual_seed(2))
    weights = _weights()
    deep_state = DeepMemoryState(weights, tuple(torch.zeros_like(w) for w in weights))
    calls = {
        "delta": lambda x, memory, state: gated_delta_rule(
            q=x["q"], k=x["k"], v=x["v"], alpha=x["alpha"], eta=x["eta"],
            initial_state=memory, output_final_state=True, chunk_size=4),
        "deep_memory": lambda x, memory, state: deep_memory(
            x["q"], x["k"], x["v"], x["alpha"], x["eta"], theta=x["theta"],
            initial_state=state, output_final_state=True, chunk_size=4),
    }
    low_state = DeepMemoryState(*(tuple(t.bfloat16() for t in part) for part in
                                  (deep_state.weights, deep_state.momentum)))
    exact_state = DeepMemoryState(*(tuple(t.float() for t in part) for part in
                                    (low_state.weights, low_state.momentum)))
    for name, call in calls.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, final = call(x, memory.bfloat16(), low_state)
        assert out.dtype == torch.float32, name
        expected, expected_final = call({key: value.float() for key, value in x.items()},
                                        memory.bfloat16().float(), exact_state)
        assert torch.equal(out, expected), name
        for a, b in zip(_flat(final), _flat(expected_final), strict=True):
            assert a.dtype == torch.float32 and torch.equal(a, b), name


def _flat(state: object) -> list[torch.Tensor]:
    if isinstance(state, DeepMemoryState):
        return [*state.weights, *state.momentum]
    return [state]


def test_states_are_searched_and_raised_without_rerunning_init():
    from nestlearn.ops._precision import _autocast_device, _raise_precision
    from nestlearn.state import TreeState, state_dataclass, static_field

    inits = []

    @state_dataclass
    class State(TreeState):
        weights: tuple[torch.Tensor, ...]
        steps: int = static_field(default=0)
        kind: str = static_field(default="memory", init=False)

        def __post_init__(self) -> None:
            inits.append(self)

    state = State((torch.ones(2, dtype=torch.bfloat16),), steps=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # the only tensor is inside the state: it still decides the device
        assert _autocast_device((state,), {}) == "cpu"
    assert _autocast_device((state,), {}) is None
    raised = _raise_precision(state)
    assert raised.weights[0].dtype == torch.float32 and raised.steps == 3
    assert raised.kind == "memory"
    assert len(inits) == 1 and state.weights[0].dtype == torch.bfloat16


def test_device_types_autocast_does_not_know_count_as_off():
    from nestlearn.ops._precision import _autocast_device

    assert _autocast_device((torch.empty(2, device="meta"),), {}) is None
