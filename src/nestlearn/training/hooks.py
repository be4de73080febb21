"""What the training loop does around the steps, one small object per job.

The loop calls, in list order, ``after_step(trainer, record)`` after every optimizer step,
``at_end(trainer)`` once training stops (finished or interrupted; not after a NaN/Inf
stop, which saves its own checkpoint), and ``close(trainer)`` always, last. The default hooks:
:class:`LogHook` (metrics rows and the progress bar), :class:`EvalHook` (periodic and final
evaluation), :class:`CheckpointHook` (periodic and final checkpoints). :class:`StopSignals`
turns SIGINT/SIGTERM into a request the loop checks after each step; a second one stops the
process at once.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nestlearn.training.distributed import DistContext
from nestlearn.training.metrics_log import MetricsLogger, plot_loss_curve
from nestlearn.training.runconfig import RunConfig


@dataclass
class StepRecord:
    """What one optimizer step did."""

    step: int  # optimizer steps completed, this one included
    loss: float  # mean loss over the scored targets of the global batch
    grad_norm: float  # before clipping
    lr: float
    tokens: int  # scored targets of the global batch
    seconds: float  # wall time of the step (evaluation and saving excluded)


@dataclass
class TrainResult:
    """What a call to :func:`nestlearn.training.train` did."""

    run_dir: Path
    step: int  # optimizer steps completed in total (including before a resume)
    status: str  # "completed", "interrupted" or "already_complete" (a resume with nothing to do)
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss, this call
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    checkpoint: Path | None = None
    rank: int = 0  # under torchrun, only rank 0 reports
    note: str = ""  # the one line that says why nothing was trained ("already_complete")



class RunningTrainer(Protocol):
    """What hooks read and call on the running ``nestlearn.training.Trainer`` (a protocol, so
    this module does not import the loop that imports it)."""

    config: RunConfig
    ctx: DistContext
    run_dir: Path
    metrics: MetricsLogger
    result: TrainResult
    step: int
    tokens_seen: int
    elapsed: float
    stop_requested: str | None
    eval_steps: set[int]  # steps evaluated so far, the same on every rank

    def run_eval(self) -> None: ...

    def save(self) -> Path | None: ...


class Hook:
    """Does nothing; subclasses override what they need."""

    def after_step(self, trainer: RunningTrainer, record: StepRecord) -> None:
        pass

    def at_end(self, trainer: RunningTrainer) -> None:
        pass

    def close(self, trainer: RunningTrainer) -> None:
        pass


class LogHook(Hook):
    """A metrics row every ``train.log_every`` steps (and at the last step) with the tokens per
    second of the steps since the previous row; the progress bar (rank 0, when asked and tqdm
    is installed); at the close, the loss curve and the metric files are finished."""

    def __init__(self, trainer: RunningTrainer, progress: bool) -> None:
        self.window_tokens = 0
        self.window_seconds = 0.0
        self.bar = None
        cfg = trainer.config.train
        if progress and trainer.ctx.is_main and trainer.step < cfg.steps:
            try:
                from tqdm import tqdm
            except ImportError:  # optional: the metric files carry the same numbers
                return
            self.bar = tqdm(total=cfg.steps, initial=trainer.step, desc=trainer.config.name,
                            unit="step", dynamic_ncols=True, file=sys.stderr)

    def after_step(self, trainer: RunningTrainer, record: StepRecord) -> None:
        cfg = trainer.config.train
        self.window_tokens += record.tokens
        self.window_seconds += record.seconds
        if record.step % cfg.log_every == 0 or record.step == cfg.steps:
            tps = self.window_tokens / max(self.window_seconds, 1e-9)
            self.window_tokens, self.window_seconds = 0, 0.0
            trainer.metrics.log({
                "step": record.step, "split": "train", "loss": record.loss,
                "ppl": math.exp(min(record.loss, 700.0)), "lr": record.lr,
                "grad_norm": record.grad_norm, "tokens_per_s": round(tps, 1),
                "tokens": trainer.tokens_seen, "elapsed_s": round(trainer.elapsed, 3),
            })
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record.loss:.4f}", tok_s=f"{tps:,.0f}",
                                     lr=f"{record.lr:.2e}")
        if self.bar is not None:
            self.bar.update(1)

    def at_end(self, trainer: RunningTrainer) -> None:
        self._close_bar()

    def close(self, trainer: RunningTrainer) -> None:
        self._close_bar()
        if trainer.ctx.is_main:
            plot_loss_curve(trainer.run_dir, trainer.config.name)
        trainer.metrics.close()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EvalHook(Hook):
    """Evaluates every ``train.eval_every`` steps and once at the end of a completed run."""

    def after_step(self, trainer: RunningTrainer, record: StepRecord) -> None:
        every = trainer.config.train.eval_every
        if every and record.step % every == 0:
            trainer.run_eval()

    def at_end(self, trainer: RunningTrainer) -> None:
        # every rank decides alike (result.evals is rank 0's): an evaluation of a sharded
        # model is collective
        if trainer.result.status == "completed" and trainer.step not in trainer.eval_steps:
            trainer.run_eval()


class CheckpointHook(Hook):
    """A checkpoint every ``train.checkpoint_every`` steps (left to the final one when the run
    is stopping) and one at the end."""

    def after_step(self, trainer: RunningTrainer, record: StepRecord) -> None:
        every = trainer.config.train.checkpoint_every
        if every and record.step % every == 0 and trainer.stop_requested is None:
            trainer.result.checkpoint = trainer.save()

    def at_end(self, trainer: RunningTrainer) -> None:
        trainer.result.checkpoint = trainer.save()


def default_hooks(trainer: RunningTrainer, progress: bool) -> list[Hook]:
    """Logging, evaluation, checkpointing: in this order after each step and at the end."""
    return [LogHook(trainer, progress), EvalHook(), CheckpointHook()]


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag checked after each step (main thread only).

    A second signal stops the process at once, even in the middle of a long tensor operation
    (which holds off Python's own signal handlers until it returns): Python writes each
    signal's number to a wakeup pipe from its C handler, and a watcher thread reading that pipe
    prints ``on_second(signal name)`` on stderr and exits with 128 + the signal number,
    without saving (checkpoints are atomic, so the last one is intact; the lock of a dead
    process does not block a resume)."""

    def __init__(self, on_second: Callable[[str], str] | None = None) -> None:
        self.received: str | None = None
        self._on_second = on_second
        self._previous: dict[int, Any] = {}
        self._previous_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)
            self._pipe = (read_end, write_end)
            self._watcher = threading.Thread(target=self._watch, args=(read_end,), daemon=True,
                                             name="nestlearn-stop-signals")
            self._watcher.start()
            self._previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        # the first signal asks the loop to stop after this step; the watcher ends a second
        if self.received is None:
            self.received = signal.Signals(signum).name

    def _watch(self, read_end: int) -> None:
        count = 0
        while True:
            try:
                data = os.read(read_end, 64)
            except OSError:
                return
            if not data:  # the context was left: the write end is closed
                return
            for signum in data:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                count += 1
                if count >= 2:
                    name = signal.Signals(signum).name
                    line = (self._on_second(name) if self._on_second is not None
                            else f"second {name}: stopped at once, without saving")
                    os.write(sys.stderr.fileno(), (line + "\n").encode())
                    os._exit(128 + signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            read_end, write_end = self._pipe
            os.close(write_end)
            if self._watcher is not None:
                self._watcher.join(timeout=5)
            os.close(read_end)
            self._pipe = self._watcher = None
