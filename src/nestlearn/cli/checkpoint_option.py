"""``--checkpoint`` of ``eval`` and ``generate``: load a chosen checkpoint, not the latest."""

from __future__ import annotations

import argparse
from pathlib import Path

from nestlearn.errors import invalid


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="STEP|PATH",
                        help="the checkpoint to load: a step number (RUN_DIR/checkpoints/"
                             "step_0000000N), a folder name in RUN_DIR/checkpoints or a "
                             "checkpoint folder's path (default: the run's latest)")


def resolve_checkpoint(run_dir: Path, value: str | None) -> Path | None:
    """The checkpoint folder ``--checkpoint value`` names (None: the run's latest)."""
    from nestlearn.training import checkpoint as ckpt

    if value is None:
        return None
    saved = [int(p.name[len(ckpt.PREFIX):]) for p in ckpt.list_checkpoints(run_dir)]
    allowed = (f"a saved step of {run_dir} ({', '.join(map(str, saved)) or 'none yet'}), "
               "a folder name in its checkpoints/ or a checkpoint folder")
    text = value.strip()
    if not text:
        raise invalid("--checkpoint", repr(value), allowed)
    if text.isdigit():
        path = ckpt.checkpoint_dir(run_dir, int(text))
    else:
        path = Path(text).expanduser()
        inside = run_dir / "checkpoints" / text
        if not path.is_dir() and inside.is_dir():
            path = inside
    if not path.is_dir():
        raise invalid("--checkpoint", repr(value), allowed)
    return path
