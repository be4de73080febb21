"""The optional Weights & Biases sink of the training metrics (``train.wandb_project``).

It logs the rows :class:`nestlearn.training.metrics_log.MetricsLogger` writes to
``metrics.jsonl`` (as ``train/loss``, ``eval/ppl``, ... at the row's step), with the resolved
run config as the W&B config and the run folder's name as the run name. W&B files go to
``RUN/wandb/``. The W&B run id and the last step logged are kept in ``RUN/wandb_run.json``: a
resumed run continues the same W&B run and skips the rows up to that step (W&B steps only
grow; the interrupted run logged them after its last checkpoint, and bitwise resume makes
them equal to the ones it would log again), so no row is logged twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nestlearn.atomic import atomic_write_text
from nestlearn.errors import NestlearnError

STATE_NAME = "wandb_run.json"
WANDB_MODES: tuple[str, ...] = ("auto", "online", "offline", "disabled")


def import_wandb() -> Any:
    """The ``wandb`` module, or one clear error naming the extra that installs it."""
    try:
        import wandb
    except ImportError:
        raise NestlearnError(
            "train.wandb_project is set but wandb is not installed; allowed: "
            "pip install 'nestlearn[wandb]', or train.wandb_project=none"
        ) from None
    return wandb


class WandbSink:
    """One W&B run per run folder; :meth:`start` opens it (fresh or resumed)."""

    def __init__(self, run_dir: Path, project: str, mode: str, config: dict[str, Any]) -> None:
        self.wandb = import_wandb()
        self.run_dir = run_dir
        self.project = project
        self.mode = mode
        self.config = config
        self.run: Any = None
        self.resumed_through = -1  # rows up to this step were logged before a resume
        self.last_step = -1

    def start(self, resume: bool) -> None:
        state = self._read_state() if resume else None
        self.resumed_through = self.last_step = state["step"] if state else -1
        kwargs: dict[str, Any] = {"id": state["id"], "resume": "allow"} if state else {}
        if self.mode != "auto":  # "auto": wandb's own choice (WANDB_MODE, else online)
            kwargs["mode"] = self.mode
        (self.run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        try:
            self.run = self.wandb.init(
                project=self.project, name=self.run_dir.resolve().name, config=self.config,
                dir=str(self.run_dir), **kwargs)
        except Exception as err:  # wandb raises its own types (no login, no network, ...)
            raise NestlearnError(
                f"train.wandb_project={self.project!r}: W&B could not start a run ({err}); "
                "allowed: train.wandb_mode=offline (sync later with `wandb sync`)"
            ) from None
        if getattr(self.run, "disabled", False):  # mode "disabled": nothing logged, no state
            self.run = None
            return
        self._write_state(self.run.id)

    def log(self, record: dict[str, Any]) -> None:
        step, split = record["step"], record["split"]
        if self.run is None or step <= self.resumed_through:
            return
        self.run.log({f"{split}/{key}": value for key, value in record.items()
                      if key not in ("step", "split") and isinstance(value, (int, float))},
                     step=step)
        if step != self.last_step:
            self.last_step = step
            self._write_state(self.run.id)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def _read_state(self) -> dict[str, Any] | None:
        path = self.run_dir / STATE_NAME
        return json.loads(path.read_text()) if path.exists() else None

    def _write_state(self, run_id: str) -> None:
        atomic_write_text(self.run_dir / STATE_NAME,
                          json.dumps({"id": run_id, "step": self.last_step}) + "\n")
