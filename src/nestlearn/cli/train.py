"""``nestlearn train``: train a model from a recipe, with any field overridden.

Examples::

    nestlearn train --list-recipes
    nestlearn train --recipe tiny-transformer --set train.steps=50 --out runs/x
    nestlearn train --out runs/x --resume --set train.steps=200
    torchrun --nproc_per_node 2 -m nestlearn train --recipe tiny-hope --out runs/ddp
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from nestlearn.errors import NestlearnError, invalid

if TYPE_CHECKING:
    from nestlearn.training.runconfig import RunConfig

EPILOG = """\
Fields (--set SECTION.FIELD=VALUE, see `--show-config` for the values of a recipe):
  model.*     architecture: arch, dim, layers, heads, mlp_hidden, ... (nestlearn.models)
  data.*      corpus (shakespeare, wiki, a path to text or a `nestlearn data tokenize`
              folder), tokenizer (byte, bpe), vocab_size,
              seq_len, batch_size (global, split over torchrun processes), train_split,
              eval_split
  optim.*     name (adamw, sgd, muon, m3, delta-momentum, preconditioned-momentum,
              deep-momentum), lr, weight_decay, betas (e.g. 0.9,0.95), momentum, eps,
              fallback_lr
  schedule.*  kind (cosine, constant), warmup_steps, min_lr_ratio
  train.*     steps, grad_clip, eval_every, eval_iters, checkpoint_every, keep_checkpoints,
              log_every, seed, device (auto, cpu, cuda, cuda:N), dtype (float32, float64),
              autocast (auto = bf16 on CUDA, bf16, off), out_dir, find_unused_parameters,
              memory_check (true: refuse a step estimated not to fit in memory)

The run folder gets config.json, data/ (the `nestlearn data tokenize` folder of the corpus,
unless data.corpus is one), checkpoints/ (the latest is the model: nestlearn eval, nestlearn
generate and nestlearn.models.from_pretrained read it), metrics.jsonl, metrics.csv and
loss_curve.png. Ctrl-C (SIGINT) or SIGTERM saves a checkpoint and
stops (a second one stops at once, without saving); --resume continues it with the same
losses an uninterrupted run would have had. A step that cannot fit in memory is refused
before the first (train.memory_check=false tries anyway); a full disk or running out of
memory during training ends with one line naming the last good checkpoint (exit code 1).
One run at a time writes a folder: while it runs, RUN/train.lock names it (pid, host, start)
and a second train on the folder is refused.
"""


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", metavar="NAME",
                        help="start from this recipe (see --list-recipes); default "
                             "tiny-transformer, or the run's own config with --resume")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="FIELD=VALUE",
                        help="override one config field, e.g. --set model.dim=256 "
                             "(repeatable; parsed to the field's type)")
    parser.add_argument("--out", metavar="DIR",
                        help="run folder (same as --set train.out_dir=DIR)")


def build_config(args: argparse.Namespace) -> RunConfig:
    """The run config from --recipe / the run's config (--resume), --set and --out."""
    from nestlearn.training.recipes import get_recipe
    from nestlearn.training.run_folder import CONFIG_FILE, load_run_config
    from nestlearn.training.runconfig import apply_overrides

    overrides = list(args.overrides)
    if args.out is not None and not args.out.strip():
        raise invalid("--out", repr(args.out), "a folder path (not empty)")
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    if getattr(args, "resume", False) and not args.recipe:
        if not args.out:
            raise NestlearnError("--resume: needs --out RUN_DIR (the run to continue)")
        from pathlib import Path

        if not (Path(args.out) / CONFIG_FILE).exists():
            raise NestlearnError(f"--resume: {args.out!r} has no {CONFIG_FILE}; not a run folder")
        base = load_run_config(args.out)
    else:
        base = get_recipe(args.recipe or "tiny-transformer")
    return apply_overrides(base, overrides)


def run(args: argparse.Namespace) -> int:
    if args.list_recipes:
        from nestlearn.training.recipes import list_recipes

        recipes = list_recipes()
        width = max(len(r.name) for r in recipes)
        for recipe in recipes:
            print(f"{recipe.name:<{width}}  {recipe.description}")
        return 0
    config = build_config(args)
    if args.show_config:
        print(config.to_json())
        return 0
    from nestlearn.training import train

    result = train(config, resume=args.resume, progress=not args.no_progress)
    if result.rank != 0:
        return 130 if result.status == "interrupted" else 0
    if result.status == "already_complete":
        print(result.note)
        return 0
    if result.status == "interrupted":
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}; continue with: "
              f"nestlearn train --out {result.run_dir} --resume", file=sys.stderr)
        return 130
    final = result.evals.get(result.step)
    summary = f"trained {result.step} steps -> {result.run_dir}"
    if final:
        summary += (f" | eval loss {final['loss']:.4f}, ppl {final['ppl']:.2f}, "
                    f"bpb {final['bpb']:.4f}")
    print(summary)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model from a recipe (checkpoints, resume, torchrun)",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint (its "
                             "config, plus --set changes of steps/eval/checkpoint fields)")
    parser.add_argument("--list-recipes", action="store_true",
                        help="print the recipes with a one-line description and exit")
    parser.add_argument("--show-config", action="store_true",
                        help="print the resulting config as JSON and exit without training")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (metrics are still written)")
    parser.set_defaults(func=run)
