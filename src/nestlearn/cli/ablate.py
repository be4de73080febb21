"""``nestlearn ablate``: one arch on one stream or task, once per variant (a switch changed).

Variants (``nestlearn.continual.ablation.VARIANTS``): CMS with 1-4 levels, other update
frequencies (CMS and memory chunk sizes), and without DGD, momentum, weight decay, CMS, the
inner k / v memories, or with an inner q memory. ``--variants paper`` (default) runs those of
the paper's table that fit the arch. Writes ``OUT/ablation.md`` (table), ``ablation.png`` and
``ablation.json``; a stream also writes its full continual report beside them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nestlearn.errors import NestlearnError


def run(args: argparse.Namespace) -> int:
    from nestlearn.cli.continual import split_list
    from nestlearn.continual.ablation import resolve_variants, run_task_ablation
    from nestlearn.continual.runner import model_config

    if (args.stream is None) == (args.task is None):
        raise NestlearnError("ablate: give exactly one of --stream NAME|FILE or --task NAME")
    # the variants are checked against the arch's model before anything trains
    probe = model_config(args.arch, 32, tuple(args.set))
    variants = resolve_variants(split_list(args.variants), probe)
    out = Path(args.out)
    if args.task is not None:
        path = run_task_ablation(args.task, args.arch, variants, args.seeds, args.task_steps,
                                 out, tuple(args.set), args.quick)
    else:
        from nestlearn.continual.ablation import run_stream_ablation

        path = run_stream_ablation(args, variants, out)
    print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from nestlearn.cli.continual import add_run_arguments

    parser = subparsers.add_parser(
        "ablate", help="one arch on a stream or task, once per ablation variant",
        description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--stream", default=None,
                        help="a continual stream (see `nestlearn continual list`) or file")
    parser.add_argument("--task", default=None,
                        help="a synthetic task instead (see `nestlearn tasks list`)")
    parser.add_argument("--arch", default="hope", help="the arch to ablate (default hope)")
    parser.add_argument("--variants", default="paper",
                        help="comma-separated variants or groups (paper, all; default paper)")
    parser.add_argument("--method", default="nested",
                        help="the continual method of a stream's rows (default nested)")
    parser.add_argument("--task-steps", type=int, default=None,
                        help="training steps of a task (default: the task's budget)")
    parser.add_argument("--quick", action="store_true",
                        help="a task's quick budget and sizes (a smoke run)")
    parser.add_argument("--out", default="results/ablate", help="output folder")
    add_run_arguments(parser, steps=100, seeds=[0, 1, 2])
    parser.set_defaults(func=run)
