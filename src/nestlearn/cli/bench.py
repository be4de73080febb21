"""``nestlearn bench NAME``: benchmarks that print a table and write JSON."""

from __future__ import annotations

import argparse
import importlib

# Benchmark name -> module in nestlearn.benchmarks exposing add_arguments(parser) and run(args).
BENCHMARKS: dict[str, str] = {"ops": "ops", "optim": "optim", "layers": "layers",
                              "recall": "recall", "ops-count": "opcount"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="speed and memory benchmarks (print a table, write JSON)"
    )
    names = parser.add_subparsers(dest="bench_name", metavar="NAME", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(f"nestlearn.benchmarks.{module_name}")
        sub = names.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
