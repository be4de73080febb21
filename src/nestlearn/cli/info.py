"""``nestlearn info``: versions, device, threads and corpora."""

from __future__ import annotations

import argparse
import platform

import torch

from nestlearn import __version__
from nestlearn.data import corpus_status


def info_lines() -> list[str]:
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    lines = [
        f"nestlearn {__version__}",
        f"python {platform.python_version()} ({platform.machine()})",
        f"torch {torch.__version__}",
        f"device: {device}",
        f"threads: {torch.get_num_threads()}",
        "corpora:",
    ]
    for status in corpus_status():
        readiness = "ready" if status.ready else "not prepared"
        lines.append(f"  {status.name}: {readiness} ({status.source})")
    return lines


def run(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="print versions, device, threads and corpora",
        description="Print versions, device, threads and the corpora's status.")
    parser.set_defaults(func=run)
