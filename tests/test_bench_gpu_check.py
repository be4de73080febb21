"""bench/gpu_parity.py and bench/gpu_check.sh, on CPU: what can be checked without a GPU
(the parity script at tiny sizes, its refusals, the check script's parts and summary)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import nestlearn

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--batch", "1", "--length", "11", "--heads", "1", "--dim", "4",
        "--hidden", "6", "--chunk-size", "4"]
# the models as `nestlearn train` builds them
CHUNKS = "--chunk-size 16 --inner-chunk-size 16 --cms-chunk-sizes 16 64"
OPS = ("deep_memory", "deep_memory dgd", "titans_linear", "delta_rule", "linear_attention")


def load_script(name: str):
    """bench/NAME.py as a module (the bench folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_parity():
    return load_script("gpu_parity")


def table(out: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in out.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_parity_script_passes_on_cpu_at_tiny_sizes(gpu_parity, compiled, capsys):
    # compiled: the deep memory's chunk step traced by aot_eager (about 40 s here)
    assert gpu_parity.main([*TINY, *(["--compile", "aot_eager"] if compiled else [])]) == 0
    rows = table(capsys.readouterr().out)
    assert set(rows) == {*OPS, *(["deep_memory dgd, compiled (aot_eager)"] if compiled else [])}
    for label, (outputs, grads, ok) in rows.items():
        assert float(outputs) < 1e-12 and float(grads) < 1e-12 and ok == "yes", label
    torch._dynamo.reset()


def test_parity_script_fails_above_its_tolerance(gpu_parity, capsys):
    # rounding alone is above zero: every op is reported and the exit code says so
    assert gpu_parity.main([*TINY, "--tolerance", "0"]) == 1
    out = capsys.readouterr().out
    assert set(table(out)) == set(OPS) and "above tolerance: " in out


def test_parity_script_refuses_cuda_without_it(gpu_parity, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_parity.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("gpu_parity: error: --device: got 'cuda'; "
                                              "allowed: cpu")


def test_check_script_runs_every_part_under_its_limit_and_sums_up(tmp_path):
    # Without CUDA (hidden here even on a GPU machine) the CUDA parts exit 2 at once and the
    # profile is stopped at a 1 s limit: every part still runs and the summary says so.
    parts = ["parity", "compile-parity", "streaming", "profile", "graph", "train-graph",
             "models", "decode"]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "PYTHONPATH": str(Path(nestlearn.__file__).parents[1]), "CUDA_VISIBLE_DEVICES": "",
           "PROFILE_S": "1", "OMP_NUM_THREADS": "1", "CHUNKS": CHUNKS, "PARTS": " ".join(parts)}
    script = ROOT / "bench" / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    result = subprocess.run([str(script)], env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary[:len(parts)]] == parts
    profile = parts.index("profile")
    assert "stopped at the 1s limit" in summary[profile]
    assert summary[len(parts)].startswith("total ")
    assert all(": exit 2 after" in line
               for index, line in enumerate(summary[:len(parts)]) if index != profile)
    log = (tmp_path / "parts.log").read_text()
    assert [line.split(" ")[1] for line in log.splitlines() if line.startswith("== ")] == parts
    # the bench parts got past argument parsing to the CUDA check: their options all exist
    for name in ("models", "decode"):
        assert "--device: got 'cuda'; allowed: cpu" in log.split(f"== {name} ")[1], name
    assert "gpu_streaming: error: --device: got 'cuda'; allowed: cpu" in log
    # CHUNKS reaches every part that builds models at the benches' sizes (and, above, they
    # parsed it)
    for name in ("profile", "graph", "train-graph", "models", "decode"):
        command = next(line for line in log.splitlines() if line.startswith(f"== {name} "))
        assert command.endswith(CHUNKS), command
    assert "gpu_graph: error: CUDA graphs need a CUDA device" in log
    assert "gpu_train_graph: error: CUDA graphs need a CUDA device" in log
    assert (tmp_path / "environment.txt").read_text().startswith(result.stdout.splitlines()[0])
    # the check leaves at most eight files
    assert len(list(tmp_path.rglob("*"))) <= 8


def test_check_script_runs_only_the_parts_named_and_refuses_unknown_ones(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "PYTHONPATH": str(Path(nestlearn.__file__).parents[1]), "CUDA_VISIBLE_DEVICES": "",
           "PARTS": "graph parity"}
    script = str(ROOT / "bench" / "gpu_check.sh")
    result = subprocess.run([script], env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary[:2]] == ["parity", "graph"], result.stdout
    assert len(summary) == 3 and summary[2].startswith("total ")
    result = subprocess.run([script], env={**env, "PARTS": "profile modles"},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "gpu_check: error: PARTS: got 'modles'; allowed: parity" in result.stderr


@pytest.fixture(scope="module")
def gpu_profile():
    return load_script("gpu_profile")


def test_profile_script_reports_every_arch_on_cpu(gpu_profile, tmp_path, capsys):
    # on CPU there are no CUDA kernels or syncs to see: the table and JSON still come out
    code = gpu_profile.main(["--device", "cpu", "--length", "8", "--batch", "1",
                             "--model-dim", "16", "--model-layers", "1", "--heads", "2",
                             "--chunk-size", "4", "--cms-chunk-sizes", "2", "4",
                             "--vocab-size", "32", "--repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    assert "| arch | params | T | B | kernels | copies | syncs |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "gpu-profile.json").read_text())["rows"]
    assert [row["arch"] for row in rows] == [
        "transformer", "titans", "titans-mag", "hope-attention", "hope"]
    for row in rows:
        assert row["kernels"] == row["syncs"] == 0 and row["tok/s"] > 0 and row["step s"] > 0


def test_profile_script_refuses_cuda_without_it(gpu_profile, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_profile.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("gpu_profile: error: --device: got 'cuda'; "
                                              "allowed: cpu")


@pytest.fixture(scope="module")
def gpu_graph():
    return load_script("gpu_graph")


def test_graph_script_refuses_to_run_without_cuda(gpu_graph, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_graph.main([]) == 2
    assert capsys.readouterr().err.startswith("gpu_graph: error: CUDA graphs need a CUDA device")


def test_only_the_syncs_inside_the_step_s_range_count(gpu_profile):
    from torch.autograd import DeviceType

    def event(name, start, end, device_type=DeviceType.CPU):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                               device_type=device_type)

    events = [event(gpu_profile.STEP_RANGE, 10, 50),
              event(gpu_profile.STEP_RANGE, 12, 80, DeviceType.CUDA),  # its GPU annotation
              event("cudaStreamSynchronize", 20, 21),  # an .item() inside the step
              event("cudaStreamSynchronize", 45, 60),  # starts inside: the step's
              event("cudaLaunchKernel", 30, 31),
              event("cudaDeviceSynchronize", 55, 56),  # the script's own, after the step
              event("cudaDeviceSynchronize", 70, 71)]  # the profiler's, when it stops
    assert gpu_profile.syncs_within(events, gpu_profile.STEP_RANGE) == 2


@pytest.fixture(scope="module")
def gpu_train_graph():
    return load_script("gpu_train_graph")


def test_train_graph_script_builds_a_graphed_windows_run(gpu_train_graph, tmp_path):
    corpus = gpu_train_graph.write_text(tmp_path / "words.txt", documents=30, words=20)
    assert corpus.read_text().count("\n\n") == 29
    args = argparse.Namespace(length=64, batch=2, steps=6)
    model = {"arch": "titans", "dim": 32, "layers": 1, "heads": 2, "vocab_size": 256}
    for graphed in (False, True):
        config = gpu_train_graph.run_config(model, corpus, tmp_path / "run", args, graphed)
        assert config.train.cuda_graph is graphed and config.train.device == "cuda"
        assert (config.data.sampling, config.data.seq_len, config.data.batch_size) == (
            "windows", 64, 2)
        assert config.model.arch == "titans" and config.optim.name == "adamw"


@pytest.fixture(scope="module")
def gpu_streaming():
    return load_script("gpu_streaming")


STREAMING_COLUMNS = ["segments", "token by token", "gradients", "cpu vs device"]


def streaming_rows(out: str) -> dict[str, dict[str, str]]:
    return {arch: dict(zip([*STREAMING_COLUMNS, "ok"], cells, strict=True))
            for arch, cells in table(out).items()}


def test_streaming_script_passes_for_every_arch_on_cpu(gpu_streaming, capsys):
    assert gpu_streaming.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = streaming_rows(out)
    assert list(rows) == ["transformer", "hope", "hope-attention", "titans", "titans-mag"]
    for arch, row in rows.items():
        assert row["ok"] == "yes", arch
        for column in STREAMING_COLUMNS:
            assert float(row[column]) < 1e-12, (arch, column)
    assert out.rstrip().endswith("all within tolerance")


def test_streaming_script_fails_above_its_tolerance(gpu_streaming, capsys):
    # rounding alone is above zero: every arch is reported and the exit code says so
    assert gpu_streaming.main(["--device", "cpu", "--archs", "titans", "hope",
                               "--tolerance", "0"]) == 1
    out = capsys.readouterr().out
    assert list(streaming_rows(out)) == ["titans", "hope"]
    assert "above tolerance: titans, hope" in out


def test_streaming_script_catches_a_wrong_token_step(gpu_streaming, monkeypatch, capsys):
    # a memory's one-token step off by 1e-6 (a shift: the per-head norm after the memory would
    # undo a scale): the one-token segments (token by token, and the 1-token cut among the
    # segments) are caught; one pass is not touched
    import nestlearn.nn.memory_stream as memory_stream

    exact = memory_stream._token_step

    def off(*args, **kwargs):
        out, state = exact(*args, **kwargs)
        return out + 1e-6, state

    monkeypatch.setattr(memory_stream, "_token_step", off)
    assert gpu_streaming.main(["--device", "cpu", "--archs", "titans"]) == 1
    row = streaming_rows(capsys.readouterr().out)["titans"]
    assert float(row["token by token"]) > 1e-9 and float(row["segments"]) > 1e-9
    assert float(row["cpu vs device"]) == 0 and row["ok"] == "NO"


def test_streaming_state_comparison_counts_any_difference_in_form_as_infinite(gpu_streaming):
    from nestlearn.models import build_model

    error = gpu_streaming.relative_error
    shared = torch.randn(3, 4, dtype=torch.float64)
    # a batch-shared tensor equals its per-row copies; other shape differences do not pass
    assert error(shared.expand(2, 3, 4), shared) == 0 == error(shared, shared.expand(2, 3, 4))
    assert error(shared[:2], shared) == float("inf")
    assert error(torch.zeros(2, 0, 4), torch.ones(2, 1, 4)) == float("inf")
    assert error(torch.tensor([1, 2]), torch.tensor([1, 3])) == float("inf")
    assert error(torch.tensor([1, 2]), torch.tensor([1, 2])) == 0
    torch.manual_seed(0)
    model = build_model(gpu_streaming.small_config("hope", 16, 17, 4)).double()
    ids = torch.randint(0, 17, (1, 9))
    with torch.no_grad():
        _, state = gpu_streaming.read(model, ids, [9])
        _, shorter = gpu_streaming.read(model, ids[:, :8], [8])
    assert gpu_streaming.worst_state_error(state, state) == 0
    # a stream one token shorter: another position (a static value) and other held tokens
    assert gpu_streaming.worst_state_error(shorter, state) == float("inf")


def test_streaming_script_refuses_a_stream_too_short_for_its_segments(gpu_streaming, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_streaming.main(["--device", "cpu", "--length", "13"])
    assert exit_info.value.code == 2
    assert "--length: got 13; allowed: integers >= 14" in capsys.readouterr().err


def test_streaming_script_refuses_cuda_without_it(gpu_streaming, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_streaming.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("gpu_streaming: error: --device: got 'cuda'; "
                                              "allowed: cpu")
