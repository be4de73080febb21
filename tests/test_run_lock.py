import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from nestlearn.errors import NestlearnError
from nestlearn.training import Trainer, train
from nestlearn.training.run_lock import LOCK_FILE, RunFolderLock
from trainkit import TINY, tiny_config, write_corpus

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "verse.txt")


def _refusal(run_dir) -> str:
    with pytest.raises(NestlearnError) as err:
        RunFolderLock(run_dir).acquire()
    return str(err.value)


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    with RunFolderLock(tmp_path) as lock:
        assert lock.held
        message = _refusal(tmp_path)
    assert "\n" not in message
    assert message.startswith(f"run folder {str(tmp_path)!r} is in use by pid {os.getpid()} "
                              f"on host {socket.gethostname()} since 20")


def test_the_lock_is_released_after_the_block(tmp_path):
    with RunFolderLock(tmp_path):
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()
    with RunFolderLock(tmp_path) as again:
        assert again.held


def test_a_lock_file_of_a_dead_process_does_not_block(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00"}))
    with RunFolderLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        assert f"pid {os.getpid()} " in _refusal(tmp_path)


def test_a_trainer_holds_the_lock_from_start_to_end(corpus, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(corpus, run, "train.steps=2")
    trainer = Trainer(config, progress=False)
    with pytest.raises(NestlearnError, match=f"in use by pid {os.getpid()} "):
        Trainer(config, progress=False)
    with pytest.raises(NestlearnError, match=f"in use by pid {os.getpid()} "):
        Trainer(config, resume=True, progress=False)
    assert trainer.run().status == "completed"
    assert not (run / LOCK_FILE).exists()
    # a refused start (here: a config mismatch on --resume) lets the lock go too
    with pytest.raises(NestlearnError, match="config mismatch"):
        Trainer(tiny_config(corpus, run, "model.dim=64"), resume=True, progress=False)
    resumed = Trainer(tiny_config(corpus, run, "train.steps=3"), resume=True, progress=False)
    assert resumed.lock.held
    resumed.lock.release()


def _nestlearn(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nestlearn", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _wait_for_holder(lock_file, pid: int, process: subprocess.Popen, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if json.loads(lock_file.read_text()).get("pid") == pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{lock_file} never named pid {pid}")


def test_a_second_train_on_one_folder_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    sets = [arg for field in (*TINY, f"data.corpus={corpus}") for arg in ("--set", field)]
    first = _nestlearn("train", "--out", str(run), "--no-progress", *sets,
                       "--set", "train.steps=1000000")
    try:
        _wait_for_holder(run / LOCK_FILE, first.pid, first)
        second = subprocess.run(
            [sys.executable, "-m", "nestlearn", "train", "--out", str(run), "--no-progress",
             *sets], env=ENV, capture_output=True, text=True, timeout=120)
        if second.returncode != 2:  # show why the first run let go of its lock
            first.send_signal(signal.SIGKILL)
            raise AssertionError((second.returncode, second.stderr, first.communicate(timeout=60)))
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"is in use by pid {first.pid} on host {socket.gethostname()} since" in lines[0]
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # killed holding the lock: its lock file stays, yet a new run starts and finishes
    assert (run / LOCK_FILE).exists()
    result = train(tiny_config(corpus, run, "train.steps=2"), progress=False)
    assert result.status == "completed" and result.step == 2
    assert not (run / LOCK_FILE).exists()
