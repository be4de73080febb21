"""The NaN guard reads each set of tensors with one host read (one device sync), not one per
tensor, and still names the first bad one."""

from __future__ import annotations

import torch

from host_reads import ReadCounter
from nestlearn.training.nonfinite import find_nonfinite, first_nonfinite, nonfinite_gradient


def test_a_state_tree_is_read_once_and_the_first_bad_path_named(monkeypatch):
    state = {"a": torch.ones(3), "b": [torch.ones(2, 2), torch.zeros(4, dtype=torch.long)],
             "c": torch.ones(5)}
    state["b"][0][1, 0] = float("inf")
    state["c"][2] = float("nan")
    counter = ReadCounter(monkeypatch)
    assert find_nonfinite(state, "state") == "state['b'][0]"
    assert counter.count == 1
    state["b"][0].fill_(1.0)
    assert find_nonfinite(state, "state") == "state['c']"
    state["c"].fill_(1.0)
    assert find_nonfinite(state, "state") is None
    assert counter.count == 3
    assert first_nonfinite({"ids": torch.zeros(3, dtype=torch.long)}) is None
    assert counter.count == 3  # nothing floating: nothing read


def test_gradients_are_read_once(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model(torch.randn(5, 3)).sum().backward()
    counter = ReadCounter(monkeypatch)
    assert nonfinite_gradient(model) is None
    model[1].weight.grad[0, 0] = float("nan")
    assert nonfinite_gradient(model) == "gradient of 1.weight"
    assert counter.count == 2
