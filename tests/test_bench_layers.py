import argparse
import json
import sys

import pytest
import torch

from nestlearn.benchmarks import layers
from nestlearn.cli import main
from nestlearn.ops import set_compile

TINY_MODELS = ["--lengths", "16", "--heads", "2", "--chunk-size", "4",
               "--cms-chunk-sizes", "4", "8", "--model-dim", "16", "--model-layers", "1",
               "--window", "4", "--repeats", "1", "--threads", "1", "--no-memory"]


@pytest.fixture
def eager_afterwards():
    yield
    set_compile(None)
    torch._dynamo.reset()


def test_bench_layers_runs_at_a_tiny_size(tmp_path, capsys):
    code = main(["bench", "layers", "--sections", "layers", "models", "decode",
                 "--lengths", "16", "--dim", "16", "--heads", "2",
                 "--chunk-size", "4", "--cms-chunk-sizes", "4", "8", "--model-dim", "16",
                 "--model-layers", "1", "--window", "4", "--decode-contexts", "8", "16",
                 "--decode-steps", "2", "--repeats", "1", "--threads", "1", "--no-memory",
                 "--out", str(tmp_path)])
    assert code == 0
    layers = json.loads((tmp_path / "layers.json").read_text())["rows"]
    assert {row["layer"] for row in layers} == {
        "attention", "transformer-block", "neural-memory", "self-modifying-titans", "cms",
        "hope-block", "hope-attention-block"}
    assert all(row["tok/s"] > 0 and row["note"] == "" for row in layers)
    models = json.loads((tmp_path / "layers-models.json").read_text())["rows"]
    assert {row["arch"] for row in models} == {
        "transformer", "hope", "hope-attention", "titans", "titans-mag"}
    decode = json.loads((tmp_path / "layers-decode.json").read_text())["rows"]
    grows = {row["arch"]: row["state MB"] for row in decode if row["context"] == 16}
    short = {row["arch"]: row["state MB"] for row in decode if row["context"] == 8}
    assert grows["transformer"] == 2 * short["transformer"]  # the KV cache
    assert grows["titans"] == short["titans"]
    # two decoded tokens after an 8- or 16-token prompt: every arch holds more mid-chunk (its
    # memories' pending tokens) or in a longer cache than after the prompt
    assert all(row["largest state MB"] > row["state MB"] for row in decode)
    assert all(row["device"] == "cpu" and row["autocast"] == "off" and row["compile"] == "off"
               and row["compile s"] is None for row in layers + models + decode)
    assert "| arch | context | chunk | inner chunk | device | autocast | compile | ms/token |" \
        in capsys.readouterr().out


def test_chunk_sizes_run_side_by_side_for_the_memories_only(tmp_path, capsys):
    # each cell in a fresh process; which cell gets which size: the test with fakes below
    code = main(["bench", "layers", "--sections", "models", "--archs", "transformer", "titans",
                 *TINY_MODELS, "--chunk-size", "4", "8", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "layers-models.json").read_text())["rows"]
    assert [(row["arch"], row["chunk"]) for row in rows] == [
        ("transformer", "-"), ("titans", 4), ("titans", 8)]
    assert all(row["note"] == "" and row["tok/s"] > 0 for row in rows)
    table = capsys.readouterr().out
    assert "| T | B | chunk | inner chunk | checkpoint segment |" in table
    assert "| 16 | 1 | 8 | - | off | cpu |" in table and "| 16 | 1 | - | - | off | cpu |" in table


def test_configs_follow_each_chunk_size():
    parser = argparse.ArgumentParser()
    layers.add_arguments(parser)
    args = parser.parse_args(["--archs", "transformer", "hope", *TINY_MODELS,
                              "--chunk-size", "4", "8"])
    configs = layers._model_configs(args)
    assert list(configs) == [("transformer", "-"), ("hope", 4), ("hope", 8)]
    for chunk in (4, 8):
        memory = configs["hope", chunk].memory
        assert memory.chunk_size == chunk and memory.inner_chunk_size == chunk
    # the chunk changes no parameter: the matched widths and counts stay the same
    assert configs["hope", 4].dim == configs["hope", 8].dim
    assert (layers.count_parameters(configs["hope", 4])
            == layers.count_parameters(configs["hope", 8]))


def test_hope_s_inner_chunk_is_its_own_option(monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    layers.add_arguments(parser)
    args = parser.parse_args(["--archs", "hope", *TINY_MODELS, "--chunk-size", "4", "8",
                              "--inner-chunk-size", "2"])
    for chunk in (4, 8):
        memory = layers._model_configs(args)["hope", chunk].memory
        assert (memory.chunk_size, memory.inner_chunk_size) == (chunk, 2)
    seen = []

    def fake_cell(args, make, kwargs, mode, threads):
        if "config" in kwargs:
            memory = kwargs["config"]["memory"]
            seen.append((memory["chunk_size"], memory.get("inner_chunk_size")))
        else:  # the workload's own layer
            built = []
            monkeypatch.setattr(layers, "build_layer", lambda name, configs: built.append(
                configs["hope"].memory.inner_chunk_size) or real_build(name, configs))
            layers.make_layer_workload(**kwargs)
            seen.append((kwargs["layer"], *built))
        return {"seconds": 1.0, "first s": 1.0, "peak MB": None, "note": ""}

    real_build = layers.build_layer
    monkeypatch.setattr(layers, "_cell", fake_cell)
    code = main(["bench", "layers", "--sections", "layers", "models",
                 "--layers", "neural-memory", "self-modifying-titans",
                 "--archs", "titans", "hope", "--dim", "16", *TINY_MODELS,
                 "--inner-chunk-size", "2", "--out", str(tmp_path)])
    assert code == 0
    assert seen == [("neural-memory", 2), ("self-modifying-titans", 2), (4, None), (4, 2)]
    rows = json.loads((tmp_path / "layers.json").read_text())["rows"]
    assert [row["inner chunk"] for row in rows] == ["-", 2]
    models = json.loads((tmp_path / "layers-models.json").read_text())["rows"]
    assert [(row["arch"], row["chunk"], row["inner chunk"]) for row in models] == [
        ("titans", 4, "-"), ("hope", 4, 2)]
    assert main(["bench", "layers", "--inner-chunk-size", "0"]) == 2


def test_each_cell_measures_its_own_chunk_size(monkeypatch, tmp_path):
    seen = []

    def fake_cell(args, make, kwargs, mode, threads):
        memory = kwargs["config"]["memory"] if "config" in kwargs else None
        seen.append(kwargs.get("chunk_size") or (memory and memory["chunk_size"]))
        return {"seconds": 1.0, "first s": 1.0, "peak MB": None, "note": ""}

    def fake_decode(measure, config, context, steps, segment, *rest, threads):
        seen.append((config["memory"] and config["memory"]["chunk_size"], segment))
        return {"seconds": 1.0, "first s": 1.0, "state MB": 0.0, "largest state MB": 0.0,
                "note": ""}

    monkeypatch.setattr(layers, "_cell", fake_cell)
    monkeypatch.setattr(layers, "in_fresh_process", fake_decode)
    code = main(["bench", "layers", "--sections", "layers", "models", "decode",
                 "--layers", "attention", "neural-memory", "--archs", "transformer", "titans",
                 "--dim", "16", "--decode-contexts", "8", *TINY_MODELS,
                 "--chunk-size", "1024", "8", "--out", str(tmp_path)])
    assert code == 0
    # layers: attention once, the memory at each size; models, then decode (with its segment)
    assert seen == [1024, 1024, 8, None, 1024, 8, (None, 512), (1024, 1024), (8, 512)]


def test_repeated_chunk_sizes_are_refused(capsys):
    assert main(["bench", "layers", "--chunk-size", "4", "4"]) == 2
    assert "--chunk-size: got 4 4; allowed: distinct values" in capsys.readouterr().err


def test_titans_pytorch_side_by_side_compiled_and_not(tmp_path):
    pytest.importorskip("titans_pytorch", reason="optional bench dependency")
    code = main(["bench", "layers", "--sections", "titans-pytorch", "--chunk-size", "4",
                 "--titans-dim", "16", "--titans-length", "16", "--titans-batch", "1",
                 "--compile", "off", "on", "--compile-backend", "aot_eager",
                 "--repeats", "1", "--threads", "1", "--no-memory", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "layers-titans-pytorch.json").read_text())["rows"]
    assert [(row["implementation"], row["compile"]) for row in rows] == [
        ("nestlearn", "off"), ("nestlearn", "on"), ("titans-pytorch", "off")]
    assert [row["compile s"] is None for row in rows] == [True, False, True]
    assert all(row["note"] == "" for row in rows)
    assert rows[1]["speedup vs titans-pytorch"] == pytest.approx(
        rows[1]["tok/s"] / rows[2]["tok/s"])


def test_titans_pytorch_side_by_side_at_each_chunk_size(tmp_path):
    pytest.importorskip("titans_pytorch", reason="optional bench dependency")
    code = main(["bench", "layers", "--sections", "titans-pytorch", "--chunk-size", "4", "8",
                 "--titans-dim", "16", "--titans-length", "16", "--titans-batch", "1",
                 "--repeats", "1", "--threads", "1", "--no-memory", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "layers-titans-pytorch.json").read_text())["rows"]
    assert [(row["implementation"], row["chunk"]) for row in rows] == [
        ("nestlearn", 4), ("titans-pytorch", 4), ("nestlearn", 8), ("titans-pytorch", 8)]
    for ours, theirs in (rows[:2], rows[2:]):  # each against titans-pytorch at its chunk
        assert ours["max err vs naive (f64)"] < 1e-12
        assert ours["speedup vs titans-pytorch"] == pytest.approx(
            ours["tok/s"] / theirs["tok/s"])
    # each timed in its own process after the same warm-up, both finished without a note
    assert all(row["tok/s"] > 0 and row["note"] == "" and row["warmup"] == 3 for row in rows)


def test_titans_pytorch_side_by_side_with_each_allocator_setting(tmp_path, monkeypatch):
    pytest.importorskip("titans_pytorch", reason="optional bench dependency")
    from nestlearn.benchmarks import titans_compare

    timed, probed = [], []
    fresh = titans_compare.in_fresh_process

    def recording(target, *args, env=None, **kwargs):
        timed.append(env)
        return fresh(target, *args, env=env, **kwargs)

    def probe(make, threads=None, env=None, **kwargs):
        probed.append(env)
        return 1.0

    monkeypatch.setattr(titans_compare, "in_fresh_process", recording)
    monkeypatch.setattr(titans_compare, "peak_memory_mb", probe)
    # what a shell may have set is not the "default" setting: the children start without it
    monkeypatch.setenv("MALLOC_TOP_PAD_", "12345")
    code = main(["bench", "layers", "--sections", "titans-pytorch", "--chunk-size", "4",
                 "--titans-malloc", "default", "tuned", "--titans-dim", "16",
                 "--titans-length", "16", "--titans-batch", "1", "--repeats", "1",
                 "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "layers-titans-pytorch.json").read_text())["rows"]
    assert [(row["implementation"], row["malloc"]) for row in rows] == [
        ("nestlearn", "default"), ("titans-pytorch", "default"),
        ("nestlearn", "tuned"), ("titans-pytorch", "tuned")]
    # each side of a setting timed and probed in a child started with that setting
    default, tuned = titans_compare.DEFAULT_MALLOC, titans_compare.TUNED_MALLOC
    assert timed == probed == [default, default, tuned, tuned]
    assert set(default) == set(tuned) and all(value is None for value in default.values())
    for ours, theirs in (rows[:2], rows[2:]):  # each against titans-pytorch at its setting
        assert ours["speedup vs titans-pytorch"] == pytest.approx(
            ours["tok/s"] / theirs["tok/s"])
    assert all(isinstance(row["page faults/step"], int) and row["note"] == "" for row in rows)


@pytest.mark.parametrize(("args", "message"), [
    (["--sections", "layers", "decode", "--titans-malloc", "tuned"],
     "--titans-malloc: got tuned with --sections layers decode; allowed: tuned with the "
     "titans-pytorch section"),
    (["--sections", "titans-pytorch", "--titans-malloc", "tuned", "tuned"],
     "--titans-malloc: got tuned tuned; allowed: distinct values")])
def test_titans_malloc_is_refused_where_it_would_do_nothing(args, message, capsys):
    assert main(["bench", "layers", *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_layers_refuses_unknown_names(capsys):
    assert main(["bench", "layers", "--layers", "lstm"]) == 2
    assert "--layers" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "value"), [("--compile", "maybe"), ("--device", "tpu"),
                                               ("--autocast", "fp16"),
                                               ("--compile-backend", "tvm")])
def test_bench_layers_refuses_bad_mode_values(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "layers", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and repr(value) in err


def test_device_cuda_without_cuda_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert main(["bench", "layers", "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("nestlearn bench: error: --device: got 'cuda'; allowed: cpu "
                   "(torch.cuda.is_available() is false here: no CUDA device or a CPU-only "
                   "torch)")
    assert not out.exists()


@pytest.mark.parametrize(("sets", "message"), [
    (["--sections", "models"], "--cuda-graph: got 'on' with --device cpu; allowed: 'on' with "
                               "--device cuda (CUDA graphs need a GPU), or 'off'"),
    (["--sections", "decode", "--device", "cuda"],
     "--cuda-graph: got 'on' with --sections decode; allowed: 'on' with the models section, "
     "the one it applies to"),
    (["--sections", "models", "--device", "cuda", "--checkpoint-segment", "off", "512"],
     "--cuda-graph: got 'on' with --checkpoint-segment off 512; allowed: 'on' with "
     "--checkpoint-segment off (activation checkpointing reads the CUDA RNG state, which a "
     "capture refuses)"),
])
def test_cuda_graph_on_is_refused_where_it_cannot_apply(sets, message, monkeypatch, capsys,
                                                        tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # refused before any use
    out = tmp_path / "out"
    assert main(["bench", "layers", *sets, "--cuda-graph", "off", "on", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"nestlearn bench: error: {message}"
    assert not out.exists()


def test_cuda_graph_modes_pair_with_every_compile_value_in_the_models_section():
    parser = argparse.ArgumentParser()
    layers.add_arguments(parser)
    args = parser.parse_args(["--compile", "off", "on", "--cuda-graph", "off", "on"])
    assert [(m.compile, m.cuda_graph) for m in layers._modes(args, graphs=True)] == [
        (False, False), (False, True), (True, False), (True, True)]
    assert [m.cuda_graph for m in layers._modes(args)] == [False, False]
    assert "cuda graph" in layers.MODEL_COLUMNS


def test_graphed_model_workload_replays_the_eager_step(monkeypatch):
    # the stand-in replays by rerunning (a CUDA graph needs a GPU): the workload is captured
    # before it is returned, and each later call gives the eager workload's loss and
    # gradients (same seed: the same model and ids)
    from graph_standin import ReplayByRerun

    made, models = [], []

    class StandinGraphed(layers.GraphedBackward):
        def __init__(self, loss_fn, parameters, **options):
            parameters = list(parameters)
            super().__init__(loss_fn, parameters, backend=ReplayByRerun(parameters))
            made.append(self)

    build = layers.build_model
    monkeypatch.setattr(layers, "build_model", lambda config: models.append(build(config))
                        or models[-1])
    monkeypatch.setattr(layers, "GraphedBackward", StandinGraphed)
    kwargs = model_kwargs("hope")
    models.clear()  # matching the width built some
    eager = layers.make_model_workload(**kwargs)
    graphed = layers.make_model_workload(**kwargs, cuda_graph=True)
    assert made[0].backend.captures == 1
    eager_model, graphed_model = models
    for _ in range(2):
        torch.testing.assert_close(graphed(), eager(), rtol=1e-6, atol=0)
        for (name, p), q in zip(eager_model.named_parameters(), graphed_model.parameters(),
                                strict=True):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)
        with torch.no_grad():  # new weights for both, as after an optimizer step
            for p, q in zip(eager_model.parameters(), graphed_model.parameters(), strict=True):
                p.add_(0.01)
                q.add_(0.01)
    assert made[0].backend.captures == 1


def test_compile_off_and_on_side_by_side_at_batch_8(tmp_path, capsys):
    # aot_eager traces the graph inductor would compile, in seconds
    code = main(["bench", "layers", "--sections", "models", "--archs", "titans",
                 "--batch", "8", "--compile", "off", "on", "--compile-backend", "aot_eager",
                 *TINY_MODELS, "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "layers-models.json").read_text())["rows"]
    assert [(row["arch"], row["compile"]) for row in rows] == [("titans", "off"),
                                                               ("titans", "on")]
    off, on = rows
    assert off["compile s"] is None and on["compile s"] > 0
    assert on["compile s"] == on["first call s"] and off["first call s"] > 0
    assert all(row["B"] == 8 and row["device"] == "cpu" and row["autocast"] == "off"
               and row["tok/s"] > 0 and row["note"] == "" for row in rows)
    table = capsys.readouterr().out
    assert ("| device | autocast | compile | cuda graph | tok/s | compile s | peak MB | note |"
            in table)
    assert "| titans | " in table and "| cpu | off | on | off |" in table


def test_bf16_autocast_on_cpu_runs_every_section(tmp_path):
    code = main(["bench", "layers", "--sections", "layers", "models", "decode",
                 "--layers", "neural-memory", "attention", "--archs", "titans", "hope",
                 "--dim", "16", "--autocast", "bf16", "--decode-contexts", "8",
                 "--decode-steps", "2", *TINY_MODELS, "--out", str(tmp_path)])
    assert code == 0
    for name in ("layers", "layers-models", "layers-decode"):
        rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        assert rows and all(row["autocast"] == "bf16" and row["note"] == "" for row in rows)


def model_kwargs(arch):
    """The tiny ``arch``'s workload arguments, as ``bench layers`` builds them."""
    parser = argparse.ArgumentParser()
    layers.add_arguments(parser)
    args = parser.parse_args(["--archs", arch, *TINY_MODELS])
    config = next(config for (name, _), config in layers._model_configs(args).items()
                  if name == arch)
    return {"config": config.to_dict(), "length": 16, "batch": 2}


def test_a_failed_compile_is_named_in_the_note(monkeypatch, eager_afterwards):
    steps = [sys.modules["nestlearn.ops.deep_memory"]._chunk_step,
             sys.modules["nestlearn.nn.self_modifying"]._stacked_chunk_step]

    def broken(fn, **kwargs):
        def fails(*args, **kw):
            raise RuntimeError("no C++ compiler found")
        return fails

    monkeypatch.setattr(torch, "compile", broken)
    for step in steps:
        monkeypatch.setattr(step, "compiled", {})
        monkeypatch.setattr(step, "failed", False)
    mode = layers.RunMode(compile=True, backend="aot_eager")
    result = layers.measure_cell(layers.make_model_workload, model_kwargs("titans"), mode,
                                 repeats=1, memory=False)
    assert result["note"] == ("compile failed: torch.compile of _chunk failed, running it "
                              "eagerly from now on (RuntimeError: no C++ compiler found)")
    assert result["seconds"] > 0


def test_a_model_without_a_chunk_step_says_nothing_was_compiled(eager_afterwards):
    mode = layers.RunMode(compile=True, backend="aot_eager")
    result = layers.measure_cell(layers.make_model_workload, model_kwargs("transformer"),
                                 mode, repeats=1, memory=False)
    assert result["note"] == "nothing compiled (no chunk step)"
