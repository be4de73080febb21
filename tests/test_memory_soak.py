"""Long stability soak (issue 14): a titans and a hope layer, as the models build them, with
every gate held at its cap, over 50,000 tokens of random and of repeated input: no NaN, memory
weights within the stability tests' growth limit. Slow; the 4,096-token versions of the same
checks are in test_nn_memory_stability.py (fast)."""

import pytest
import torch

from nestlearn.models import ModelConfig
from nestlearn.nn.self_modifying import SelfModifyingTitans
from nestlearn.nn.titans import NeuralMemory
from test_nn_memory_stability import (
    assert_bounded,
    force_neural_memory_gates,
    force_self_modifying_gates,
    run_in_segments,
    stream,
)

TOKENS = 50_000


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["randn", "repeated"])
@pytest.mark.parametrize("arch", ["titans", "hope"])
def test_memory_layer_at_its_caps_stays_bounded_over_50k_tokens(arch, kind):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, dim=64, heads=4).memory
    if arch == "titans":
        layer = NeuralMemory(config)
        force_neural_memory_gates(layer)
    else:
        layer = SelfModifyingTitans(config)
        force_self_modifying_gates(layer)
    largest, state = run_in_segments(layer, stream(64, TOKENS, kind))
    assert largest < 10.0
    assert_bounded(state.memory.chunk_start.weights, list(layer.memory_weights), "main memory")
    if arch == "hope":
        assert_bounded(state.inner.chunk_start.weights, list(layer.inner_weights),
                       "inner memories")
