"""Shared pieces of the training tests: a small corpus and a tiny run config."""

from __future__ import annotations

import random
from pathlib import Path

from nestlearn.recipes import get_recipe
from nestlearn.runconfig import RunConfig, apply_overrides

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


def tiny_config(corpus: Path, out_dir: Path, *extra: str,
                recipe: str = "tiny-transformer") -> RunConfig:
    """A run of a 2-layer d=32 model on ``corpus`` writing to ``out_dir``."""
    return apply_overrides(
        get_recipe(recipe),
        [*TINY, f"data.corpus={corpus}", f"train.out_dir={out_dir}", *extra],
    )
