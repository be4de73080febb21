"""Optimizer benchmark: same as ``nestlearn bench optim`` (see its --help)."""

from __future__ import annotations

import argparse
import sys

from nestlearn.benchmarks import optim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=optim.__doc__.strip().splitlines()[0])
    optim.add_arguments(parser)
    return optim.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
