import json
import os
import threading
import warnings

import pytest
import torch

from nestlearn.benchmarks.common import (
    compile_failures,
    format_table,
    in_fresh_process,
    measure,
    model_chunks_help,
    peak_memory_mb,
    write_report,
)
from nestlearn.errors import NestlearnError
from nestlearn.models import ARCHS, ModelConfig


def allocate_mib(mib: int):
    def run():
        return torch.ones(mib, 1024, 256).sum()  # 256 float32 * 1024 = 1 MiB per row

    return run


def test_peak_memory_counts_only_the_workload_not_the_parent():
    parent_ballast = torch.ones(200, 1024, 256)  # 200 MiB held by the measuring process
    measured = peak_memory_mb(allocate_mib, mib=64)
    assert 56 < measured < 100, measured
    assert parent_ballast.numel() > 0


def test_write_report_prints_table_and_writes_json(tmp_path, capsys):
    rows = [{"rule": "a", "tokens_per_s": 1234.5678}, {"rule": "b", "tokens_per_s": None}]
    path = write_report("demo", rows, ["rule", "tokens_per_s"], tmp_path)
    out = capsys.readouterr().out
    assert "| a | 1235 |" in out and "| b |  |" in out
    data = json.loads(path.read_text())
    assert data["rows"] == rows and data["environment"]["torch"] == torch.__version__
    assert format_table(rows, ["rule"]).splitlines()[1] == "|---|"


def _where(tag: str) -> tuple[str, int, int]:
    return tag, os.getpid(), torch.get_num_threads()


def _variable(name: str) -> str | None:
    return os.environ.get(name)


def _fails() -> None:
    raise ArithmeticError("no result here")


def _dies() -> None:
    os._exit(3)


def _within(seconds: float, fn):
    """fn() run in a thread: its result, or a failed test instead of a hang."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = fn()
        except Exception as err:  # handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_in_fresh_process_returns_the_childs_result_at_the_given_threads():
    assert in_fresh_process(_where, "tag", threads=1)[::2] == ("tag", 1)
    assert in_fresh_process(_where, "tag", threads=1)[1] != os.getpid()


def test_in_fresh_process_starts_the_child_with_the_variables_given(monkeypatch):
    monkeypatch.setenv("NESTLEARN_BENCH_PROBE", "parent")
    monkeypatch.delenv("NESTLEARN_BENCH_OTHER", raising=False)
    env = {"NESTLEARN_BENCH_PROBE": "child", "NESTLEARN_BENCH_OTHER": "set"}
    assert in_fresh_process(_variable, "NESTLEARN_BENCH_PROBE", env=env) == "child"
    assert in_fresh_process(_variable, "NESTLEARN_BENCH_OTHER", env=env) == "set"
    # this process's environment is as it was, and a child without env sees it
    assert os.environ["NESTLEARN_BENCH_PROBE"] == "parent"
    assert "NESTLEARN_BENCH_OTHER" not in os.environ
    assert in_fresh_process(_variable, "NESTLEARN_BENCH_PROBE") == "parent"
    # None removes a variable from the child's environment only
    assert in_fresh_process(_variable, "NESTLEARN_BENCH_PROBE",
                            env={"NESTLEARN_BENCH_PROBE": None}) is None
    assert os.environ["NESTLEARN_BENCH_PROBE"] == "parent"


def test_peak_memory_on_cuda_refuses_an_environment_it_could_not_apply():
    with pytest.raises(NestlearnError, match=r"env: got .* with device cuda; allowed: None"):
        peak_memory_mb(lambda: (lambda: None), device="cuda", env={"MALLOC_TOP_PAD_": "1"})


def test_in_fresh_process_raises_a_failure_or_death_of_the_child_instead_of_waiting():
    with pytest.raises(RuntimeError, match="ArithmeticError: no result here"):
        _within(120, lambda: in_fresh_process(_fails))
    with pytest.raises(RuntimeError, match="exited with code 3"):
        _within(120, lambda: in_fresh_process(_dies))


def test_measure_flags_non_finite_and_failed_runs():
    calls = []

    def finite() -> torch.Tensor:
        calls.append(1)
        return torch.tensor(1.0)

    seconds, note = measure(finite, repeats=3, warmup=2)
    assert seconds >= 0 and note == "" and len(calls) == 5
    assert measure(lambda: torch.tensor(float("nan")), repeats=1)[1] == "non-finite outputs"

    def refused() -> torch.Tensor:
        raise NestlearnError("x: got 0; allowed: >= 1")

    seconds, note = measure(refused, repeats=1)
    assert seconds != seconds and note == "failed: x: got 0; allowed: >= 1"


def test_compile_failures_go_to_the_note_and_other_warnings_are_shown_once():
    notes: list[str] = []
    with pytest.warns(UserWarning, match="^unrelated$") as shown, compile_failures(notes):
        warnings.warn("unrelated", UserWarning, stacklevel=1)
        warnings.warn("torch.compile of _chunk failed, running it eagerly from now on (X)",
                      RuntimeWarning, stacklevel=1)
    assert len(shown) == 1
    assert notes == ["compile failed: torch.compile of _chunk failed, running it eagerly "
                     "from now on (X)"]


@pytest.mark.parametrize("arch", [name for name, spec in ARCHS.items()
                                  if spec.memory is not None or spec.cms])
def test_model_chunks_help_names_the_chunks_the_models_are_built_with(arch):
    window = {"window": 64} if ARCHS[arch].attention == "windowed" else {}
    config = ModelConfig(arch=arch, attention=window or None)
    text = model_chunks_help()
    if config.memory is not None:
        inner = getattr(config.memory, "inner_chunk_size", None)
        assert f"--chunk-size {config.memory.chunk_size} " in text
        assert inner is None or f"--inner-chunk-size {inner} " in text
    if config.cms is not None:
        sizes = " ".join(str(size) for size in config.cms.chunk_sizes)
        assert f"--cms-chunk-sizes {sizes}'" in text
