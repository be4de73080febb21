"""Op budget and roofline: same as ``nestlearn bench ops-count`` (see its --help)."""

from __future__ import annotations

import argparse
import sys

from nestlearn.benchmarks import opcount


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=opcount.__doc__.strip().splitlines()[0])
    opcount.add_arguments(parser)
    return opcount.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
