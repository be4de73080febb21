"""Every state is a frozen dataclass registered as a pytree, walked by one tree map."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from contextvars import ContextVar

import pytest
import torch

from model_cases import ARCHS_WIRED, random_ids, tiny_config, tiny_model
from nestlearn.models import LMState
from nestlearn.models.blocks import GatedMemoryBlock, GatedMemoryState, MemoryBlock
from nestlearn.models.classifier import SequenceClassifier
from nestlearn.models.config import ClassifierConfig
from nestlearn.models.lm import Backbone, CausalLM
from nestlearn.nn import cms as cms_module
from nestlearn.nn.cms import CMSConfig, CMSLevelState, ContinuumMemory, ContinuumMemoryState
from nestlearn.nn.hope_attention import HOPEAttentionBlock, HOPEAttentionState
from nestlearn.nn.hope_block import HOPEBlock, HOPEBlockState
from nestlearn.nn.memory_stream import ChunkedMemoryState
from nestlearn.nn.self_modifying import SelfModifyingTitans, SelfModifyingTitansState
from nestlearn.nn.titans import NeuralMemory, NeuralMemoryState
from nestlearn.nn.transformer import AttentionState, CausalSelfAttention, TransformerBlock
from nestlearn.ops import DeepMemoryState, TitansLinearState, titans_linear
from nestlearn.state import (
    detach,
    find_nonfinite,
    first_tensor,
    flatten,
    instances,
    is_state_class,
    named_tensors,
    tensors,
    to,
    unflatten,
)

STATE_CLASSES = [DeepMemoryState, TitansLinearState, ChunkedMemoryState, NeuralMemoryState,
                 SelfModifyingTitansState, CMSLevelState, ContinuumMemoryState, AttentionState,
                 HOPEAttentionState, HOPEBlockState, GatedMemoryState, LMState]
STATEFUL = [ContinuumMemory, CausalSelfAttention, TransformerBlock, NeuralMemory,
            SelfModifyingTitans, HOPEBlock, HOPEAttentionBlock, MemoryBlock, GatedMemoryBlock,
            Backbone, CausalLM, SequenceClassifier]


def streamed_state(arch: str, length: int = 7) -> LMState:
    """A model's state after ``length`` tokens, in the graph of the model's parameters."""
    model = tiny_model(arch)
    _, state = model(random_ids(2, length))
    return state


@functools.cache
def every_state() -> tuple:
    """One live instance of every state class (a state of each architecture, an op state)."""
    states = [streamed_state(arch) for arch in ARCHS_WIRED]
    q = torch.randn(1, 3, 1, 2, dtype=torch.float64)
    gate = torch.full((1, 3, 1), 0.5, dtype=torch.float64)
    _, op_state = titans_linear(q, q, q, gate, gate, gate, output_final_state=True,
                                chunk_size=2)
    return (*states, op_state)


def test_every_state_class_is_a_registered_frozen_dataclass():
    for cls in STATE_CLASSES:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls
        assert is_state_class(cls), cls
    found = {type(node) for state in every_state() for node in _all_states(state)}
    assert found == set(STATE_CLASSES)


def _all_states(tree) -> list:
    """Every state object inside ``tree`` (states nested in states included)."""
    found = []
    for node in instances(tree, tuple(STATE_CLASSES)):
        found.append(node)
        for field in dataclasses.fields(node):
            found += _all_states(getattr(node, field.name))
    return found


def test_flatten_unflatten_round_trip_keeps_tensors_and_integer_fields():
    for state in every_state():
        leaves, spec = flatten(state)
        # positions, batch sizes, configs and fingerprints are metadata, not leaves
        assert all(leaf is None or isinstance(leaf, torch.Tensor) for leaf in leaves)
        rebuilt = unflatten(leaves, spec)
        again, again_spec = flatten(rebuilt)
        assert again_spec == spec
        assert all(a is b for a, b in zip(leaves, again, strict=True))
        for original, copy in zip(_all_states(state), _all_states(rebuilt), strict=True):
            assert type(original) is type(copy)
            for field in dataclasses.fields(original):
                value = getattr(original, field.name)
                if not isinstance(value, (torch.Tensor, tuple)) and value is not None \
                        and not is_state_class(type(value)):
                    assert getattr(copy, field.name) == value, field.name


def test_first_tensor_is_the_first_leaf_of_tensors():
    for state in every_state():
        leaves = tensors(("text", 3, None, state))
        assert first_tensor(("text", 3, None, state)) is (leaves[0] if leaves else None)
        floating = [leaf for leaf in leaves if leaf.is_floating_point()]
        assert first_tensor(state, floating=True) is (floating[0] if floating else None)
    ids = torch.zeros(2, dtype=torch.long)
    half = torch.zeros(2, dtype=torch.bfloat16)
    assert first_tensor(((ids, None), {"x": half})) is ids
    assert first_tensor(((ids, None), {"x": half}), floating=True) is half
    assert first_tensor(("no", "tensors", (1, 2.0))) is None


def test_detach_cuts_the_graph_and_keeps_the_rest():
    state = streamed_state("hope")
    assert any(t.requires_grad for t in tensors(state))
    for cut in (detach(state), state.detach()):
        assert not any(t.requires_grad for t in tensors(cut))
        assert cut.position == state.position and cut.fingerprint == state.fingerprint
        for a, b in zip(tensors(state), tensors(cut), strict=True):
            assert torch.equal(a, b)


def test_to_casts_floating_tensors_only():
    state = streamed_state("titans-mag")
    counts = torch.arange(3)
    cast, kept = to((state, counts), dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in tensors(cast))
    assert kept.dtype == torch.long and torch.equal(kept, counts)
    assert cast.position == state.position
    method = state.to(dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in tensors(method))
    assert all(t.device.type == "cpu" for t in tensors(state.to(device="cpu")))


def test_find_nonfinite_names_the_path_of_a_planted_nan():
    state = streamed_state("hope").detach()
    assert find_nonfinite(state, "state") is None
    target = "state.blocks[1].titans.memory.chunk_start.weights[0]"
    names = list(named_tensors(state, "state"))
    assert target in names
    leaves, spec = flatten(state)
    index = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)][
        names.index(target)]
    poisoned = leaves[index].clone()
    poisoned.view(-1)[3] = float("nan")
    leaves[index] = poisoned
    assert find_nonfinite(unflatten(leaves, spec), "state") == target


def test_states_are_frozen():
    for state in every_state():
        for node in _all_states(state):
            name = dataclasses.fields(node)[0].name
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(node, name, None)


def test_init_state_has_one_signature():
    for cls in STATEFUL:
        signature = inspect.signature(cls.init_state)
        params = list(signature.parameters.values())
        assert [p.name for p in params] == ["self", "batch", "device", "dtype"], cls
        assert params[1].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, cls
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None
                   for p in params[2:]), cls


def test_init_state_of_a_model_is_every_block_state():
    model = tiny_model("hope")
    state = model.init_state(2, dtype=torch.float32)
    assert all(isinstance(block, HOPEBlockState) for block in state.blocks)
    levels = [w for block in state.blocks for level in block.cms.levels for w in level.weights]
    assert all(w.dtype == torch.float32 for w in levels)
    ids = random_ids(2, 5)
    torch.testing.assert_close(model(ids, model.init_state(2))[0], model(ids)[0],
                               rtol=0, atol=0)
    classifier = SequenceClassifier(ClassifierConfig(backbone=tiny_config("titans"),
                                                     num_classes=3))
    assert len(classifier.init_state(1).blocks) == 2


def test_the_cms_teach_hook_is_an_explicit_argument():
    assert not any(isinstance(value, ContextVar) for value in vars(cms_module).values())
    torch.manual_seed(0)
    layer = ContinuumMemory(CMSConfig(dim=4, chunk_sizes=(2,), hidden=8, teach_signal="lm",
                                      inner_lr=0.1)).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    seen = []

    def hook(state: ContinuumMemoryState) -> ContinuumMemoryState:
        seen.append(state)
        levels = tuple(CMSLevelState(tuple(w * 2 for w in level.weights), level.accumulator)
                       for level in state.levels)
        return dataclasses.replace(state, levels=levels)

    plain, plain_state = layer(x)
    hooked, _ = layer(x, teach_hook=hook)
    assert len(seen) == 1 and not torch.allclose(plain, hooked)
    # without the hook the LM-driven layer runs its current weights, unchanged
    for level, index in zip(plain_state.levels, range(1), strict=True):
        for w, param in zip(level.weights, layer.initial_weights(index), strict=True):
            assert w is param
    local = ContinuumMemory(CMSConfig(dim=4, chunk_sizes=(2,), hidden=8)).double()
    local(x, teach_hook=hook)
    assert len(seen) == 1  # a local-signal layer ignores the LM hook
