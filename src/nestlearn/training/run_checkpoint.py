"""Which checkpoint of a run folder ``nestlearn eval`` and ``nestlearn generate`` read.

The newest checkpoint that verifies (:func:`nestlearn.training.checkpoint.read_manifest`:
every checksum). When the newest is damaged, one line on stderr says so and the previous
good one is read instead. A RUN_DIR that is not a run folder (missing, a file, an empty
folder, a folder without checkpoints) gets a line saying which.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from nestlearn.errors import NestlearnError
from nestlearn.training import checkpoint as ckpt

RUN_CONFIG_FILE = "config.json"
ALLOWED = "allowed: a folder written by `nestlearn train`, or one of its checkpoints"


def _not_a_run(run_dir: Path) -> NestlearnError:
    """Why a folder without checkpoints cannot be read."""
    where = f"run folder {str(run_dir)!r}"
    if not any(run_dir.iterdir()):
        return NestlearnError(f"{where} is empty; {ALLOWED}")
    if not (run_dir / RUN_CONFIG_FILE).is_file() and not (run_dir / "checkpoints").is_dir():
        return NestlearnError(f"{where} is not a training run (no {RUN_CONFIG_FILE}, no "
                              f"checkpoints/); {ALLOWED}")
    return NestlearnError(f"{where} has no checkpoint yet (training writes one every "
                          "train.checkpoint_every steps and at the end)")


def readable_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(checkpoint folder, payload)``: ``run_dir`` itself if it is a checkpoint, else the
    newest checkpoint of the run that verifies, falling back over damaged ones."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.exists():
        raise NestlearnError(f"run folder {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        raise NestlearnError(f"run folder {str(run_dir)!r} is a file, not a folder; {ALLOWED}")
    if (run_dir / ckpt.MANIFEST).exists():
        return ckpt.read_manifest(run_dir)
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        raise _not_a_run(run_dir)
    damaged: list[NestlearnError] = []
    for path in reversed(found):
        try:
            result = ckpt.read_manifest(path)
        except NestlearnError as err:
            damaged.append(err)
            continue
        if damaged:
            also = "" if len(damaged) == 1 else f" ({len(damaged)} newest damaged)"
            print(f"nestlearn: warning: {damaged[0]}{also}; using the previous good "
                  f"checkpoint {path}", file=sys.stderr, flush=True)
        return result
    raise NestlearnError(f"{damaged[0]}; no earlier checkpoint of {str(run_dir)!r} verifies "
                         f"either ({len(damaged)} damaged)")
