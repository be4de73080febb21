"""``nestlearn tasks``: synthetic in-context tasks (MQAR, S-NIAH, formal languages, copy)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nestlearn.tasks.models import TASK_ARCHS
from nestlearn.tasks.registry import GROUPS, TASK_NAMES, task_spec
from nestlearn.tasks.runner import TaskRun, run_tasks


def list_tasks(args: argparse.Namespace) -> int:
    for name in TASK_NAMES:
        spec, quick = task_spec(name), task_spec(name, quick=True)
        print(f"{name:12s} {spec.description}")
        print(f"{'':12s} budget {spec.budget.steps} steps x {spec.budget.batch_size}, "
              f"--quick {quick.budget.steps} x {quick.budget.batch_size}")
    for group, members in GROUPS.items():
        print(f"{group:12s} group: {', '.join(members)}")
    return 0


def run(args: argparse.Namespace) -> int:
    request = TaskRun(args.name, tuple(args.archs), tuple(args.seeds), args.steps,
                      Path(args.out), args.quick, tuple(args.set), args.corpus, args.retrain)
    for folder in run_tasks(request):
        print(folder / "results.md")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tasks", help="train tiny models on synthetic in-context tasks and report accuracy",
        description="Synthetic in-context tasks: multi-query associative recall, needle in a "
                    "haystack, formal languages and in-context copy.")
    commands = parser.add_subparsers(dest="tasks_command", metavar="COMMAND", required=True)
    listing = commands.add_parser("list", help="the tasks, their groups and budgets")
    listing.set_defaults(func=list_tasks)
    runner = commands.add_parser(
        "run", help="train every arch and seed on a task; write JSON, markdown and PNGs",
        description="Train tiny models of each arch on NAME (a task or a group), score them "
                    "and write OUT/NAME/results.{json,md} and plots. Runs already in OUT with "
                    "the same settings are reused.")
    runner.add_argument("name", metavar="NAME",
                        help=f"one of {', '.join(TASK_NAMES)}; groups: {', '.join(GROUPS)}")
    runner.add_argument("--archs", nargs="+", default=list(TASK_ARCHS), metavar="ARCH",
                        help=f"archs to train (default: {' '.join(TASK_ARCHS)})")
    runner.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED",
                        help="seeds (default: 0 1 2)")
    runner.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the task's budget, see `tasks list`)")
    runner.add_argument("--out", default="results/tasks", help="output folder")
    runner.add_argument("--quick", action="store_true",
                        help="the quick budget and sizes: a smoke run of a minute or two")
    runner.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a model config field for every arch that has it, e.g. "
                             "memory.chunk_size=8 or dim=64 (repeatable)")
    runner.add_argument("--corpus", default=None,
                        help="haystack text of s-niah-2/3: shakespeare (default) or wiki")
    runner.add_argument("--retrain", action="store_true",
                        help="train the asked runs again even where OUT holds runs with the "
                             "same settings (after a change of the code)")
    runner.set_defaults(func=run)
