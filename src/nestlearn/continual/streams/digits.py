"""``split-digits`` / ``permuted-digits``: scikit-learn's 1,797 8x8 digits (pixel values
0..16 are the tokens: vocab 17, seq_len 64)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from nestlearn.continual.stream import Stream
from nestlearn.continual.streams.images import build_images

VOCAB = 17


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    tokens = data.data.astype(np.int64)
    tokens.setflags(write=False)
    labels = data.target.astype(np.int64)
    labels.setflags(write=False)
    return tokens, labels


def build_split(*, seed: int = 0, tasks: int | None = None,
                examples_per_class: int | None = None) -> Stream:
    """5 tasks of two digits each (``tasks`` keeps the first ones)."""
    tokens, labels = _digits()
    return build_images("split-digits", tokens, labels, VOCAB, seed=seed, permuted=False,
                        tasks=tasks, examples_per_class=examples_per_class,
                        description="8x8 digits, two new digits per task",
                        meta={"source": "sklearn.datasets.load_digits"})


def build_permuted(*, seed: int = 0, tasks: int = 5,
                   examples_per_class: int | None = None) -> Stream:
    """``tasks`` pixel permutations of all 10 digits (task 0: no permutation)."""
    tokens, labels = _digits()
    return build_images("permuted-digits", tokens, labels, VOCAB, seed=seed, permuted=True,
                        tasks=tasks, examples_per_class=examples_per_class,
                        description="8x8 digits, a new pixel permutation per task",
                        meta={"source": "sklearn.datasets.load_digits"})
