"""What the device parity scripts share (``bench/gpu_parity.py``, ``bench/gpu_streaming.py``):
their argument checks and their table of largest relative errors, one row per case, each
within the tolerance or not, and the exit code that sums it up."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   names: Sequence[str]) -> None:
    """Exit through ``parser.error`` naming the first of ``names`` that is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}; "
                         "allowed: integers >= 1")


def device_missing(script: str, device: str) -> bool:
    """True, after an error line naming ``script``, when ``device`` is cuda and there is none."""
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{script}: error: --device: got 'cuda'; allowed: cpu "
              "(torch.cuda.is_available() is false here)", file=sys.stderr)
        return True
    return False


def device_name(device: str) -> str:
    """The GPU's name for ``cuda``, else ``cpu`` (the tables' first line names it)."""
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


class ParityTable:
    """A markdown table printed row by row (a part cut short keeps its rows), then a verdict."""

    def __init__(self, first: str, columns: Sequence[str], tolerance: float) -> None:
        self.tolerance = tolerance
        self.failed: list[str] = []
        print(f"| {first} | {' | '.join(columns)} | ok |")
        print(f"|---|{'---|' * len(columns)}---|", flush=True)

    def row(self, label: str, errors: Sequence[float], ok: bool = True) -> None:
        """One case's errors; it fails when any is above the tolerance or ``ok`` is False."""
        ok = ok and all(error <= self.tolerance for error in errors)
        if not ok:
            self.failed.append(label)
        cells = " | ".join(f"{error:.3e}" for error in errors)
        print(f"| {label} | {cells} | {'yes' if ok else 'NO'} |", flush=True)

    def verdict(self) -> int:
        """Print which cases failed; exit code 1 if any did, else 0."""
        if self.failed:
            print(f"above tolerance: {', '.join(self.failed)}")
            return 1
        print("all within tolerance")
        return 0
