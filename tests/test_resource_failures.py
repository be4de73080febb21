"""A run that hits the machine's limits (a full disk, a file size limit, a folder it may no
longer write, memory) ends with one line and exit code 1, names its last good checkpoint,
leaves that checkpoint intact and leaves no staging folder behind."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from safetensors import SafetensorError

from nestlearn.cli import main
from nestlearn.errors import ResourceError
from nestlearn.training import checkpoint as ckpt
from nestlearn.training import train
from nestlearn.training.run_lock import LOCK_FILE
from nestlearn.training.trainer import Trainer
from trainkit import tiny_config, tiny_sets, write_corpus

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "verse.txt")


def _fail_on_call(monkeypatch, owner, name: str, call: int, error: BaseException) -> None:
    """Make ``owner.name`` raise ``error`` on its ``call``-th call (1-based)."""
    original = getattr(owner, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def _assert_stopped_cleanly(run, message: str, last_step: int) -> None:
    last = ckpt.checkpoint_dir(run, last_step)
    assert "\n" not in message
    assert message.endswith(f"; the last good checkpoint is {last} (intact)")
    assert ckpt.latest_checkpoint(run) == last
    assert ckpt.load_checkpoint(last).step == last_step  # every checksum verified
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert not (run / LOCK_FILE).exists()


@pytest.mark.parametrize(("error", "reason"), [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    # what safetensors raises under `ulimit -f` (EFBIG)
    (SafetensorError("Error while serializing: I/O error: File too large (os error 27)"),
     "File too large (os error 27)"),
])
def test_a_full_disk_during_a_checkpoint_is_one_line_naming_the_last_good_one(
        corpus, tmp_path, monkeypatch, error, reason):
    run = tmp_path / "run"
    config = tiny_config(corpus, run, "train.steps=4", "train.checkpoint_every=1")
    # the state file of the second checkpoint cannot be written
    _fail_on_call(monkeypatch, ckpt, "save_file", 2, error)
    with pytest.raises(ResourceError) as err:
        train(config, progress=False)
    message = str(err.value)
    assert message.startswith(
        f"checkpoint {ckpt.checkpoint_dir(run, 2)}: cannot be written ({reason}); ")
    _assert_stopped_cleanly(run, message, last_step=1)


def test_a_checkpoint_folder_that_became_unwritable_is_one_line(corpus, tmp_path,
                                                                 monkeypatch):
    run = tmp_path / "run"
    config = tiny_config(corpus, run, "train.steps=4", "train.checkpoint_every=1")
    # what mkdtemp raises in a folder without write permission (root ignores chmod)
    denied = PermissionError(errno.EACCES, "Permission denied", str(run / "checkpoints"))
    _fail_on_call(monkeypatch, ckpt, "atomic_directory", 3, denied)
    with pytest.raises(ResourceError) as err:
        train(config, progress=False)
    assert str(err.value).startswith(
        f"checkpoint {ckpt.checkpoint_dir(run, 3)}: cannot be written (Permission denied); ")
    _assert_stopped_cleanly(run, str(err.value), last_step=2)


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 34359738368 bytes. Error code 12 "
                 "(Cannot allocate memory)"),
    MemoryError(),
])
def test_running_out_of_memory_in_a_step_is_one_line_and_saves_nothing(
        corpus, tmp_path, monkeypatch, error):
    run = tmp_path / "run"
    config = tiny_config(corpus, run, "train.steps=5", "train.checkpoint_every=2")
    _fail_on_call(monkeypatch, Trainer, "_forward", 3, error)
    with pytest.raises(ResourceError) as err:
        train(config, progress=False)
    message = str(err.value)
    assert message.startswith("training stopped after 2 steps: out of memory (")
    assert "smaller data.batch_size or data.seq_len" in message
    advice = "; a smaller data.batch_size or data.seq_len needs less memory"
    assert message.endswith(advice)
    _assert_stopped_cleanly(run, message.removesuffix(advice), last_step=2)


def test_the_cli_prints_a_resource_failure_as_one_line_with_exit_code_1(
        corpus, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _fail_on_call(monkeypatch, ckpt, "save_file", 2,
                  OSError(errno.EDQUOT, "Disk quota exceeded"))
    code = main(["train", "--out", str(run), "--no-progress",
                 *tiny_sets(f"data.corpus={corpus}", "train.steps=3",
                            "train.checkpoint_every=1")])
    assert code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"nestlearn train: error: checkpoint "
                               f"{ckpt.checkpoint_dir(run, 2)}: cannot be written (Disk quota "
                               "exceeded); the last good checkpoint is ")


@pytest.mark.slow  # a whole CLI run in a subprocess (about 20 s on a loaded machine)
def test_a_real_file_size_limit_ends_in_one_line_and_exit_code_1(corpus, tmp_path):
    run = tmp_path / "run"
    # 200 KiB: the token files and the model fit, the first checkpoint's optimizer state not
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
              "(200 * 1024, resource.RLIM_INFINITY)); from nestlearn.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run(
        [sys.executable, "-c", script, "train", "--out", str(run), "--no-progress",
         *tiny_sets(f"data.corpus={corpus}", "train.steps=2", "train.checkpoint_every=1")],
        capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"nestlearn train: error: checkpoint {ckpt.checkpoint_dir(run, 1)}: cannot "
                     "be written (File too large (os error 27)); no checkpoint had been written "
                     "yet"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == []
