"""Continual-learning metrics over a matrix ``R`` of ``T x T`` numbers.

``R[i, j]`` is the number measured on task ``j``'s test split after training through task ``i``
(row ``i`` = stage ``i``). ``R`` may be a numpy array, a torch tensor or a nested list.

Scores (``lower_is_better=False``, the default; e.g. accuracy, higher is better):

- ``average_accuracy``: mean of the last row, ``mean_j R[T-1, j]``.
- ``backward_transfer`` (Lopez-Paz & Ranzato, 2017): ``mean_{j<T-1} R[T-1, j] - R[j, j]``.
  Negative = old tasks got worse after later training (forgetting), positive = they improved.
- ``forward_transfer`` (Lopez-Paz & Ranzato, 2017): ``mean_{j>=1} R[j-1, j] - baseline[j]``,
  ``baseline[j]`` being the untrained model's score on task ``j``. Positive = training on the
  earlier tasks helped task ``j`` before it was seen.
- ``forgetting`` (Chaudhry et al., 2018): ``mean_{j<T-1} max_{j<=i<T-1} R[i, j] - R[T-1, j]``.
  Positive = the best score reached on a task since it was trained was lost. Stages before
  task ``j`` was trained are left out (nothing of it can be lost there yet).
- ``average_incremental_accuracy`` (Rebuffi et al., 2017): ``mean_i mean_{j<=i} R[i, j]``.

Losses (``lower_is_better=True``; e.g. cross-entropy or MAE, lower is better). The formulas for
the average, backward and forward transfer are the same differences, so their sign reads the
other way round; forgetting is turned so that positive still means "forgot":

- average / average incremental: mean loss (lower = better).
- backward transfer: ``mean_{j<T-1} L[T-1, j] - L[j, j]``; **positive = old tasks got worse**.
- forward transfer: ``mean_{j>=1} L[j-1, j] - baseline[j]``; **negative = earlier tasks helped**.
- forgetting: ``mean_{j<T-1} L[T-1, j] - min_{j<=i<T-1} L[i, j]``; **positive = forgot**.

With one task (``T = 1``) backward transfer, forward transfer and forgetting have nothing to
average over and are ``nan`` (not 0, which would claim "measured, no change").

Only the entries a metric reads must be finite: the lower triangle with the diagonal for all
of them, and also ``R[j-1, j]`` for forward transfer. The rest of the upper triangle (scores
on tasks not yet trained) may be ``nan`` when a runner does not measure it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nestlearn.errors import NestlearnError

SCORE_KEYS: tuple[str, ...] = ("average_accuracy", "backward_transfer", "forward_transfer",
                               "forgetting", "average_incremental_accuracy")
LOSS_KEYS: tuple[str, ...] = ("loss_average", "loss_backward_transfer", "loss_forward_transfer",
                              "loss_forgetting", "loss_average_incremental")


def _to_array(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().cpu().double().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise NestlearnError(f"{name}: got {type(value).__name__} that is not a rectangular "
                             "array of numbers; allowed: a numpy array, torch tensor or nested "
                             "list of numbers") from None
    return array


def as_matrix(R: Any, name: str = "R") -> np.ndarray:
    """``R`` as a float64 ``T x T`` array (T >= 1) whose lower triangle and diagonal are finite."""
    array = _to_array(R, name)
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] < 1:
        raise NestlearnError(f"{name}: got shape {tuple(array.shape)}; allowed: a square T x T "
                             "matrix with T >= 1 (row = stage, column = task)")
    lower = array[np.tril_indices(array.shape[0])]
    if not np.all(np.isfinite(lower)):
        bad = [(int(i), int(j)) for i, j in zip(*np.tril_indices(array.shape[0]), strict=True)
               if not math.isfinite(array[i, j])]
        raise NestlearnError(f"{name}: got non-finite entries at {bad[:4]}; allowed: finite "
                             "numbers on and below the diagonal")
    return array


def _baseline(baseline: Any, T: int, name: str) -> np.ndarray:
    array = _to_array(baseline, name)
    if array.shape != (T,):
        raise NestlearnError(f"{name}: got shape {tuple(array.shape)}; allowed: one number per "
                             f"task, shape ({T},)")
    if not np.all(np.isfinite(array[1:])):
        raise NestlearnError(f"{name}: got non-finite values {array.tolist()}; allowed: finite "
                             "numbers for tasks 1..T-1")
    return array


def average_accuracy(R: Any) -> float:
    """Mean of the last row: the final score averaged over all tasks (for losses: mean loss)."""
    matrix = as_matrix(R)
    return float(matrix[-1].mean())


def backward_transfer(R: Any) -> float:
    """``mean_{j<T-1} R[T-1, j] - R[j, j]``; ``nan`` for one task. Scores: negative = forgot;
    losses: positive = forgot (the same formula, read the other way)."""
    matrix = as_matrix(R)
    T = matrix.shape[0]
    if T == 1:
        return math.nan
    return float(np.mean([matrix[T - 1, j] - matrix[j, j] for j in range(T - 1)]))


def forward_transfer(R: Any, baseline: Any) -> float:
    """``mean_{j>=1} R[j-1, j] - baseline[j]``; ``nan`` for one task. Scores: positive = the
    earlier tasks helped; losses: negative = they helped."""
    matrix = as_matrix(R)
    T = matrix.shape[0]
    base = _baseline(baseline, T, "baseline")
    if T == 1:
        return math.nan
    before = np.array([matrix[j - 1, j] for j in range(1, T)])
    if not np.all(np.isfinite(before)):
        raise NestlearnError(f"R: got non-finite entries just above the diagonal "
                             f"{before.tolist()}; allowed: finite R[j-1, j] for forward "
                             "transfer (score each task before training on it)")
    return float(np.mean(before - base[1:]))


def forgetting(R: Any, *, lower_is_better: bool = False) -> float:
    """Chaudhry et al.: for scores ``mean_{j<T-1} max_{j<=i<T-1} R[i, j] - R[T-1, j]``; for
    losses ``mean_{j<T-1} R[T-1, j] - min_{j<=i<T-1} R[i, j]``. Positive = forgot, in both
    cases; ``nan`` for one task. Only rows ``i >= j`` count (before training on ``j`` nothing
    can be lost)."""
    matrix = as_matrix(R)
    T = matrix.shape[0]
    if T == 1:
        return math.nan
    drops = []
    for j in range(T - 1):
        column = matrix[j:T - 1, j]
        if lower_is_better:
            drops.append(matrix[T - 1, j] - column.min())
        else:
            drops.append(column.max() - matrix[T - 1, j])
    return float(np.mean(drops))


def average_incremental_accuracy(R: Any) -> float:
    """``mean_i mean_{j<=i} R[i, j]``: the average over stages of the mean score on the tasks
    seen so far (for losses: the mean loss so far)."""
    matrix = as_matrix(R)
    return float(np.mean([matrix[i, :i + 1].mean() for i in range(matrix.shape[0])]))


def summarize(R: Any, baseline: Any = None, R_loss: Any = None,
              baseline_loss: Any = None) -> dict[str, float]:
    """The ``metrics`` of a results.json row: :data:`SCORE_KEYS` from ``R`` and, when
    ``R_loss`` is given, :data:`LOSS_KEYS` from it (signs as in the module doc). A forward
    transfer whose baseline is missing is ``nan``."""
    out = {
        "average_accuracy": average_accuracy(R),
        "backward_transfer": backward_transfer(R),
        "forward_transfer": math.nan if baseline is None else forward_transfer(R, baseline),
        "forgetting": forgetting(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
    }
    if R_loss is not None:
        T = as_matrix(R).shape[0]
        loss = as_matrix(R_loss, "R_loss")
        if loss.shape[0] != T:
            raise NestlearnError(f"R_loss: got {loss.shape[0]} tasks; allowed: as many as R "
                                 f"({T})")
        out.update({
            "loss_average": average_accuracy(loss),
            "loss_backward_transfer": backward_transfer(loss),
            "loss_forward_transfer": (math.nan if baseline_loss is None
                                      else forward_transfer(loss, baseline_loss)),
            "loss_forgetting": forgetting(loss, lower_is_better=True),
            "loss_average_incremental": average_incremental_accuracy(loss),
        })
    return out
