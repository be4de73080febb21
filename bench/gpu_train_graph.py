"""``nestlearn train``'s step with ``train.cuda_graph`` on and off, on one CUDA GPU.

Per arch (the models of ``bench layers``, at about the Transformer's parameter count), two
runs of the library's ``Trainer`` from the same seed on the same batches (byte tokens of a
generated text, ``--batch`` x ``--length``, bf16 autocast, AdamW): eager, then with the
step's forward and backward replayed from a CUDA graph (the first three steps warm up
eagerly, the fourth captures). Reported: the median step time of the steps after the capture
in each run, their tok/s and ratio, and the largest relative difference between the two
runs' losses over the steps (the same kernels, so they differ only by atomics' summation
order, which the updates carry forward).

Usage: ``python bench/gpu_train_graph.py --out results/gpu`` on a CUDA machine
(``bench/gpu_check.sh`` runs it). There is no CPU mode: CUDA graphs need a GPU; the
Trainer's graphed step is tied to the eager one on CPU by ``tests/test_train_cuda_graph.py``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from nestlearn.benchmarks.opcount import add_gpu_arguments, rows_per_arch_in_fresh_processes
from nestlearn.models import ModelConfig
from nestlearn.training import Trainer
from nestlearn.training.recipes import get_recipe
from nestlearn.training.runconfig import RunConfig

COLUMNS = ["arch", "T", "B", "steps", "eager tok/s", "graph tok/s", "speedup",
           "max loss rel diff", "note"]
WARMUP = 4  # steps left out of the timing: three eager warm-up steps and the capture


def write_text(path: Path, documents: int = 2000, words: int = 200) -> Path:
    """A fixed text of random words in blank-line separated documents (a byte corpus that
    needs no preparing)."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9)))
                  for _ in range(2000)]
    path.write_text("\n\n".join(" ".join(rng.choice(vocabulary) for _ in range(words))
                                  for _ in range(documents)))
    return path


def run_config(model: dict[str, Any], corpus: Path, out_dir: Path, args: argparse.Namespace,
               cuda_graph: bool) -> RunConfig:
    """A short windows run of ``model`` on the byte text ``corpus``: no evaluation or
    checkpoints, bf16 on CUDA, AdamW, the CUDA graph on or off."""
    config = get_recipe("tiny-transformer").to_dict()
    config["model"] = model
    config["data"].update(corpus=str(corpus), tokenizer="byte", seq_len=args.length,
                          batch_size=args.batch, sampling="windows")
    config["train"].update(steps=args.steps, eval_every=0, checkpoint_every=0, device="cuda",
                           autocast="bf16", cuda_graph=cuda_graph, out_dir=str(out_dir),
                           memory_check=False, state_reset="document")
    config["optim"].update(name="adamw")
    return RunConfig.from_dict(config)


def train_steps(model: dict[str, Any], args: argparse.Namespace, cuda_graph: bool
                ) -> tuple[list[float], list[float]]:
    """One run's losses and step seconds."""
    with tempfile.TemporaryDirectory() as folder:
        corpus = write_text(Path(folder) / "words.txt")
        trainer = Trainer(run_config(model, corpus, Path(folder) / "run", args, cuda_graph),
                          progress=False)
        try:
            records = [trainer.train_step() for _ in range(args.steps)]
        finally:
            trainer.lock.release()
    return [r.loss for r in records], [r.seconds for r in records]


def compare_arch(arch: str, config: ModelConfig, args: argparse.Namespace
                 ) -> dict[str, Any]:
    """One arch's row: an eager run and a graphed run of the Trainer, from the same seed."""
    model = config.to_dict()
    row: dict[str, Any] = {"arch": arch, "T": args.length, "B": args.batch,
                           "steps": args.steps, "note": ""}
    tokens = args.batch * args.length
    eager_losses, eager_seconds = train_steps(model, args, cuda_graph=False)
    row["eager tok/s"] = tokens / statistics.median(eager_seconds[WARMUP:])
    try:
        graph_losses, graph_seconds = train_steps(model, args, cuda_graph=True)
    except Exception as err:  # name why the graphed run failed instead of stopping the table
        row["note"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return row
    row["graph tok/s"] = tokens / statistics.median(graph_seconds[WARMUP:])
    row["speedup"] = row["graph tok/s"] / row["eager tok/s"]
    row["max loss rel diff"] = max(abs(g - e) / abs(e)
                                   for g, e in zip(graph_losses, eager_losses, strict=True))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_gpu_arguments(parser)
    parser.add_argument("--steps", type=int, default=10,
                        help=f"steps per run, the first {WARMUP} untimed (default: 10)")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP:
        parser.error(f"--steps: got {args.steps}; allowed: an integer > {WARMUP}")
    if not torch.cuda.is_available():
        print("gpu_train_graph: error: CUDA graphs need a CUDA device "
              "(torch.cuda.is_available() is false here)", file=sys.stderr)
        return 2
    rows_per_arch_in_fresh_processes("gpu-train-graph", COLUMNS, args,
                                     "training (eager, then graphed)", compare_arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
