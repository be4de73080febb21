"""``nestlearn eval RUN_DIR [RUN_DIR ...]``: loss, perplexity and bits per byte of trained runs,
over windows from an empty state or (``--stream``) over whole documents with the state carried,
by position."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from nestlearn.atomic import atomic_write_text
from nestlearn.cli.checkpoint_option import add_checkpoint_argument, resolve_checkpoint
from nestlearn.errors import NestlearnError, invalid


def parse_buckets(text: str | None) -> tuple[int, ...] | None:
    """``--buckets 512,1024,4096`` -> (512, 1024, 4096); None keeps the default edges."""
    if text is None:
        return None
    allowed = "increasing integers >= 1 separated by commas, e.g. 512,1024,2048"
    try:
        edges = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise invalid("--buckets", repr(text), allowed) from None
    if not edges or edges[0] < 1 or any(b <= a for a, b in itertools.pairwise(edges)):
        raise invalid("--buckets", repr(text), allowed)
    return edges


def check_args(args: argparse.Namespace) -> None:
    """Refuse option values before any run is loaded."""
    for option, value, default in (
            ("--seq-len", args.seq_len, " (default: the run's data.seq_len)"),
            ("--segment-len", args.segment_len, " (default: the run's data.seq_len)"),
            ("--max-batches", args.max_batches, ""),
            ("--max-documents", args.max_documents, "")):
        if value is not None and value < 1:
            raise invalid(option, value, f"an integer >= 1{default}")
    if not args.stream:
        for option, value in (("--segment-len", args.segment_len), ("--buckets", args.buckets),
                              ("--plot", args.plot), ("--max-documents", args.max_documents)):
            if value is not None:
                raise NestlearnError(f"{option}: only with --stream")
    elif args.seq_len is not None or args.max_batches is not None:
        option = "--seq-len" if args.seq_len is not None else "--max-batches"
        raise NestlearnError(f"{option}: not with --stream (use --segment-len, "
                             "--max-documents)")
    if args.checkpoint is not None and len(args.run_dirs) > 1 and not args.checkpoint.isdigit():
        raise NestlearnError("--checkpoint: with several runs, only a step number")


def evaluate_run(args: argparse.Namespace, run_dir: Path, buckets: tuple[int, ...] | None
                 ) -> tuple[dict[str, Any], Any]:
    """Evaluate one run; returns its report (JSON-ready) and the result object."""
    from nestlearn.cli.progress import ProgressBar
    from nestlearn.evaluate.perplexity import evaluate_split
    from nestlearn.evaluate.stream import evaluate_stream
    from nestlearn.training import load_trained
    from nestlearn.training.distributed import resolve_device
    from nestlearn.training.run_folder import load_run_split

    device = resolve_device(args.device)
    checkpoint = resolve_checkpoint(run_dir, args.checkpoint)
    model, config, tokenizer, step = load_trained(run_dir, device, checkpoint)
    split = args.split or config.data.eval_split
    token_file = load_run_split(run_dir, config, split, tokenizer)
    report: dict[str, Any] = {"run": str(run_dir), "step": step, "split": split}
    if checkpoint is not None:
        report["checkpoint"] = str(checkpoint)
    show = not args.no_progress
    if args.stream:
        segment_len = args.segment_len or config.data.seq_len
        with ProgressBar(f"eval {run_dir.name} (stream)", "tok", show) as bar:
            result = evaluate_stream(model, token_file, segment_len=segment_len,
                                     batch_size=config.data.batch_size, buckets=buckets,
                                     device=device, max_documents=args.max_documents,
                                     progress=bar)
        report["mode"] = "stream"
    else:
        seq_len = args.seq_len if args.seq_len is not None else config.data.seq_len
        with ProgressBar(f"eval {run_dir.name}", "batch", show) as bar:
            result = evaluate_split(model, token_file, seq_len, config.data.batch_size,
                                    device=device, max_batches=args.max_batches, progress=bar)
        report["seq_len"] = seq_len
    report.update(result.to_dict())
    return report, result


def result_path(run_dir: Path, report: dict[str, Any], checkpoint: str | None) -> Path:
    """``eval_SPLIT.json`` (``eval_stream_SPLIT.json``), with ``_step_N`` for a chosen
    checkpoint so the latest one's result is not overwritten."""
    stem = "eval_stream" if report.get("mode") == "stream" else "eval"
    tail = f"_step_{report['step']}" if checkpoint is not None else ""
    return run_dir / f"{stem}_{report['split']}{tail}.json"


def print_report(args: argparse.Namespace, run_dir: Path, report: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(report), flush=True)
        return
    mode = " (stream)" if args.stream else ""
    print(f"{run_dir} step {report['step']} | {report['split']}{mode}: loss "
          f"{report['loss']:.4f} nats/token, ppl {report['ppl']:.2f}, bpb {report['bpb']:.4f} "
          f"({report['tokens']} tokens)", flush=True)


def save_text(path: Path, text: str) -> None:
    # printed first: a run folder that cannot be written (read-only, full) still gives the result
    try:
        atomic_write_text(path, text)
    except OSError as err:
        print(f"nestlearn eval: warning: result not saved to {path} ({err.strerror or err})",
              file=sys.stderr)


# Options a caller that builds its own Namespace (``nestlearn demo``) may leave out.
OPTIONAL_DEFAULTS = {"stream": False, "segment_len": None, "buckets": None,
                     "max_documents": None, "plot": None, "checkpoint": None,
                     "no_progress": False}


def run(args: argparse.Namespace) -> int:
    from nestlearn.evaluate.report import markdown_table, plot_loss_by_position

    args = argparse.Namespace(**{**OPTIONAL_DEFAULTS, **vars(args)})
    if not hasattr(args, "run_dirs"):
        args.run_dirs = [args.run_dir]
    check_args(args)
    buckets = parse_buckets(args.buckets)
    results = {}
    for run_dir in args.run_dirs:
        report, result = evaluate_run(args, run_dir, buckets)
        print_report(args, run_dir, report)
        save_text(result_path(run_dir, report, args.checkpoint), json.dumps(report, indent=2))
        results[_unique_name(run_dir, results)] = result
    if args.stream:
        table = markdown_table(results)
        if not args.json:
            print(table, end="", flush=True)
        if args.plot is not None:
            path = plot_loss_by_position(results, args.plot)
            save_text(path.with_suffix(".md"), table)
            print(f"plot: {path}", file=sys.stderr)
    return 0


def _unique_name(run_dir: Path, taken: dict[str, Any]) -> str:
    """A run's name in the table and plot: its folder name (its path when names clash)."""
    return run_dir.name if run_dir.name not in taken else str(run_dir)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate trained runs: loss, perplexity, bits per byte (by position "
                     "with --stream)",
        description="Score every token of a split with each run's latest checkpoint (or "
                    "--checkpoint). By default over consecutive windows of --seq-len tokens, "
                    "each from an empty state; with --stream over whole documents read in "
                    "segments with the model's state carried, reported also by position in "
                    "the document (the curve that shows long-context use). Prints each "
                    "result, then writes RUN_DIR/eval_SPLIT.json (eval_stream_SPLIT.json; "
                    "a run folder that cannot be written gets a warning, and the exit code "
                    "stays 0). A progress bar is drawn when stderr is a terminal.",
    )
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                        help="folder written by `nestlearn train` (several: one row or line "
                             "each, compared in the --stream table and --plot)")
    parser.add_argument("--split", choices=("train", "validation", "test"),
                        help="split to score (default: the run's data.eval_split)")
    parser.add_argument("--seq-len", type=int, metavar="T",
                        help="window length (default: the run's data.seq_len)")
    parser.add_argument("--max-batches", type=int, metavar="N",
                        help="stop after N batches (default: the whole split)")
    parser.add_argument("--stream", action="store_true",
                        help="read whole documents with the state carried; report the loss "
                             "by position bucket too")
    parser.add_argument("--segment-len", type=int, metavar="N",
                        help="--stream: tokens per segment (default: the run's data.seq_len)")
    parser.add_argument("--buckets", metavar="E1,E2,...",
                        help="--stream: positions where loss buckets start after 0 (default: "
                             "512,1024,2048,... up to the longest document)")
    parser.add_argument("--max-documents", type=int, metavar="N",
                        help="--stream: only the first N documents (default: all)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="--stream: write a PNG of loss by position, one line per run, "
                             "and its markdown table beside it (FILE.md); needs matplotlib")
    add_checkpoint_argument(parser)
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when available), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--json", action="store_true", help="print each result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
