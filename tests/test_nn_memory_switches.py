"""The memory switches: per-memory learning-rate ceilings, read-out time (Eq. 90), adaptive q,
the ablations (without inner k / v adaptation, DGD, momentum, weight decay) and the main
memory's self-generated targets, each shown to change the computation as documented
(nn/MEMORY_LAYERS.md). Fast path = naive path for each is in test_streaming_contract.py."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nestlearn.errors import NestlearnError
from nestlearn.models import ModelConfig, build_model
from nestlearn.models.archs import PAPER_HOPE_MEMORY
from nestlearn.nn.memory_common import derived_eta_max
from nestlearn.nn.self_modifying import (
    INNER_STEP_MARGIN,
    SelfModifyingTitans,
    SelfModifyingTitansConfig,
)
from nestlearn.nn.titans import NeuralMemory, NeuralMemoryConfig
from nestlearn.ops.deep_memory import deep_memory_apply
from nestlearn.training.recipes import get_recipe
from nestlearn.training.runconfig import RunConfig, apply_overrides

DIM = 8
HEADS = 2


def self_modifying(seed=0, **overrides):
    options = dict(dim=DIM, heads=HEADS, expansion=2, inner_expansion=2, chunk_size=4,
                   inner_chunk_size=3)
    options.update(overrides)
    torch.manual_seed(seed)
    return SelfModifyingTitans(SelfModifyingTitansConfig(**options)).double()


def neural_memory(seed=0, **overrides):
    options = dict(dim=DIM, heads=HEADS, expansion=2, chunk_size=4)
    options.update(overrides)
    torch.manual_seed(seed)
    return NeuralMemory(NeuralMemoryConfig(**options)).double()


def inputs(length=11, batch=2, seed=1):
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def test_each_memory_is_capped_at_the_chunk_size_it_runs_at():
    config = SelfModifyingTitansConfig(dim=16, chunk_size=64, inner_chunk_size=16,
                                       expansion=4, inner_expansion=2)
    assert config.resolved_eta_max == derived_eta_max(1.0, 64, 4, 0.9)
    assert config.resolved_inner_eta_max == derived_eta_max(1.0, 16, 2, 0.9) / INNER_STEP_MARGIN
    pinned = dataclasses.replace(config, eta_max=0.01)
    assert pinned.resolved_eta_max == pinned.resolved_inner_eta_max == 0.01


def test_one_gate_drives_both_ceilings():
    # The inner memories' pending eta is the gate g_t itself (their ceiling is applied at the
    # chunk's end) and the main memory's eta is g_t under its own ceiling.
    layer = self_modifying(chunk_size=8, inner_chunk_size=5, inner_expansion=1)
    x = inputs(length=4)
    state = layer.init_state(2, dtype=torch.float64)
    main, inner, _ = layer.memory_inputs(x, state)
    c = layer.config
    assert c.resolved_eta_max != c.resolved_inner_eta_max
    assert inner.eta.shape == (2, 4, HEADS)
    torch.testing.assert_close(main.eta / c.resolved_eta_max, inner.eta, rtol=1e-12, atol=0)


@pytest.mark.parametrize("make", [neural_memory, self_modifying], ids=["titans", "self-mod"])
def test_chunk_start_readout_reads_the_memory_of_the_chunk_start(make):
    # Eq. 90: a token reads the memory as it was at its chunk's start, so within a chunk no
    # token's output depends on an earlier token of that chunk (no conv, and for the
    # self-modifying layer one inner chunk, so k and v depend on their own token only).
    options = dict(conv=False, chunk_size=4)
    if make is self_modifying:
        options["inner_chunk_size"] = 12
    late = make(readout="chunk_start", **options)
    after = make(**options)
    x = inputs(length=12)
    changed = x.clone()
    changed[:, 5] += 1.0  # inside the second chunk (tokens 4-7)
    for layer, same_in_chunk in ((late, True), (after, False)):
        y, _ = layer(x)
        y_changed, _ = layer(changed)
        assert torch.equal(y[:, :5], y_changed[:, :5])
        assert torch.equal(y[:, 6:8], y_changed[:, 6:8]) == same_in_chunk
        assert not torch.allclose(y[:, 8:], y_changed[:, 8:])  # the next chunk sees the write


def test_chunk_start_readout_keeps_the_memory_trajectory():
    x = inputs(length=11)
    _, late = neural_memory(readout="chunk_start")(x)
    _, after = neural_memory()(x)
    for a, b in zip(late.memory.chunk_start.weights, after.memory.chunk_start.weights,
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_adaptive_q_comes_from_a_fifth_inner_memory():
    layer = self_modifying(adaptive_q=True)
    assert layer.config.inner_memories[-1] == "q"
    assert layer.inner_weights[0].shape[0] == 5 * HEADS
    x = inputs(length=3)  # one inner chunk: every token reads the initial memories
    state = layer.init_state(2, dtype=torch.float64)
    main, inner, _ = layer.memory_inputs(x, state)
    assert inner.chunk_start.weights[0].shape[-3] == 5 * HEADS
    _, reads, _ = layer._features(x, None)
    q_weights = tuple(w[4 * HEADS:] for w in layer.inner_weights)
    expected = F.normalize(deep_memory_apply(q_weights, reads[:, :, 4 * HEADS:]), dim=-1)
    torch.testing.assert_close(main.q, expected, rtol=1e-12, atol=1e-12)
    # Without it q is the plain projection (normalized), and q's memory does not exist.
    plain = self_modifying()
    plain_main, plain_inner, _ = plain.memory_inputs(x, plain.init_state(2, dtype=torch.float64))
    q_read, _, _ = plain._features(x, None)
    torch.testing.assert_close(plain_main.q, q_read, rtol=1e-12, atol=1e-12)
    assert plain_inner.chunk_start.weights[0].shape[-3] == 4 * HEADS


@pytest.mark.parametrize("which", ["k", "v"])
def test_without_inner_adaptation_the_projection_is_the_memory_input(which):
    layer = self_modifying(**{f"adaptive_{which}": False})
    adaptive = self_modifying()
    x = inputs(length=3)
    main, _, _ = layer.memory_inputs(x, layer.init_state(2, dtype=torch.float64))
    full, _, _ = adaptive.memory_inputs(x, adaptive.init_state(2, dtype=torch.float64))
    _, reads, _ = layer._features(x, None)
    if which == "k":
        torch.testing.assert_close(main.k, F.normalize(reads[:, :, :HEADS], dim=-1))
        torch.testing.assert_close(main.v, full.v)
    else:
        torch.testing.assert_close(main.v, reads[:, :, HEADS:2 * HEADS])
        torch.testing.assert_close(main.k, full.k)
    assert not torch.allclose(getattr(main, which), getattr(full, which))


def test_self_generated_targets_are_the_default_and_differ_from_v():
    assert SelfModifyingTitansConfig(dim=8).memory_target == "self"
    x = inputs(length=11)
    y_self, _ = self_modifying()(x)
    y_v, _ = self_modifying(memory_target="v")(x)
    assert not torch.allclose(y_self[:, 4:], y_v[:, 4:])
    # Read at the chunk start, the first chunk reads the initial memory either way.
    y_self, _ = self_modifying(readout="chunk_start")(x)
    y_v, _ = self_modifying(memory_target="v", readout="chunk_start")(x)
    torch.testing.assert_close(y_self[:, :4], y_v[:, :4], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y_self[:, 4:], y_v[:, 4:])


ABLATIONS = ["dgd=false", "momentum=false", "weight_decay=false", "adaptive_k=false",
             "adaptive_v=false", "adaptive_q=true", "memory_target=v", "readout=chunk_start"]


@pytest.mark.parametrize("assignment", ABLATIONS)
def test_each_switch_reaches_a_model_from_the_command_line_and_changes_its_logits(assignment):
    base = RunConfig.from_dict({"model": {"arch": "hope", "vocab_size": 16, "dim": 16,
                                          "layers": 1, "heads": 2}})
    changed = apply_overrides(base, [f"model.memory.{assignment}"])
    name, _, _ = assignment.partition("=")
    assert getattr(changed.model.memory, name) != getattr(base.model.memory, name)
    ids = torch.randint(0, 16, (1, 40), generator=torch.Generator().manual_seed(0))
    logits = []
    for config in (base.model, changed.model):
        torch.manual_seed(0)
        logits.append(build_model(config)(ids)[0])
    assert logits[0].shape == logits[1].shape
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize(("fields", "name"), [
    ({"readout": "before"}, "readout"), ({"adaptive_q": 1}, "adaptive_q"),
    ({"adaptive_k": "no"}, "adaptive_k"), ({"memory_target": "M"}, "memory_target")])
def test_bad_switches_name_the_field(fields, name):
    with pytest.raises(NestlearnError, match=f"memory.{name}"):
        ModelConfig(arch="hope", dim=16, heads=2, memory=fields)


def test_titans_readout_switch_is_validated():
    with pytest.raises(NestlearnError, match="readout"):
        NeuralMemoryConfig(dim=8, readout="late")


def test_the_paper_preset_is_a_recipe_whose_model_runs():
    config = get_recipe("tiny-hope-paper")
    for name, value in PAPER_HOPE_MEMORY.items():
        assert getattr(config.model.memory, name) == value, name
    small = apply_overrides(config, ["model.dim=16", "model.heads=2", "model.layers=1"])
    assert small.model.memory.readout == "chunk_start" and not small.model.memory.momentum
    torch.manual_seed(0)
    model = build_model(small.model)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    logits, _ = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
