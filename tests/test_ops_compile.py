"""The compiled chunk step (``nestlearn.ops.set_compile``) against the eager one, in float64,
and its eager fallback. The fast tests trace with the "aot_eager" backend (the graph that
inductor would compile, in seconds); the inductor test is slow (minutes of C++ compiling)."""

from __future__ import annotations

import gc
import io
import logging
import sys
import warnings
import weakref

import pytest
import torch

import nestlearn.ops
from model_cases import random_ids, tiny_model
from nestlearn.errors import NestlearnError
from nestlearn.models import generate, token_reader
from nestlearn.ops import set_compile
from nestlearn.ops.deep_memory import DeepMemoryState, deep_memory, deep_memory_update
from nestlearn.training.builders import build_run_model
from nestlearn.training.runconfig import RunConfig, TrainConfig
from test_nn_cms import assert_states_close, make_layer, random_input
from test_nn_self_modifying import inputs, make, run_with_grads
from test_ops_deep_memory import make_case

deep_memory_module = sys.modules["nestlearn.ops.deep_memory"]
self_modifying_module = sys.modules["nestlearn.nn.self_modifying"]
cms_module = sys.modules["nestlearn.nn.cms"]


@pytest.fixture(autouse=True)
def eager_afterwards():
    yield
    set_compile(None)
    torch._dynamo.reset()


def outputs_and_grads(case, with_update=True, **options):
    leaves = [case[name] for name in ("q", "k", "v")] + list(case["weights"])
    leaves = [leaf.detach().requires_grad_() for leaf in leaves]
    q, k, v, *weights = leaves
    momentum = case["momentum"]
    state = DeepMemoryState(tuple(weights), momentum)
    out, final = deep_memory(q, k, v, case["alpha"], case["eta"], case["theta"],
                             initial_state=state, output_final_state=True, **options)
    loss = out.square().sum() + sum(w.sum() for w in final.weights)
    if with_update:
        update = deep_memory_update(state, k, v, case["alpha"], case["eta"], case["theta"],
                                    dgd=options.get("dgd", False))
        loss = loss + sum(w.square().sum() for w in update.weights)
    return [out.detach(), *[w.detach() for w in final.weights],
            *torch.autograd.grad(loss, leaves)]


def assert_equal_to_eager(backend, length, with_update, **options):
    case = make_case(length=length, momentum=True, seed=3)
    eager = outputs_and_grads(case, with_update, **options)
    set_compile(True, backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = outputs_and_grads(case, with_update, **options)
    assert not [w for w in caught if "running it eagerly" in str(w.message)]
    assert not deep_memory_module._chunk_step.failed
    assert backend in deep_memory_module._chunk_step.compiled
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_traced_chunk_step_equals_eager():
    # whole chunks only: one shape, one trace (each new shape is traced again)
    assert_equal_to_eager("aot_eager", length=8, with_update=False, chunk_size=4, dgd=True)


@pytest.mark.slow
@pytest.mark.parametrize("dgd", [False, True])
def test_traced_chunk_step_equals_eager_on_a_short_last_chunk_and_the_update(dgd):
    assert_equal_to_eager("aot_eager", length=11, with_update=True, chunk_size=4, dgd=dgd)


@pytest.mark.slow
def test_inductor_chunk_step_equals_eager():
    assert_equal_to_eager("inductor", length=11, with_update=True, chunk_size=4, dgd=True)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize(("inner_chunk", "step_name"), [
    (4, "_stacked_chunk_step"), (3, "_inner_chunk_step")])
def test_compiled_stacked_chunk_equals_eager(backend, inner_chunk, step_name, monkeypatch):
    # the self-modifying layer's whole chunk (read, gates, targets, chunk step) as one graph:
    # all memories stacked when they share the chunk, the inner ones alone when not
    step = getattr(self_modifying_module, step_name)
    monkeypatch.setattr(step, "compiled", {})  # compiled here, not by an earlier test
    monkeypatch.setattr(step, "failed", False)
    layer = make(inner_chunk_size=inner_chunk)
    x = inputs(length=13)
    eager = run_with_grads(layer, x, (13,))
    set_compile(True, backend=backend)
    compiled = run_with_grads(layer, x, (13,))
    assert backend in step.compiled and not step.failed
    for got, want in zip(torch.utils._pytree.tree_leaves(compiled),
                         torch.utils._pytree.tree_leaves(eager), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("mlp", ["swiglu", pytest.param("gelu", marks=pytest.mark.slow)])
def test_compiled_cms_level_piece_equals_eager(backend, mlp):
    # each level's piece (MLP, local error, step ceiling, gradient factors) as one graph;
    # chained segments cut pieces short of the chunks, a second shape for the graph
    layer = make_layer("sequential", mlp, chunk_sizes=(2, 4), inner_lr=(0.05, 0.03),
                       chunk_step=1.0)

    def run():
        x = random_input(11).requires_grad_()
        y1, state = layer(x[:, :5])
        y2, state = layer(x[:, 5:], state)
        y = torch.cat([y1, y2], 1)
        return y, state, torch.autograd.grad(y.pow(2).sum(), [x, *layer.parameters()])

    y, state, grads = run()
    set_compile(True, backend=backend)
    y_compiled, state_compiled, grads_compiled = run()
    step = cms_module._level_piece_step
    assert backend in step.compiled and not step.failed
    torch.testing.assert_close(y_compiled, y, rtol=1e-10, atol=1e-12)
    assert_states_close(state_compiled, state)
    for got, want in zip(grads_compiled, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_token_step_equals_eager(backend):
    # decoding's per-token step of the deep memory (momentum, DGD), eager and compiled
    from test_decode_step import test_token_steps_equal_the_chunkwise_op as token_steps

    options = {"momentum": True, "depth": 2, "dgd": True}
    set_compile(True, backend=backend)
    token_steps(options)  # compiled steps equal the chunkwise op at every token
    step = deep_memory_module._token_step_compiled
    assert backend in step.compiled and not step.failed


@pytest.mark.slow
def test_training_evaluation_and_decoding_stay_within_the_recompile_limit():
    # every compiled step meets several shapes, ranks and grad modes; none may run out of
    # graphs (dynamo would then log a warning and run it eagerly)
    from model_cases import tiny_config
    from nestlearn.models import build_model
    from nestlearn.models.generation import generate

    torch.manual_seed(0)
    model = build_model(tiny_config("hope", chunk=4))
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    set_compile(True, backend="aot_eager")
    # dynamo's own logger (it need not propagate to the root logger that caplog reads); with
    # nestlearn.ops._compile.RECOMPILE_LIMIT at 2 this run logs the hit
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        logits, _ = model(ids)
        logits.square().mean().backward()
        with torch.no_grad():
            model(ids[:, :7])
            # one token read by the model itself: the deep memory's token step compiled alone
            _, state = model.eval()(ids[:1, :9])
            model(ids[:1, 9:10], state)
            # generate reads tokens with the whole model compiled (token_reader)
            generate(model, ids[:1, :9], 6, temperature=0)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    assert "recompile_limit" not in log.getvalue()
    assert self_modifying_module._stacked_chunk_step.compiled
    assert cms_module._level_piece_step.compiled
    assert deep_memory_module._token_step_compiled.compiled
    reader = token_reader(model)
    assert "aot_eager" in reader.compiled and not reader.failed


def test_a_failing_compile_warns_once_and_runs_eagerly(monkeypatch):
    case = make_case(length=7, momentum=False, seed=1)
    eager = outputs_and_grads(case, chunk_size=3)
    step = deep_memory_module._chunk_step
    calls = []

    def broken(fn, **kwargs):
        def fails(*args, **kw):
            calls.append(1)
            raise RuntimeError("no C++ compiler found\nmore detail")
        return fails

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(step, "compiled", {})
    monkeypatch.setattr(step, "failed", False)
    set_compile(True)
    with pytest.warns(RuntimeWarning, match=r"torch.compile of _chunk failed, running it "
                                            r"eagerly from now on \(RuntimeError: no C\+\+ "
                                            r"compiler found\)$") as caught:
        fallback = outputs_and_grads(case, chunk_size=3)
    assert len(caught) == 1 and len(calls) == 1  # tried once, then eager for every chunk
    for got, want in zip(fallback, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_error_from_torch_compile_itself_also_falls_back(monkeypatch):
    case = make_case(length=7, momentum=False, seed=1)
    eager = outputs_and_grads(case, chunk_size=3)
    step = deep_memory_module._chunk_step

    def refuses(fn, *, backend, recompile_limit):
        raise TypeError("this torch cannot compile here")

    monkeypatch.setattr(torch, "compile", refuses)
    monkeypatch.setattr(step, "compiled", {})
    monkeypatch.setattr(step, "failed", False)
    set_compile(True)
    with pytest.warns(RuntimeWarning, match=r"torch.compile of _chunk failed, running it "
                                            r"eagerly from now on \(TypeError: "):
        fallback = outputs_and_grads(case, chunk_size=3)
    for got, want in zip(fallback, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_without_a_per_function_limit_dynamo_s_limit_is_raised_while_a_step_runs(monkeypatch):
    # torch 2.11's torch.compile takes no recompile_limit: dynamo's global one is raised
    # around each call instead, and restored after
    real_compile, limits = torch.compile, []

    def compile_without_limit(fn, *, backend):
        compiled = real_compile(fn, backend=backend)

        def run(*args, **kwargs):
            limits.append(torch._dynamo.config.recompile_limit)
            return compiled(*args, **kwargs)
        return run

    monkeypatch.setattr(torch, "compile", compile_without_limit)
    step = deep_memory_module._chunk_step
    monkeypatch.setattr(step, "compiled", {})
    monkeypatch.setattr(step, "failed", False)
    before = torch._dynamo.config.recompile_limit
    case = make_case(length=7, momentum=False, seed=1)
    eager = outputs_and_grads(case, chunk_size=3)
    set_compile(True, backend="aot_eager")
    compiled = outputs_and_grads(case, chunk_size=3)
    assert not step.failed and "aot_eager" in step.compiled  # compiled, no fallback
    assert limits and set(limits) == {max(before, nestlearn.ops._compile.RECOMPILE_LIMIT)}
    assert torch._dynamo.config.recompile_limit == before
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)

def test_switch_from_the_environment_and_its_bad_values(monkeypatch):
    monkeypatch.setenv("NESTLEARN_COMPILE", "1")
    assert nestlearn.ops.compile_enabled()
    set_compile(False)  # the switch wins over the environment
    assert not nestlearn.ops.compile_enabled()
    monkeypatch.setenv("NESTLEARN_COMPILE", "0")
    set_compile(None)
    assert not nestlearn.ops.compile_enabled()
    with pytest.raises(NestlearnError, match=r"^enabled: got 1; allowed: None, true or false"):
        set_compile(1)
    with pytest.raises(NestlearnError, match=r"^backend: got 'tvm'"):
        set_compile(True, backend="tvm")


def test_run_config_switches_compiling_on():
    with pytest.raises(NestlearnError, match=r"^train\.compile: got 'yes'"):
        TrainConfig(compile="yes")
    config = RunConfig(train=TrainConfig(compile=True))
    assert not nestlearn.ops.compile_enabled()
    build_run_model(config, torch.device("cpu"))
    assert nestlearn.ops.compile_enabled()


def test_compiled_momentum_state_step_has_every_gradient_of_the_eager_one():
    # torch 2.11's compile dropped the gradient of an output updated in place through a view
    # (the incoming weight gradient): every one of the eight inputs' gradients is compared.
    # It guards that torch: on 2.13 (CI's) the old in-place step passes too.
    torch.manual_seed(0)
    batch, heads, rows, cols, chunk = 2, 2, 5, 4, 6
    shapes = [(batch, heads, rows, cols)] * 2 + [(batch, heads, chunk, cols)] + \
        [(batch, heads, chunk, rows)] * 2 + [(batch, heads, 1, 1)] * 3
    values = [torch.randn(shape, dtype=torch.float64) for shape in shapes]

    def loss(*inputs):
        weight, momentum = deep_memory_module._MomentumStateStep.apply(*inputs)
        return (weight * weight.sin()).sum() + (momentum * momentum.cos()).sum()

    def grads(fn):
        leaves = [value.clone().requires_grad_() for value in values]
        return torch.autograd.grad(fn(*leaves), leaves)

    for got, want in zip(grads(torch.compile(loss, backend="aot_eager")), grads(loss),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# One block: a graph per shape of the whole model is traced (HOPE's chunk ends make several),
# and the second block of the tiny models would only double the tracing time.
# (The slow suite keeps a two-block HOPE: the state handed from block to block.)
@pytest.mark.parametrize(("arch", "cms", "layers"), [
    ("hope", None, 1), ("titans", None, 1), ("transformer", None, 1),
    pytest.param("hope", None, 2, marks=pytest.mark.slow),
    pytest.param("hope", {"teach_signal": "lm", "chunk_sizes": (4, 8)}, 1,
                 marks=pytest.mark.slow)])
def test_compiled_decoding_reads_each_token_with_one_graph_and_the_same_values(arch, cms,
                                                                              layers):
    model = tiny_model(arch, layers=layers, **({"cms": cms} if cms else {})).eval()
    ids = random_ids(2, 7)
    assert token_reader(model) is model  # compiling off: the model itself
    eager_ids, eager_logits = generate(model, ids, 9, temperature=0, return_logits=True)
    set_compile(True, backend="aot_eager")
    ids_, logits = generate(model, ids, 9, temperature=0, return_logits=True)
    reader = token_reader(model)
    assert reader is not model and not reader.failed and "aot_eager" in reader.compiled
    assert torch.equal(ids_, eager_ids)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-12, atol=1e-14)


def test_a_compiled_token_reader_does_not_keep_its_model_alive():
    set_compile(True, backend="aot_eager")
    model = tiny_model("titans").eval()
    token_reader(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("ends_a_chunk", [False, True])
def test_a_decoded_cms_token_traces_without_graph_breaks(ends_a_chunk):
    # Compiled decoding traces the whole forward as one graph: holding a token (or releasing
    # the held ones at a chunk end) must not break it
    layer = make_layer(chunk_sizes=(2, 3, 6), chunk_step=1.0)
    x = random_input(6)
    with torch.no_grad():
        _, state = layer(x[:, :5 if ends_a_chunk else 4])
        explained = torch._dynamo.explain(layer)(x[:, 5:6] if ends_a_chunk else x[:, 4:5],
                                                 state)
    assert any(level.pending is not None for level in state.levels)
    assert explained.graph_break_count == 0, explained.break_reasons
