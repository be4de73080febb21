"""``nestlearn continual``: run continual-learning streams with baselines and nested models.

``continual list`` shows the built-in streams (with their size knobs), the methods (with
their options) and the archs. ``continual run`` trains every (method, arch, seed) row on one
stream and writes ``OUT/results.json``, ``OUT/report.md`` and the plots; rows already in
``OUT/rows/`` with the same settings are reused, so a stopped run continues where it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from nestlearn.errors import NestlearnError

STREAM_FILE_SUFFIXES = (".json", ".toml")


def progress_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_value(text: str) -> Any:
    """A JSON value (number, true/false, null, list) or else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(items: list[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise NestlearnError(f"{flag}: got {item!r}; allowed: KEY=VALUE")
        out[key.strip()] = parse_value(value.strip())
    return out


def method_options_by_name(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--option METHOD.KEY=VALUE`` (repeatable) as ``{method: {key: value}}``."""
    options: dict[str, dict[str, Any]] = {}
    for key, value in parse_assignments(items, "--option").items():
        method, dot, name = key.partition(".")
        if not dot or not name:
            raise NestlearnError(f"--option: got {key!r}; allowed: METHOD.KEY=VALUE, "
                                 "e.g. ewc.lambda=100")
        options.setdefault(method, {})[name] = value
    return options


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def load_stream(name: str, seed: int, size: dict[str, Any]) -> Any:
    """A built-in stream by name, or the user's stream file (``.json`` / ``.toml``)."""
    from nestlearn.continual.streams import STREAM_NAMES, build_stream, load_stream_file

    if name.endswith(STREAM_FILE_SUFFIXES) or Path(name).is_file():
        if size:
            raise NestlearnError(f"--size: a stream file sets its own sizes; got {size}")
        return load_stream_file(name)
    if name not in STREAM_NAMES:
        raise NestlearnError(f"--stream: got {name!r}; allowed: {', '.join(STREAM_NAMES)} or "
                             "a stream file (.json or .toml)")
    return build_stream(name, seed=seed, **size)


def list_all(args: argparse.Namespace) -> int:
    from nestlearn.continual.methods import METHOD_DEFAULTS
    from nestlearn.continual.runner import ROW_ARCHS
    from nestlearn.continual.streams import STREAM_NAMES, stream_knobs

    print("streams (--stream NAME, --size KNOB=VALUE):")
    for name in STREAM_NAMES:
        knobs = ", ".join(f"{k}={v}" for k, v in stream_knobs(name).items())
        print(f"  {name:16s} {knobs}")
    print("  or a stream file of your own (.json / .toml): see src/nestlearn/continual/"
          "README.md")
    print("methods (--methods, --option METHOD.KEY=VALUE):")
    for name, defaults in METHOD_DEFAULTS.items():
        shown = ", ".join(f"{k}={v}" for k, v in defaults.items()) or "no options"
        print(f"  {name:16s} {shown}")
    print(f"archs (--archs): {', '.join(ROW_ARCHS)}")
    return 0


def row_specs(args: argparse.Namespace, lr: float) -> list[Any]:
    from nestlearn.continual.runner import RowSpec

    options = method_options_by_name(args.option)
    pairs = [(m, a) for m in split_list(args.methods) for a in split_list(args.archs)]
    for item in args.row:
        method, slash, arch = item.partition("/")
        if not slash:
            raise NestlearnError(f"--row: got {item!r}; allowed: METHOD/ARCH, e.g. nested/hope")
        pairs.append((method.strip(), arch.strip()))
    if not pairs:
        raise NestlearnError("no rows: give --methods and --archs, or --row METHOD/ARCH")
    unknown = sorted(set(options) - {m for m, _ in pairs})
    if unknown:
        raise NestlearnError(f"--option: methods {unknown} are not run; run: "
                             f"{sorted({m for m, _ in pairs})}")
    pairs = list(dict.fromkeys(pairs))
    return [RowSpec(method=method, arch=arch, seed=seed, steps_per_task=args.steps,
                    batch_size=args.batch_size, lr=lr, state_policy=args.state_policy,
                    model_sets=tuple(args.set), options=options.get(method, {}),
                    eval_budget=args.eval_budget)
            for method, arch in pairs for seed in args.seeds]


def parse_lr(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise NestlearnError(f"--lr: got {text!r}; allowed: a number or 'tune'") from None


def choose_lr(args: argparse.Namespace, stream: Any) -> float:
    """``--lr`` as given, or ``tune``: the first task's validation split picks it (per the
    first arch asked; tuning.py says why only the first task)."""
    if args.lr != "tune":
        return parse_lr(args.lr)
    from nestlearn.continual.runner import RowSpec
    from nestlearn.continual.tuning import tune_lr

    arch = split_list(args.archs)[0] if split_list(args.archs) else "transformer"
    spec = RowSpec(method="finetune", arch=arch, seed=args.seeds[0], steps_per_task=args.steps,
                   batch_size=args.batch_size, model_sets=tuple(args.set),
                   eval_budget=args.eval_budget)
    best, table = tune_lr(stream, spec)
    for entry in table:
        progress_line(f"tune: lr {entry['lr']:g}: validation score {entry['score']:.4f}, "
                      f"loss {entry['loss']:.4f}")
    progress_line(f"tune: lr {best:g} (first task's validation split only)")
    return best


def stream_settings(args: argparse.Namespace, size: dict[str, Any]) -> dict[str, Any]:
    """What, besides the rows' specs, decides a stored row's reuse: the stream asked for."""
    return {"stream_arg": args.stream, "size": size, "stream_seed": args.stream_seed}


def monitor_spec(args: argparse.Namespace) -> Any:
    from nestlearn.continual.runner import MonitorSpec

    if args.monitor_every is None:
        if args.rollback_threshold is not None:
            raise NestlearnError("--rollback-threshold needs --monitor-every N")
        return None
    return MonitorSpec(args.monitor_every, args.rollback_threshold)


def run(args: argparse.Namespace) -> int:
    from nestlearn.continual.runner import run_suite

    if args.steps < 1 or args.batch_size < 1:
        raise NestlearnError(f"--steps {args.steps}, --batch-size {args.batch_size}; "
                             "allowed: integers >= 1")
    size = parse_assignments(args.size, "--size")
    monitor = monitor_spec(args)
    stream = load_stream(args.stream, args.stream_seed, size)
    # every row is checked before any training, tuning included
    specs = row_specs(args, 1e-3 if args.lr == "tune" else parse_lr(args.lr))
    if args.lr == "tune":
        lr = choose_lr(args, stream)
        specs = [dataclasses.replace(spec, lr=lr) for spec in specs]
    progress_line(f"stream {stream.name}: {len(stream.tasks)} tasks "
                  f"({', '.join(stream.task_names)}); {len(specs)} rows -> {args.out}")
    run_suite(stream, specs, args.out, progress=progress_line,
              settings=stream_settings(args, size), monitor=monitor, retrain=args.retrain)
    print(Path(args.out) / "report.md")
    return 0


def add_run_arguments(parser: argparse.ArgumentParser, *, steps: int, seeds: list[int]
                      ) -> None:
    """The row options shared by ``continual run`` and ``ablate``."""
    parser.add_argument("--seeds", nargs="+", type=int, default=seeds, metavar="SEED",
                        help=f"seeds (default: {' '.join(map(str, seeds))})")
    parser.add_argument("--steps", type=int, default=steps,
                        help=f"training steps per task (default {steps})")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--lr", default="1e-3",
                        help="learning rate, or 'tune': chosen on the first task's validation "
                             "split (default 1e-3)")
    parser.add_argument("--state-policy", choices=("reset", "carry"), default=None,
                        help="memory state between segments, tasks and at evaluation "
                             "(default: carry for nested and inner-only, else reset)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a model config field for every arch that has it, e.g. dim=64 "
                             "(repeatable)")
    parser.add_argument("--eval-budget", type=int, default=None, metavar="N",
                        help="tokens (LM, forecast) or rows (classification) evaluated per "
                             "split (default: the learner's)")
    parser.add_argument("--size", action="append", default=[], metavar="KNOB=VALUE",
                        help="a size knob of a built-in stream, e.g. train_tokens=50000 "
                             "(repeatable; `nestlearn continual list` shows them)")
    parser.add_argument("--stream-seed", type=int, default=0,
                        help="seed of the stream's own draws (splits, permutations; default 0)")
    parser.add_argument("--retrain", action="store_true",
                        help="train rows again even where OUT/rows holds them with the same "
                             "settings (after a change of the code)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "continual", help="continual-learning streams: baselines vs nested models, with reports",
        description=__doc__.split("\n\n")[1].strip())
    commands = parser.add_subparsers(dest="continual_command", metavar="COMMAND", required=True)
    listing = commands.add_parser("list", help="streams, methods (with options) and archs")
    listing.set_defaults(func=list_all)
    runner = commands.add_parser(
        "run", help="train every method x arch x seed on a stream; write the report",
        description="Train each row on the stream's tasks in order and score every task "
                    "after each one (R[i, j]); write OUT/results.json, report.md and PNGs.")
    runner.add_argument("--stream", required=True,
                        help="a built-in stream (see `continual list`) or a stream file")
    runner.add_argument("--methods", default="finetune,ewc,replay",
                        help="comma-separated methods (default finetune,ewc,replay)")
    runner.add_argument("--archs", default="transformer",
                        help="comma-separated archs (default transformer)")
    runner.add_argument("--row", action="append", default=[], metavar="METHOD/ARCH",
                        help="one more row besides --methods x --archs, e.g. nested/hope "
                             "(repeatable)")
    runner.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a method option, e.g. ewc.lambda=100 (repeatable)")
    runner.add_argument("--out", default="results/continual", help="output folder")
    runner.add_argument("--monitor-every", type=int, default=None, metavar="N",
                        help="log each level's drift, update norm, surprise and guard loss "
                             "every N steps (monitor.png in the report)")
    runner.add_argument("--rollback-threshold", type=float, default=None, metavar="F",
                        help="with --monitor-every: roll the weights back to the last "
                             "snapshot when the guard loss (first task's validation batch) "
                             "rises by more than this fraction, e.g. 0.2")
    add_run_arguments(runner, steps=100, seeds=[0, 1, 2])
    runner.set_defaults(func=run)
