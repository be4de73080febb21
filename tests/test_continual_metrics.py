"""Continual metrics on small matrices whose values are worked out by hand below."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nestlearn.continual import metrics
from nestlearn.errors import NestlearnError

R2 = [[0.9, 0.2],
      [0.6, 0.8]]
R3 = [[0.8, 0.1, 0.2],
      [0.85, 0.9, 0.3],
      [0.5, 0.6, 0.95]]


def test_two_tasks() -> None:
    assert metrics.average_accuracy(R2) == pytest.approx((0.6 + 0.8) / 2)
    assert metrics.backward_transfer(R2) == pytest.approx(0.6 - 0.9)
    assert metrics.forward_transfer(R2, [0.1, 0.1]) == pytest.approx(0.2 - 0.1)
    assert metrics.forgetting(R2) == pytest.approx(0.9 - 0.6)
    assert metrics.average_incremental_accuracy(R2) == pytest.approx((0.9 + 0.7) / 2)


def test_three_tasks() -> None:
    assert metrics.average_accuracy(R3) == pytest.approx(2.05 / 3)
    assert metrics.backward_transfer(R3) == pytest.approx(((0.5 - 0.8) + (0.6 - 0.9)) / 2)
    assert metrics.forward_transfer(R3, [0.0, 0.1, 0.1]) == pytest.approx(
        ((0.1 - 0.1) + (0.3 - 0.1)) / 2)
    # task 0 peaked at stage 1 (0.85), not where it was learned: forgetting != -BWT
    assert metrics.forgetting(R3) == pytest.approx(((0.85 - 0.5) + (0.9 - 0.6)) / 2)
    assert metrics.average_incremental_accuracy(R3) == pytest.approx(
        (0.8 + (0.85 + 0.9) / 2 + 2.05 / 3) / 3)


def test_single_task_is_nan_where_undefined() -> None:
    out = metrics.summarize([[0.7]], baseline=[0.1], R_loss=[[1.5]], baseline_loss=[2.0])
    assert out["average_accuracy"] == pytest.approx(0.7)
    assert out["average_incremental_accuracy"] == pytest.approx(0.7)
    assert out["loss_average"] == pytest.approx(1.5)
    for key in ("backward_transfer", "forward_transfer", "forgetting",
                "loss_backward_transfer", "loss_forward_transfer", "loss_forgetting"):
        assert math.isnan(out[key]), key


def test_loss_signs() -> None:
    loss = [[1.0, 3.0],
            [2.0, 1.5]]
    out = metrics.summarize(R2, baseline=[0.1, 0.1], R_loss=loss, baseline_loss=[3.2, 3.2])
    assert out["loss_average"] == pytest.approx(1.75)
    assert out["loss_backward_transfer"] == pytest.approx(1.0)  # > 0: task 0 got worse
    assert out["loss_forward_transfer"] == pytest.approx(-0.2)  # < 0: task 0 helped task 1
    assert out["loss_forgetting"] == pytest.approx(1.0)  # > 0: forgot
    assert out["loss_average_incremental"] == pytest.approx((1.0 + 1.75) / 2)
    assert set(out) == set(metrics.SCORE_KEYS) | set(metrics.LOSS_KEYS)


def test_loss_forgetting_uses_the_lowest_loss() -> None:
    loss = [[1.0, 5.0, 5.0],
            [0.8, 1.2, 5.0],
            [1.1, 1.4, 0.9]]
    assert metrics.forgetting(loss, lower_is_better=True) == pytest.approx(
        ((1.1 - 0.8) + (1.4 - 1.2)) / 2)
    # read as scores the same matrix "gained" on task 0 relative to its best: a different number
    assert metrics.forgetting(loss) == pytest.approx(((1.0 - 1.1) + (1.2 - 1.4)) / 2)


def test_torch_numpy_and_list_agree() -> None:
    base = [0.0, 0.1, 0.1]
    as_list = metrics.summarize(R3, baseline=base)
    as_numpy = metrics.summarize(np.array(R3, dtype=np.float32), baseline=np.array(base))
    as_torch = metrics.summarize(torch.tensor(R3, requires_grad=True), baseline=torch.tensor(base))
    for key, value in as_list.items():
        assert as_numpy[key] == pytest.approx(value, abs=1e-6), key
        assert as_torch[key] == pytest.approx(value, abs=1e-6), key


def test_untrained_entries_above_the_diagonal_may_be_nan() -> None:
    R = [[0.9, math.nan],
         [0.6, 0.8]]
    assert metrics.backward_transfer(R) == pytest.approx(-0.3)
    assert math.isnan(metrics.summarize(R)["forward_transfer"])
    with pytest.raises(NestlearnError, match=r"R\[j-1, j\]"):
        metrics.forward_transfer(R, [0.1, 0.1])


@pytest.mark.parametrize("bad, pattern", [
    ([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "shape"),
    ([1.0, 2.0], "shape"),
    ([], "shape"),
    ([[1.0, 2.0], [3.0]], "rectangular"),
    ([[math.nan, 0.0], [0.5, 0.5]], "non-finite"),
    ([[0.5, 0.0], [math.inf, 0.5]], "non-finite"),
    ("abc", "rectangular|shape"),
])
def test_bad_matrices(bad: object, pattern: str) -> None:
    with pytest.raises(NestlearnError, match=pattern):
        metrics.average_accuracy(bad)


def test_bad_baselines_and_loss_shapes() -> None:
    with pytest.raises(NestlearnError, match="baseline: got shape"):
        metrics.forward_transfer(R2, [0.1, 0.1, 0.1])
    with pytest.raises(NestlearnError, match="baseline: got non-finite"):
        metrics.forward_transfer(R2, [0.1, math.nan])
    with pytest.raises(NestlearnError, match="R_loss: got 3 tasks"):
        metrics.summarize(R2, R_loss=R3)


def test_forgetting_ignores_stages_before_the_task_was_trained() -> None:
    R = [[0.5, 0.95, 0.1],  # task 1 scored high by chance before it was trained
         [0.4, 0.9, 0.1],
         [0.3, 0.7, 0.8]]
    assert metrics.forgetting(R) == pytest.approx(((0.5 - 0.3) + (0.9 - 0.7)) / 2)
