"""In-context recall benchmark: same as ``nestlearn bench recall`` (see its --help)."""

from __future__ import annotations

import argparse
import sys

from nestlearn.benchmarks import recall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=recall.__doc__.strip().splitlines()[0])
    recall.add_arguments(parser)
    return recall.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
