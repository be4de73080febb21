"""Choosing the learning rate without looking at later tasks.

Rule: for each learning rate of the grid, a fresh model of the row's arch is fine-tuned on
the FIRST task's training split for ``steps_per_task`` steps (the row's batch size, seed,
state policy and model sets) and scored on the first task's VALIDATION split; the best score
wins (ties: the lower loss, then the smaller rate). No other task's data is read, and no test
split: choosing on later tasks would leak the stream's future into its hyperparameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from nestlearn.continual.runner import RowSpec, train_stream
from nestlearn.continual.stream import Stream, Task
from nestlearn.errors import NestlearnError

LR_GRID: tuple[float, ...] = (3e-4, 1e-3, 3e-3)


def first_task_stream(stream: Stream) -> Stream:
    """``stream`` cut to its first task, whose test split is its validation split."""
    task = stream.tasks[0]
    only = Task(task.name, task.train, task.validation, task.validation, task.classes)
    return dataclasses.replace(stream, tasks=(only,))


def tune_lr(stream: Stream, spec: RowSpec, grid: Sequence[float] = LR_GRID
            ) -> tuple[float, list[dict[str, Any]]]:
    """``(best lr, table)`` by the module's rule; ``table`` has one
    ``{"lr", "score", "loss"}`` per rate, in grid order. The arch, seed, steps, batch size,
    state policy and model sets are ``spec``'s; the method is always finetune (the policy
    stays ``spec``'s, so a carry row is tuned carrying)."""
    if not grid:
        raise NestlearnError("tune_lr: empty grid; allowed: one or more learning rates")
    small = first_task_stream(stream)
    table = []
    for lr in grid:
        trial = dataclasses.replace(spec, method="finetune", lr=float(lr), options={},
                                    state_policy=spec.policy)
        row = train_stream(small, trial)
        table.append({"lr": float(lr), "score": row["R"][0][0], "loss": row["R_loss"][0][0]})
    best = max(table, key=lambda r: (r["score"], -r["loss"], -r["lr"]))
    return best["lr"], table
