"""Shared pieces of the training tests: a small corpus and a tiny run config."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Any

import torch

from nestlearn.training.recipes import get_recipe
from nestlearn.training.runconfig import RunConfig, apply_overrides

WORDS = ("the", "king", "queen", "sword", "crown", "night", "love", "death", "my", "lord",
         "speak", "hath", "thou", "art", "fair", "foul", "and", "of", "to", "a")


def write_corpus(path: Path, paragraphs: int = 240, seed: int = 0) -> Path:
    """A text file of blank-line separated paragraphs (documents) of simple verse."""
    rng = random.Random(seed)
    parts = []
    for _ in range(paragraphs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))).capitalize() + "."
                 for _ in range(rng.randint(2, 4))]
        parts.append("\n".join(lines))
    path.write_text("\n\n".join(parts) + "\n")
    return path


TINY = [
    "model.dim=32", "model.layers=2", "model.heads=2", "model.mlp_hidden=64",
    "data.seq_len=32", "data.batch_size=4",
    "train.steps=12", "train.eval_every=0", "train.eval_iters=2", "train.checkpoint_every=0",
    "train.log_every=1", "schedule.warmup_steps=3", "train.device=cpu",
]


def tiny_sets(*extra: str) -> list[str]:
    """``--set`` arguments for a CLI run of ``TINY`` plus ``extra`` assignments."""
    return [arg for field in (*TINY, *extra) for arg in ("--set", field)]


def tiny_config(corpus: Path, out_dir: Path, *extra: str,
                recipe: str = "tiny-transformer") -> RunConfig:
    """A run of a 2-layer d=32 model on ``corpus`` writing to ``out_dir``."""
    return apply_overrides(
        get_recipe(recipe),
        [*TINY, f"data.corpus={corpus}", f"train.out_dir={out_dir}", *extra],
    )


def spawned_rank(rank: int, world_size: int, port: int, config_dict: dict[str, Any],
                 resume: bool = False, stop_at: int | None = None) -> None:
    """One rank of a gloo run started by ``torch.multiprocessing.spawn``: trains the config
    (``resume`` and ``stop_at`` as for ``train``)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from nestlearn.training import train

    train(RunConfig.from_dict(config_dict), progress=False, resume=resume, stop_at=stop_at)


def train_on_gloo_ranks(config: RunConfig, world_size: int = 2, resume: bool = False,
                        stop_at: int | None = None) -> None:
    """Train ``config`` on ``world_size`` gloo ranks spawned from this process."""
    import torch.multiprocessing as mp

    mp.spawn(spawned_rank, args=(world_size, free_port(), config.to_dict(), resume, stop_at),
             nprocs=world_size, join=True)


def single_and_gloo_rows(corpus: Path, tmp_path: Path, *sets: str
                         ) -> dict[str, list[dict[str, Any]]]:
    """Train ``sets`` once in this process (``tmp_path/single``) and once on two gloo ranks
    (``tmp_path/ddp``); each run's train rows of ``metrics.jsonl``."""
    from nestlearn.training import train
    from nestlearn.training.metrics_log import read_records

    train(tiny_config(corpus, tmp_path / "single", *sets), progress=False)
    train_on_gloo_ranks(tiny_config(corpus, tmp_path / "ddp", *sets))
    return {run: [r for r in read_records(tmp_path / run) if r["split"] == "train"]
            for run in ("single", "ddp")}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
