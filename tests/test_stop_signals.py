"""A first SIGINT/SIGTERM asks training to stop after its step; a second one stops the process
at once, even inside a tensor operation that does not return to Python (a runaway step)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nestlearn.training import checkpoint as ckpt
from nestlearn.training.hooks import StopSignals
from trainkit import tiny_sets, write_corpus

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# blocks in C++ with the GIL released and never returns: Python's own signal handlers (which
# run only between bytecodes) cannot interrupt it
STUCK = "torch.futures.Future().wait()"


def _start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(process: subprocess.Popen, expected: str) -> None:
    line = process.stdout.readline()
    assert line.strip() == expected, (line, process.stderr.read() if process.poll() else "")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_a_stuck_operation_at_once(sig):
    process = _start(f"""
        import torch
        from nestlearn.training.hooks import StopSignals
        with StopSignals(lambda name: f"second {{name}}: gone") as signals:
            print("stuck", flush=True)
            {STUCK}
    """)
    _wait_for_line(process, "stuck")
    process.send_signal(sig)
    time.sleep(0.5)
    assert process.poll() is None  # the first signal only asks for a stop after the step
    started = time.monotonic()
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert process.returncode == 128 + sig
    assert stderr.strip() == f"second {signal.Signals(sig).name}: gone"


def test_one_signal_sets_the_flag_and_leaving_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs at the next bytecode
        assert signals.received == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.set_wakeup_fd(-1) == -1  # the wakeup pipe is handed back too


@pytest.mark.slow  # a whole CLI run in a subprocess (about 20 s on a loaded machine)
def test_a_second_sigterm_stops_a_runaway_training_step_naming_the_last_checkpoint(tmp_path):
    corpus = write_corpus(tmp_path / "verse.txt", paragraphs=60)
    run = tmp_path / "run"
    # step 3 never ends: its forward pass blocks inside one tensor operation
    process = _start(f"""
        import sys, torch
        from nestlearn.cli import main
        from nestlearn.training.trainer import Trainer
        forward = Trainer._forward
        def runaway(self, inputs, targets):
            if self.step == 2:
                print("stuck", flush=True)
                {STUCK}
            return forward(self, inputs, targets)
        Trainer._forward = runaway
        sys.exit(main(sys.argv[1:]))
    """, "train", "--out", str(run), "--no-progress",
        *tiny_sets(f"data.corpus={corpus}", "train.steps=10", "train.checkpoint_every=1"))
    _wait_for_line(process, "stuck")
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    last = ckpt.checkpoint_dir(run, 2)
    assert stderr.strip().splitlines()[-1] == (
        f"nestlearn: a second SIGTERM: stopped at once in step 3, without saving; the last "
        f"good checkpoint is {last} (intact); continue with: nestlearn train --out {run} "
        "--resume")
    assert ckpt.latest_checkpoint(run) == last
    assert ckpt.load_checkpoint(last).step == 2
