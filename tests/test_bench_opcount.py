"""``nestlearn bench ops-count``: op, sync and FLOP counts of a training step, deterministic."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from model_cases import TINY_BENCH_MODEL, tiny_config
from nestlearn.benchmarks.opcount import (
    OpCounter,
    add_arguments,
    count_decode,
    count_step,
    model_configs,
    parametric_weights,
    profiled_kernels,
    profiled_syncs,
    skeleton_config,
)
from nestlearn.cli import main


def test_the_counter_counts_each_kind_of_host_read():
    x = torch.ones(3)
    with OpCounter() as counter:
        x.sum().item()
        bool(x.any())
        x.tolist()
        torch.nonzero(x)
    assert counter.total_syncs == 4
    assert counter.syncs["tolist"] == 1
    assert counter.syncs["_local_scalar_dense"] == 2
    x.tolist()  # outside: the method is restored
    assert counter.total_syncs == 4
    assert torch.Tensor.tolist is not None and "counted" not in torch.Tensor.tolist.__name__


def test_views_are_ops_but_not_kernels():
    x = torch.ones(4, 4)
    with OpCounter() as counter:
        (x.t().reshape(16) * 2).view(4, 4).transpose(0, 1).contiguous()
    assert counter.ops["t"] == 1 and counter.ops["mul"] == 1
    assert "t" not in counter.kernels and "transpose" not in counter.kernels
    assert counter.kernels["mul"] == 1
    assert counter.total_kernels < counter.total_ops


def test_counts_include_the_backward_and_a_linear_model_is_all_parametric():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False),
                                torch.nn.Linear(16, 4, bias=False))
    x = torch.randn(5, 8, requires_grad=True)
    with OpCounter() as ops:
        model(x).sum().backward()
    assert ops.ops["mm"] == 2 + 4  # forward: 2; backward: input and weight gradients
    assert ops.flops == 5 * 6 * parametric_weights(model)


def test_cpu_attention_flops_are_counted():
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    with OpCounter() as ops:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    forward = 2 * (2 * 2 * 8 * 8 * 4)  # scores and their product with v, per head
    assert ops.flops == forward + 2.5 * forward  # torch's backward formula: 5 such products


@pytest.mark.parametrize(("arch", "chunk"), [("transformer", None), ("titans", None),
                                            ("hope", None), ("hope", 4)])
def test_a_step_count_is_deterministic_and_sync_free(arch, chunk):
    # hope with one chunk for every memory takes the stacked path (its gate scale once
    # came from Python data: a copy from the host on a GPU)
    config = tiny_config(arch, chunk=chunk)
    first = count_step(config, length=12, batch=2)
    second = count_step(config, length=12, batch=2, seed=3)  # other values, same ops
    assert first["ops/step"] == second["ops/step"] > first["kernels/step"] > 0
    assert first["top kernels"] == second["top kernels"]
    assert first["syncs/step"] == 0
    assert first["param GFLOP/tok"] > 0 and first["in-context GFLOP/tok"] > 0


def test_cli_writes_a_table_and_json(tmp_path, capsys):
    code = main(["bench", "ops-count", "--archs", "transformer", "titans", "--length", "16",
                 *TINY_BENCH_MODEL, "--chunk-size", "8", "--cms-chunk-sizes", "4", "8",
                 "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| arch | params | T | chunk | inner chunk | ops/step | kernels/step | syncs/step" in out
    rows = json.loads((tmp_path / "ops-count.json").read_text())["rows"]
    assert [row["arch"] for row in rows] == ["transformer", "titans"]
    assert [(row["chunk"], row["inner chunk"]) for row in rows] == [("-", "-"), (8, "-")]
    assert all(row["syncs/step"] == 0 and row["ops/step"] > 0 for row in rows)
    assert "tok/s" not in rows[0]  # timing only with --timing


def test_a_skeleton_issues_the_same_ops_with_almost_no_weights():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model-layers", "2", "--chunk-size", "8", "--cms-chunk-sizes",
                              "8", "16", "--window", "16"])
    for arch, config in model_configs(args).items():
        skeleton = skeleton_config(config)
        assert skeleton.dim == 2 * config.heads and skeleton.layers == config.layers
        full, bare = count_step(config, 24, 1), count_step(skeleton, 24, 1)
        assert bare["ops/step"] == full["ops/step"], arch
        assert bare["kernels/step"] == full["kernels/step"], arch
        assert bare["top kernels"] == full["top kernels"], arch
        assert bare["params"] * 50 < full["params"], arch
        assert bare["matmul GFLOP/step"] * 50 < full["matmul GFLOP/step"], arch
        # and decodes with the same ops (what `decode skeleton ms/token` times)
        full_decode, bare_decode = (count_decode(c, 20, 1, 6) for c in (config, skeleton))
        for key in ("decode ops/token", "decode kernels/token", "decode top kernels"):
            assert bare_decode[key] == full_decode[key], (arch, key)


def test_timing_reports_the_skeleton_s_share(tmp_path, capsys):
    code = main(["bench", "ops-count", "--archs", "titans", "--length", "16",
                 *TINY_BENCH_MODEL, "--chunk-size", "8", "--timing", "--repeats", "1",
                 "--out", str(tmp_path)])
    assert code == 0
    assert "| skeleton s | fixed share |" in capsys.readouterr().out
    row = json.loads((tmp_path / "ops-count.json").read_text())["rows"][0]
    seconds = row["T"] / row["tok/s"]
    assert row["skeleton s"] > 0
    assert row["fixed share"] == pytest.approx(row["skeleton s"] / seconds)


def test_timing_with_decode_tokens_times_decoding_and_its_skeleton(tmp_path, capsys,
                                                                   monkeypatch):
    from nestlearn.benchmarks import opcount

    timed = []

    def fake_time_call(fn, repeats=3, warmup=1, device="cpu"):
        out = fn()
        timed.append(out)
        return 0.5 if len(timed) % 2 else 0.25  # the arch's decode, then its skeleton's

    code = main(["bench", "ops-count", "--archs", "titans", "--length", "7",
                 *TINY_BENCH_MODEL, "--chunk-size", "4", "--decode-tokens", "5", "--timing",
                 "--repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    assert "| decode ms/token | decode skeleton ms/token | decode fixed share |" \
        in capsys.readouterr().out
    row = json.loads((tmp_path / "ops-count.json").read_text())["rows"][0]
    assert row["decode ms/token"] > 0 and row["decode skeleton ms/token"] > 0
    assert row["decode fixed share"] == pytest.approx(
        row["decode skeleton ms/token"] / row["decode ms/token"])
    # the timer runs the generation it counts: the prompt's last token and 5 new ones (the
    # rest of the 7-token prompt read before, untimed), per token over the 5
    monkeypatch.setattr(opcount, "time_call", fake_time_call)
    config = model_configs(argparse.Namespace(
        archs=["titans"], vocab_size=256, model_dim=16, model_layers=1, heads=2,
        chunk_size=4, inner_chunk_size=None, cms_chunk_sizes=[4, 8], window=8))["titans"]
    columns = opcount.decode_timing(config, 7, 1, 5, repeats=1)
    assert [t.shape for t in timed] == [(1, 6), (1, 6)]
    assert columns == {"decode ms/token": 100.0, "decode skeleton ms/token": 50.0,
                       "decode fixed share": 0.5}


def test_hope_s_inner_chunk_is_its_own_option():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    tiny = ["--archs", "hope", "--model-dim", "16", "--model-layers", "1", "--heads", "2",
            "--chunk-size", "8", "--cms-chunk-sizes", "4", "8"]
    same = model_configs(parser.parse_args(tiny))["hope"]
    own = model_configs(parser.parse_args([*tiny, "--inner-chunk-size", "4"]))["hope"]
    assert (same.memory.chunk_size, same.memory.inner_chunk_size) == (8, 8)
    assert (own.memory.chunk_size, own.memory.inner_chunk_size) == (8, 4)
    # fewer tokens per inner step: more inner steps, so more kernels per training step
    assert (count_step(own, 16, 1)["kernels/step"]
            > count_step(same, 16, 1)["kernels/step"])


def test_cli_refuses_unknown_archs_and_bad_sizes(capsys):
    assert main(["bench", "ops-count", "--archs", "lstm"]) == 2
    assert "--archs: got 'lstm'" in capsys.readouterr().err
    assert main(["bench", "ops-count", "--length", "0"]) == 2
    assert "--length: got 0" in capsys.readouterr().err
    assert main(["bench", "ops-count", "--inner-chunk-size", "0"]) == 2
    assert "--inner-chunk-size: got 0" in capsys.readouterr().err


def test_decode_counts_are_per_token_and_sync_free(tmp_path, capsys):
    code = main(["bench", "ops-count", "--archs", "transformer", "hope", "--length", "6",
                 *TINY_BENCH_MODEL, "--chunk-size", "4", "--cms-chunk-sizes", "2", "4",
                 "--decode-tokens", "5", "--out", str(tmp_path)])
    assert code == 0
    assert "decode kernels/token" in capsys.readouterr().out
    rows = json.loads((tmp_path / "ops-count.json").read_text())["rows"]
    for row in rows:
        # one host read per generate call: its check of the prompt's ids, none per token
        assert row["decode tokens"] == 5 and row["decode syncs/token"] * 5 == 1
        assert 0 < row["decode kernels/token"] < row["kernels/step"]


def test_negative_decode_tokens_is_refused(capsys):
    code = main(["bench", "ops-count", "--archs", "transformer", "--decode-tokens", "-1"])
    captured = capsys.readouterr()
    assert code != 0 and "--decode-tokens" in captured.err + captured.out


def test_profiled_kernels_count_the_innermost_computing_ops():
    a, b = torch.randn(4, 3), torch.randn(3, 5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = (a @ b).t().contiguous() + 1  # mm, the copy inside contiguous, add
        y.view(-1).unsqueeze(0).transpose(0, 1)  # views only
    assert profiled_kernels(prof.events()) == 3


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_counts_each_side_in_a_fresh_process(backend, tmp_path, capsys):
    code = main(["bench", "ops-count", "--archs", "titans", "--length", "16",
                 *TINY_BENCH_MODEL, "--chunk-size", "8", "--compiled", "--compile-backend",
                 backend, "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    assert "profiled kernels compiled | compile s" in capsys.readouterr().out
    row = json.loads((tmp_path / "ops-count.json").read_text())["rows"][0]
    assert row["profiled kernels eager"] > 0 and row["compile s"] > 0
    assert row["note"] == ""  # no step fell back to eager
    if backend == "inductor":  # fused element-wise kernels: fewer per step (BENCHMARKS.md's
        # round 4 at T=2048; here two chunks, the rest of the model eager)
        assert row["profiled kernels compiled"] < row["profiled kernels eager"]
    else:  # tracing alone runs the same aten ops
        assert row["profiled kernels compiled"] > row["profiled kernels eager"] / 2


def test_profiled_syncs_see_the_reads_inside_autograd_formulas():
    # cumprod's backward reads "any zero?" with .item() (a GPU sync), but not while a
    # dispatch mode is active: only the profiler's count sees it
    x = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)

    def step():
        torch.cumprod(x, dim=-1).sum().backward()

    with OpCounter() as ops:
        step()
    assert ops.total_syncs == 0
    assert profiled_syncs(step)["_local_scalar_dense"] >= 1


def test_a_tensor_of_python_data_counts_as_a_sync_and_a_scalar_does_not():
    x = torch.zeros(3)
    with OpCounter() as ops:
        x[0] = 0.5  # a 0-dim host scalar: filled on the device, no wait
    assert ops.total_syncs == 0
    with OpCounter() as ops:
        torch.tensor([0.5, 1.0]) * x[:2]  # on a GPU: a copy from the host that waits
    assert ops.syncs == {"lift_fresh": 1}


def test_a_read_nested_in_another_sync_op_counts_once():
    x, repeats = torch.arange(3.0), torch.tensor([1, 2, 0])
    with OpCounter() as ops:
        torch.repeat_interleave(x, repeats)
    assert profiled_syncs(lambda: torch.repeat_interleave(x, repeats)) == ops.syncs
    assert ops.total_syncs == 1


def _row_or_failure(arch, config, args):
    if arch == "titans":
        raise ValueError("no such kernel")
    return {"arch": arch, "T": args.length, "B": args.batch, "dim": config.dim, "note": ""}


def test_rows_per_arch_in_fresh_processes_keep_going_past_a_failure(tmp_path):
    import argparse

    from nestlearn.benchmarks.opcount import add_gpu_arguments, rows_per_arch_in_fresh_processes

    parser = argparse.ArgumentParser()
    add_gpu_arguments(parser)
    args = parser.parse_args(["--archs", "transformer", "titans", "--model-dim", "32",
                              "--model-layers", "1", "--heads", "2", "--length", "8",
                              "--out", str(tmp_path)])
    rows = rows_per_arch_in_fresh_processes("probe", ["arch", "dim", "note"], args, "probing",
                                            _row_or_failure)
    assert [row["arch"] for row in rows] == ["transformer", "titans"]
    assert rows[0]["dim"] == 32 and rows[0]["note"] == ""
    assert rows[1]["note"].startswith("failed: ") and "no such kernel" in rows[1]["note"]
    assert json.loads((tmp_path / "probe.json").read_text())["rows"] == rows
