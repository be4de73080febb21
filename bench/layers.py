"""Layers and models benchmark: same as ``nestlearn bench layers`` (see its --help)."""

from __future__ import annotations

import argparse
import sys

from nestlearn.benchmarks import layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=layers.__doc__.strip().splitlines()[0])
    layers.add_arguments(parser)
    return layers.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
