"""``nestlearn ablate``: one arch on one stream or task, once per variant (a switch changed).

Variants (``nestlearn.continual.ablation.VARIANTS``): CMS with 1-4 levels, other update
frequencies (CMS and memory chunk sizes), and without DGD, momentum, weight decay, CMS, the
inner k / v memories, or with an inner q memory. ``--variants paper`` (default) runs those of
the paper's table that fit the arch. Writes ``OUT/ablation.md`` (table), ``ablation.png`` and
``ablation.json``; a stream also writes its full continual report beside them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nestlearn.errors import NestlearnError

if TYPE_CHECKING:
    from nestlearn.continual.ablation import Variant


def run_stream_ablation(args: argparse.Namespace, variants: Sequence[Variant], out: Path
                        ) -> Path:
    """``args.arch`` on a continual stream once per variant under ``args.method``: the full
    continual report in ``out`` (one row label per variant) and the ablation table of the
    average final score (``average_accuracy``) and, for LM / forecast, the average final
    loss."""
    from nestlearn.cli.continual import (
        choose_lr,
        load_stream,
        monitor_spec,
        parse_assignments,
        progress_line,
        stream_settings,
    )
    from nestlearn.continual.ablation import ablation_table, variant_label, write_ablation
    from nestlearn.continual.runner import RowSpec, run_suite

    size = parse_assignments(args.size, "--size")
    stream = load_stream(args.stream, args.stream_seed, size)
    args.archs, args.monitor_every, args.rollback_threshold = args.arch, None, None
    lr = choose_lr(args, stream)
    specs, labels = [], []
    for variant in variants:
        for seed in args.seeds:
            specs.append(RowSpec(method=args.method, arch=args.arch, seed=seed,
                                 steps_per_task=args.steps, batch_size=args.batch_size, lr=lr,
                                 state_policy=args.state_policy,
                                 model_sets=(*args.set, *variant.sets),
                                 eval_budget=args.eval_budget))
            labels.append(variant_label(args.arch, variant))
    progress_line(f"ablation of {args.arch} on {stream.name}: {len(variants)} variants x "
                  f"{len(args.seeds)} seeds -> {out}")
    results = run_suite(stream, specs, out, progress=progress_line,
                        settings=stream_settings(args, size), labels=labels,
                        monitor=monitor_spec(args), retrain=args.retrain)
    entries = []
    for variant in variants:
        label = variant_label(args.arch, variant)
        mine = [row for row in results["rows"] if row["arch"] == label]
        entries.append({"variant": variant.name, "description": variant.description,
                        "sets": list(variant.sets), "seeds": [row["seed"] for row in mine],
                        "values": [row["metrics"]["average_accuracy"] for row in mine],
                        "loss": [row["metrics"].get("loss_average") for row in mine],
                        "forgetting": [row["metrics"].get("forgetting") for row in mine]})
    notes = [f"Stream `{stream.name}` ({len(stream.tasks)} tasks), arch `{args.arch}`, method "
             f"`{args.method}`, {args.steps} steps per task, seeds {list(args.seeds)}. The "
             "full continual report (matrices, curves) is [report.md](report.md)."]
    if stream.kind != "classification":
        loss_entries = [{**e, "values": e["loss"]} for e in entries]
        notes += ["", "Average final loss over the tasks (lower is better):", "",
                  ablation_table(loss_entries, "loss_average", False)]
    forgetting_entries = [{**e, "values": e["forgetting"]} for e in entries]
    notes += ["", "Forgetting (mean drop from each task's best score; lower is better):", "",
              ablation_table(forgetting_entries, "forgetting", False)]
    return write_ablation(out, f"{stream.name} / {args.arch}", entries,
                          "average_accuracy", True, notes)


# (attribute, flag, default) of the options only one mode reads
STREAM_ONLY = (("method", "--method", "nested"), ("steps", "--steps", 100),
               ("batch_size", "--batch-size", 16), ("lr", "--lr", "1e-3"),
               ("state_policy", "--state-policy", None), ("eval_budget", "--eval-budget", None),
               ("size", "--size", []), ("stream_seed", "--stream-seed", 0),
               ("retrain", "--retrain", False))
TASK_ONLY = (("task_steps", "--task-steps", None), ("quick", "--quick", False))


def run(args: argparse.Namespace) -> int:
    from nestlearn.cli.continual import split_list
    from nestlearn.continual.ablation import resolve_variants, run_task_ablation
    from nestlearn.continual.runner import model_config

    if (args.stream is None) == (args.task is None):
        raise NestlearnError("ablate: give exactly one of --stream NAME|FILE or --task NAME")
    # an option of the other mode would silently do nothing: refuse it by name
    wrong = STREAM_ONLY if args.task is not None else TASK_ONLY
    given = [flag for name, flag, default in wrong if getattr(args, name) != default]
    if given:
        mode = "--task" if args.task is not None else "--stream"
        raise NestlearnError(f"{', '.join(given)}: not used with {mode}")
    # the variants are checked against the arch's model before anything trains
    probe = model_config(args.arch, 32, tuple(args.set))
    variants = resolve_variants(split_list(args.variants), probe)
    out = Path(args.out)
    if args.task is not None:
        path = run_task_ablation(args.task, args.arch, variants, args.seeds, args.task_steps,
                                 out, tuple(args.set), args.quick)
    else:
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
