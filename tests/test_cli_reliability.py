"""Reliability of the run folder seen from the command line (issue: finished runs, file
modes, read-only folders, option values)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nestlearn.training.metrics_log import read_records
from trainkit import tiny_sets, write_corpus

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def nestlearn(*args, umask=None):
    preexec = None if umask is None else (lambda: os.umask(umask))
    return subprocess.run([sys.executable, "-m", "nestlearn", *args], capture_output=True,
                          text=True, env=ENV, timeout=300, preexec_fn=preexec)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "verse.txt")


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    result = nestlearn("train", "--out", str(out), "--no-progress",
                       *tiny_sets(f"data.corpus={corpus}", "train.steps=6"))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("steps", [3, 6])
def test_resuming_a_finished_run_changes_nothing(finished_run, steps):
    before = snapshot(finished_run)
    rows = read_records(finished_run)
    result = nestlearn("train", "--out", str(finished_run), "--resume", "--no-progress",
                       "--set", f"train.steps={steps}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "already complete at step 6" in lines[0], result.stdout
    assert f"train.steps={steps}" in lines[0] and "nothing changed" in lines[0]
    assert snapshot(finished_run) == before
    assert read_records(finished_run) == rows


@pytest.mark.parametrize(("umask", "file_mode", "folder_mode"),
                         [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_run_files_follow_the_umask(corpus, tmp_path, umask, file_mode, folder_mode):
    out = tmp_path / "run"
    result = nestlearn("train", "--out", str(out), "--no-progress",
                       *tiny_sets(f"data.corpus={corpus}", "train.steps=2"), umask=umask)
    assert result.returncode == 0, result.stderr
    paths = [out, *out.rglob("*")]
    assert any(p.name == "config.json" for p in paths)
    assert any(p.name == "model.safetensors" for p in paths)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in paths}
    expected = {str(p.relative_to(tmp_path)): folder_mode if p.is_dir() else file_mode
                for p in paths}
    assert modes == expected


def test_eval_of_a_read_only_run_prints_the_result_and_says_it_was_not_saved(
        finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    target = run / "eval_validation.json"
    if os.geteuid() == 0:
        # permission bits do not stop root: block the result's path with a folder instead
        target.mkdir()
    else:
        run.chmod(0o555)
    try:
        result = nestlearn("eval", str(run), "--max-batches", "1")
    finally:
        run.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert f"{run} step 6 | validation: loss" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"nestlearn eval: warning: result not saved to {target} (")
    assert ("Is a directory" if os.geteuid() == 0 else "Permission denied") in lines[0]


@pytest.mark.parametrize(("args", "expected"), [
    (["generate", "RUN", "--prompt", "The king", "--max-context", "-5"],
     "--max-context: got -5; allowed: an integer >= 1 (default: the training context)"),
    (["generate", "RUN", "--prompt", "The king", "--max-context", "0"],
     "--max-context: got 0; allowed: an integer >= 1 (default: the training context)"),
    (["eval", "RUN", "--seq-len", "0"],
     "--seq-len: got 0; allowed: an integer >= 1 (default: the run's data.seq_len)"),
    (["train", "--out", "", "--no-progress", "--set", "train.steps=2"],
     "--out: got ''; allowed: a folder path (not empty)"),
])
def test_out_of_range_option_values_are_one_line_and_exit_2(finished_run, corpus, tmp_path,
                                                            args, expected):
    args = [str(finished_run) if arg == "RUN" else arg for arg in args]
    if args[0] == "train":
        args += tiny_sets(f"data.corpus={corpus}", "train.steps=2")
    result = subprocess.run([sys.executable, "-m", "nestlearn", *args], capture_output=True,
                            text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip() == f"nestlearn {args[0]}: error: {expected}"
    assert list(tmp_path.iterdir()) == []  # nothing was written, nowhere
