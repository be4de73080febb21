"""Online forecasting metrics of a regime-shift stream, from the prequential errors.

While a row trains on a forecast stream, each step's batch is scored before the step's update
(prequential: the model predicts values it has not trained on). From those errors, per task
(one regime segment):
- ``error_after_shift``: the mean error over the first ``window`` steps after the regime
  changed;
- ``settled_error``: the mean error over the last quarter of the segment;
- ``steps_to_readapt``: the first step at which the mean error over the last ``window`` steps
  has closed 90 % of the gap from ``error_after_shift`` down to ``settled_error`` (the
  segment's length if never);
- for a recurring regime, ``readapt_speedup``: its first occurrence's ``steps_to_readapt``
  divided by its own (> 1: re-learned faster than the first time) and ``shift_error_ratio``:
  its ``error_after_shift`` over the first occurrence's (< 1: remembered).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from nestlearn.errors import NestlearnError

CLOSED_GAP = 0.9


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def segment_metrics(errors: Sequence[float], window: int) -> dict[str, float]:
    """The module's per-segment figures of one segment's step errors."""
    if not errors:
        raise NestlearnError("segment_metrics: no errors; allowed: one or more steps")
    window = max(1, min(window, len(errors)))
    after = _mean(errors[:window])
    settled = _mean(errors[-max(1, len(errors) // 4):])
    target = after - CLOSED_GAP * (after - settled)
    steps = len(errors)
    if after <= settled:
        steps = window  # nothing to re-learn: the first window is already as good as it gets
    else:
        for end in range(window, len(errors) + 1):
            if _mean(errors[end - window:end]) <= target:
                steps = end
                break
    return {"error_after_shift": after, "settled_error": settled, "steps_to_readapt": steps}


def shift_metrics(step_errors: Sequence[Sequence[float]],
                  recurrence_of: Sequence[int | None], window: int) -> dict[str, Any]:
    """Per-task figures and their summary. ``step_errors[i]``: task i's prequential errors in
    step order; ``recurrence_of[i]``: the earlier task whose regime task i repeats (None)."""
    if len(step_errors) != len(recurrence_of):
        raise NestlearnError(f"shift_metrics: {len(step_errors)} tasks of errors but "
                             f"{len(recurrence_of)} recurrence entries; allowed: one each")
    tasks = [segment_metrics(errors, window) for errors in step_errors]
    for index, first in enumerate(recurrence_of):
        if first is None:
            continue
        if not 0 <= first < index:
            raise NestlearnError(f"shift_metrics: task {index} recurs task {first}; allowed: "
                                 f"an earlier task in [0, {index})")
        tasks[index]["readapt_speedup"] = (tasks[first]["steps_to_readapt"]
                                           / tasks[index]["steps_to_readapt"])
        original = tasks[first]["error_after_shift"]
        tasks[index]["shift_error_ratio"] = (tasks[index]["error_after_shift"] / original
                                             if original > 0 else math.nan)
    recurring = [t for t, first in zip(tasks, recurrence_of, strict=True) if first is not None]
    summary = {
        # task 0 has no shift before it: the means cover the shifts, tasks 1 onwards
        "shift_error": _mean([t["error_after_shift"] for t in tasks[1:]]),
        "readapt_steps": _mean([t["steps_to_readapt"] for t in tasks[1:]]),
        "recurrence_speedup": _mean([t["readapt_speedup"] for t in recurring]),
        "recurrence_shift_ratio": _mean([t["shift_error_ratio"] for t in recurring]),
    }
    return {"window": window, "tasks": tasks, "summary": summary}
