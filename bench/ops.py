"""Memory ops benchmark: same as ``nestlearn bench ops`` (see its --help)."""

from __future__ import annotations

import argparse
import sys

from nestlearn.benchmarks import ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=ops.__doc__.strip().splitlines()[0])
    ops.add_arguments(parser)
    return ops.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
