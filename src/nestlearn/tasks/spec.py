"""What a task is to the harness: a vocabulary, a sampler of training examples, a fixed
evaluation set, a training budget and the tables its report holds."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from nestlearn.errors import check_choice, check_int, check_positive
from nestlearn.tasks.example import Example

METRICS: tuple[str, ...] = ("accuracy", "exact", "loss")


@dataclass(frozen=True)
class Budget:
    """Training steps, examples per step, peak learning rate (AdamW, warmup then cosine)."""

    steps: int
    batch_size: int
    lr: float = 3e-3

    def __post_init__(self) -> None:
        check_int("steps", self.steps)
        check_int("batch_size", self.batch_size)
        check_positive("lr", self.lr)


@dataclass(frozen=True)
class Table:
    """A report table: ``metric`` over the answers grouped by the values of ``tags``.

    ``metric``: ``accuracy`` (answer tokens predicted right), ``exact`` (examples whose
    answers in the group are all right) or ``loss`` (mean cross-entropy of the answers, nats).
    ``buckets``: tags whose values are grouped in powers of two (a distance of 5 counts as 4).
    ``where``: keep only answers whose tag has this value (e.g. the second copy)."""

    title: str
    tags: tuple[str, ...]
    metric: str
    buckets: tuple[str, ...] = ()
    where: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        check_choice("metric", self.metric, METRICS)


@dataclass(frozen=True)
class TaskSpec:
    """A task: ``train_example(rng)`` draws one training example, ``eval_examples(rng)`` the
    whole evaluation set (called with the same seed for every arch and seed, so all models are
    scored on the same examples); ``labels`` names tag values in reports (``range`` 0 ->
    "1-32"); ``chance``: the accuracy of guessing, per table title."""

    name: str
    description: str
    vocab_size: int
    pad_id: int
    train_example: Callable[[random.Random], Example]
    eval_examples: Callable[[random.Random], list[Example]]
    budget: Budget
    tables: tuple[Table, ...]
    labels: dict[str, dict[int, str]] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)
    # train settings shown in reports (lengths, ranges), JSON-ready
    settings: dict[str, object] = field(default_factory=dict)
