"""``nestlearn eval RUN_DIR``: loss, perplexity and bits per byte of a trained run."""

from __future__ import annotations

import argparse
import json
import sys

from nestlearn.atomic import atomic_write_text
from nestlearn.errors import invalid


def run(args: argparse.Namespace) -> int:
    from nestlearn.evaluate.perplexity import evaluate_split
    from nestlearn.training import load_trained
    from nestlearn.training.distributed import resolve_device
    from nestlearn.training.run_folder import load_run_split

    if args.seq_len is not None and args.seq_len < 1:
        raise invalid("--seq-len", args.seq_len,
                      "an integer >= 1 (default: the run's data.seq_len)")
    device = resolve_device(args.device)
    model, config, tokenizer, step = load_trained(args.run_dir, device)
    if args.max_batches is not None and args.max_batches < 1:
        raise invalid("--max-batches", args.max_batches, "an integer >= 1")
    split = args.split or config.data.eval_split
    seq_len = args.seq_len if args.seq_len is not None else config.data.seq_len
    token_file = load_run_split(args.run_dir, config, split, tokenizer)
    result = evaluate_split(model, token_file, seq_len, config.data.batch_size, device=device,
                            max_batches=args.max_batches)
    report = {"run": str(args.run_dir), "step": step, "split": split, "seq_len": seq_len,
              **result.to_dict()}
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        print(f"{args.run_dir} step {step} | {split}: loss {result.loss:.4f} nats/token, "
              f"ppl {result.ppl:.2f}, bpb {result.bpb:.4f} ({result.tokens} tokens)", flush=True)
    # printed first: a run folder that cannot be written (read-only, full) still gives the result
    path = args.run_dir / f"eval_{split}.json"
    try:
        atomic_write_text(path, json.dumps(report, indent=2))
    except OSError as err:
        print(f"nestlearn eval: warning: result not saved to {path} ({err.strerror or err})",
              file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from pathlib import Path

    parser = subparsers.add_parser(
        "eval", help="evaluate a trained run: loss, perplexity, bits per byte",
        description="Score every token of a split with the run's latest checkpoint "
                    "(consecutive windows, each target once). Prints the result, then writes "
                    "RUN_DIR/eval_SPLIT.json (a run folder that cannot be written gets a "
                    "warning, and the exit code stays 0).",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="folder written by `nestlearn train`")
    parser.add_argument("--split", choices=("train", "validation", "test"),
                        help="split to score (default: the run's data.eval_split)")
    parser.add_argument("--seq-len", type=int, metavar="T",
                        help="window length (default: the run's data.seq_len)")
    parser.add_argument("--max-batches", type=int, metavar="N",
                        help="stop after N batches (default: the whole split)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when available), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)
