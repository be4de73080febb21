"""Pieces of the optimizer benchmark that decide what is measured (no training here)."""

import argparse

import pytest
import torch

from nestlearn.benchmarks import optim as bench
from nestlearn.errors import NestlearnError
from nestlearn.optim import Muon


def test_noisy_labels_change_exactly_the_fraction_to_other_classes():
    labels = torch.arange(1000) % 10
    noisy = bench.noisy_labels(labels, 0.4, seed=3)
    changed = noisy != labels
    assert changed.sum().item() == 400
    assert noisy.min() >= 0 and noisy.max() <= 9
    assert torch.equal(noisy, bench.noisy_labels(labels, 0.4, seed=3))


def test_embeddings_biases_and_norms_leave_the_matrix_group():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 6),
                                torch.nn.LayerNorm(6))
    matrices, rest = bench.split_parameters(model)
    assert [tuple(p.shape) for p in matrices] == [(6, 4)]
    assert len(rest) == 4
    optimizer = bench.make_optimizer("muon", model, lr=0.01, fallback_lr=0.002)
    assert isinstance(optimizer, Muon)
    assert optimizer.param_groups[1]["fallback"] == "adamw"
    assert optimizer.param_groups[1]["fallback_lr"] == 0.002


@pytest.mark.parametrize(("flag", "value"), [
    ("optimizers", "adamw,lion"), ("noise", "1.5"), ("noise", "x"), ("tasks", "cifar"),
    ("steps", 0),
])
def test_bad_benchmark_arguments(flag, value):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    setattr(args, flag, value)
    with pytest.raises(NestlearnError):
        bench._check_args(args)
