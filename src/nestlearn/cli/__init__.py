"""The ``nestlearn`` command: one sub-command per module in this package.

Each module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from nestlearn import __version__
from nestlearn.errors import NestlearnError, NonFiniteError, ResourceError

# Sub-command modules, in the order `nestlearn --help` lists them.
COMMANDS: tuple[str, ...] = ("info", "bench", "data", "train", "eval", "generate", "export",
                             "stack", "tasks", "continual", "ablate", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nestlearn",
        description="Nested Learning in PyTorch: HOPE, Titans, CMS, deep optimizers.",
    )
    parser.add_argument("--version", action="version", version=f"nestlearn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"nestlearn.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (NestlearnError, NonFiniteError) as err:
        print(f"nestlearn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ResourceError as err:
        print(f"nestlearn {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nestlearn {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, as other command-line tools do.
        sys.stderr.close()
        return 0
