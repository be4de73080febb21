"""Training metrics: JSONL (every record), CSV (fixed columns), TensorBoard when importable,
Weights & Biases when asked (:mod:`nestlearn.training.wandb_sink`), and the loss-curve PNG drawn
at the end of a run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from nestlearn.training.wandb_sink import WandbSink

CSV_COLUMNS: tuple[str, ...] = (
    "step", "split", "loss", "ppl", "bpb", "lr", "grad_norm", "tokens_per_s", "tokens",
    "elapsed_s",
)
JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"
PLOT_NAME = "loss_curve.png"


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (empty if there is none)."""
    path = Path(run_dir) / JSONL_NAME
    if not path.exists():
        return []
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


class MetricsLogger:
    """Appends records ``{"step", "split", ...}`` to the run's metric files.

    ``resume_at(step)`` drops records after ``step`` (written after the checkpoint a run resumes
    from), so a resumed run's files read like an uninterrupted run's. ``wandb`` (a sink, made
    on the main process only) gets every record too; ``start_fresh`` / ``resume_at`` open its
    run.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True,
                 tensorboard: bool = True, wandb: WandbSink | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        self._wandb = wandb if enabled else None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def resume_at(self, step: int) -> None:
        if not self.enabled:
            return
        kept = [r for r in read_records(self.run_dir) if r.get("step", 0) <= step]
        self._rewrite(kept)
        if self._wandb is not None:
            self._wandb.start(resume=True)

    def start_fresh(self) -> None:
        if self.enabled:
            self._rewrite([])
        if self._wandb is not None:
            self._wandb.start(resume=False)

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / JSONL_NAME).open("w") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
        with (self.run_dir / CSV_NAME).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for record in records:
                writer.writerow(record)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with (self.run_dir / JSONL_NAME).open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        with (self.run_dir / CSV_NAME).open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(record)
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{record['split']}/{key}", value, record["step"])
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(record)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.close()


def plot_loss_curve(run_dir: str | Path, title: str = "") -> Path | None:
    """Draw train and eval loss against step to ``loss_curve.png``; ``None`` without
    matplotlib or without records."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_records(run_dir)
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        rows = [r for r in records if r.get("split") == split and _finite(r.get("loss"))]
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], style, label=split,
                    markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(run_dir) / PLOT_NAME
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
