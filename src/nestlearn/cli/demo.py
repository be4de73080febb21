"""``nestlearn demo``: train a tiny model on Shakespeare, evaluate it, sample from it.

The whole path a user takes (recipe -> training with checkpoints -> evaluation -> sampling)
in a few minutes on a laptop CPU. Each recipe has its own run folder (runs/demo for the
default, runs/demo-RECIPE for another), which running it again continues or reuses.
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


def run(args: argparse.Namespace) -> int:
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
        "demo", help="train a tiny model on Shakespeare, evaluate it, sample from it",
        description=__doc__.split("\n\n")[1].strip(),
    )
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help=f"recipe to train (default {DEFAULT_RECIPE}; try tiny-hope, which "
                             "trains in its own folder runs/demo-tiny-hope)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the recipe's; tiny-transformer's 600 "
                             "take about 3 minutes on 2 CPU cores)")
    parser.add_argument("--out", default=None,
                        help="run folder (default runs/demo for the default recipe, "
                             "runs/demo-RECIPE for another)")
    parser.add_argument("--prompt", default="ROMEO:", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=300, metavar="N",
                        help="tokens to sample (default 300)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="FIELD=VALUE", help="override a config field (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
