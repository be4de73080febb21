"""The levels of a model that keeps learning, and how to snapshot, roll back, freeze and reset
each of them.

A level is a named part of what changes while a stream runs:

- ``"parameters"`` levels are groups of the model's parameters, moved by the outer optimizer:
  ``io`` (embedding, final norm, LM or class head), per block ``blocks.{i}.rest`` (attention,
  SwiGLU, norms, gates: what no finer level claims), ``blocks.{i}.memory.projections`` and
  ``blocks.{i}.memory.initial`` (a Titans or self-modifying memory's projections and gates,
  and its meta-learned initial memory weights) and ``blocks.{i}.cms.level{k}`` (CMS level k:
  its meta-learned initial weights, pre-norm gain and local target). Together they hold every
  parameter exactly once.
- ``"state"`` levels are the inner loop's fast weights in the carried ``LMState``:
  ``blocks.{i}.memory.state`` (the memory's weights and momentum at the start of its current
  chunk), ``blocks.{i}.memory.inner.state`` (HOPE's inner memories) and
  ``blocks.{i}.cms.level{k}.state`` (CMS level k's weights and what its unfinished chunk
  has seen: a gradient sum, or the tokens whose gradients wait for the chunk's end), for
  every memory and every CMS level that learns in context.

``period`` is the level's update period in tokens (its chunk size) for CMS and memory levels,
None for levels only the outer optimizer moves. See the package README, "Monitoring, control
and correction".
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from nestlearn.errors import invalid
from nestlearn.models.state import LMState
from nestlearn.nn.cms import ContinuumMemory, ContinuumMemoryState, unfinished_gradient
from nestlearn.nn.self_modifying import SelfModifyingTitans, SelfModifyingTitansState
from nestlearn.nn.titans import NeuralMemory, NeuralMemoryState
from nestlearn.state import instances, map_instances, tree_map

LEVEL_KINDS = ("parameters", "state")
# Where a state level lives inside its block's state.
_SLOTS = ("memory", "memory.inner", "cms")
# Dims of a fast weight shared by the batch (a per-batch one has one more in front).
_SHARED_DIMS = {"memory": 3, "memory.inner": 3, "cms": 2}
_MEMORY_STATES = (NeuralMemoryState, SelfModifyingTitansState)


@dataclass(frozen=True)
class Level:
    """One level: ``name``, ``kind`` ("parameters" or "state"), ``period`` (tokens, or None)
    and a one-line ``description``. A parameter level lists its parameters' qualified names
    (as in ``model.named_parameters()``); a state level names its block and slot."""

    name: str
    kind: str
    period: int | None
    description: str
    parameter_names: tuple[str, ...] = ()
    block: int | None = None
    slot: str | None = None
    index: int | None = None

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The level's parameters by qualified name (empty for a state level)."""
        if self.kind != "parameters":
            return {}
        named = dict(model.named_parameters())
        return {name: named[name] for name in self.parameter_names}

    def read_state(self, model: nn.Module, state: LMState) -> Any:
        """The level's part of ``state``: a ``DeepMemoryState`` (memories) or a
        ``CMSLevelState`` (CMS levels); a fresh block state stands in for a None block."""
        self._require_state(state)
        node = _slot_node(_block_state(model, state, self.block), self.slot)
        if self.slot == "cms":
            return node.levels[self.index]
        return (node.inner if self.slot == "memory.inner" else node.memory).chunk_start

    def unfinished_gradient(self, model: nn.Module, state: LMState
                            ) -> tuple[torch.Tensor, ...] | None:
        """A CMS level's gradient sum over its unfinished chunk so far (its accumulator and
        its pending tokens' gradients: ``nn.cms.unfinished_gradient``), None when empty."""
        self._require_state(state)
        if self.slot != "cms":
            raise invalid("level", self.name, "a CMS state level (blocks.{i}.cms.level{k}.state)")
        node = _slot_node(_block_state(model, state, self.block), self.slot)
        return unfinished_gradient(node.config, self.index, node.levels[self.index])

    def write_state(self, model: nn.Module, state: LMState, value: Any) -> LMState:
        """``state`` with the level's part replaced by ``value`` (nothing else changes)."""
        self._require_state(state)
        _check_batch(self, value, state.batch_size)
        block_state = _block_state(model, state, self.block)
        if self.slot == "cms":
            def put(node: ContinuumMemoryState) -> ContinuumMemoryState:
                levels = list(node.levels)
                levels[self.index] = value
                return dataclasses.replace(node, levels=tuple(levels))
            block_state = map_instances(put, block_state, ContinuumMemoryState)
        else:
            part = "inner" if self.slot == "memory.inner" else "memory"

            def put_memory(node: Any) -> Any:
                chunked = dataclasses.replace(getattr(node, part), chunk_start=value)
                return dataclasses.replace(node, **{part: chunked})
            block_state = map_instances(put_memory, block_state, _MEMORY_STATES)
        blocks = list(state.blocks)
        blocks[self.block] = block_state
        return dataclasses.replace(state, blocks=tuple(blocks))

    def tensors(self, model: nn.Module, state: LMState | None = None) -> dict[str, torch.Tensor]:
        """What the level's drift is measured on: its parameters, or its fast weights
        (``weights[j]``: ``[B, ...]`` per batch element or shared ``[...]``)."""
        if self.kind == "parameters":
            return dict(self.parameters(model))
        weights = self.read_state(model, state).weights
        return {f"weights[{j}]": w for j, w in enumerate(weights)}

    @property
    def shared_dims(self) -> int | None:
        """Dims of one fast weight shared by the batch (state levels only)."""
        return None if self.slot is None else _SHARED_DIMS[self.slot]

    def _require_state(self, state: object) -> None:
        if self.kind != "state":
            raise invalid("level", self.name, "a state level to read or write a state")
        if not isinstance(state, LMState):
            raise invalid("state", type(state).__name__,
                          f"an LMState of this model (level {self.name} is a state level)")


def _backbone_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for prefix, module in (("backbone.", getattr(model, "backbone", None)), ("", model)):
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            return prefix + "blocks", blocks
    raise invalid("model", type(model).__name__,
                  "a CausalLM, SequenceClassifier or Backbone (a model with backbone.blocks)")


def _block_state(model: nn.Module, state: LMState, block: int) -> Any:
    value = state.blocks[block]
    if value is None:
        _, blocks = _backbone_blocks(model)
        value = blocks[block].init_state(state.batch_size)
    return value


def _slot_node(block_state: Any, slot: str) -> Any:
    found = instances(block_state, ContinuumMemoryState if slot == "cms" else _MEMORY_STATES)
    if len(found) != 1:
        raise invalid("state", f"{len(found)} {slot} states in one block",
                      "exactly one per block (the state of this model)")
    return found[0]


def _check_batch(level: Level, value: Any, batch: int) -> None:
    for tensor in instances(value, torch.Tensor):
        if tensor.dim() > level.shared_dims and tensor.shape[0] != batch:
            raise invalid(f"{level.name} value", f"a state of batch size {tensor.shape[0]}",
                          f"batch size {batch} (the state's) or a shared value")


def _single_module(block: nn.Module, kinds: type | tuple[type, ...], what: str
                   ) -> tuple[str, nn.Module] | None:
    found = [(name, module) for name, module in block.named_modules()
             if isinstance(module, kinds)]
    if len(found) > 1:
        raise invalid("model", f"a block with {len(found)} {what} layers",
                      f"at most one {what} layer per block")
    return found[0] if found else None


def _cms_level_parameters(cms: ContinuumMemory, index: int) -> list[str]:
    config = cms.config
    names = [f"norms.{index}.weight"]
    if str(index) in cms.local_targets:
        names.append(f"local_targets.{index}")
    nested = config.variant == "nested"
    if not nested or index == config.num_levels - 1:
        # Nested: only the slowest level owns meta-learned weights (initial[0], CMS.md).
        owner = 0 if nested else index
        names += [f"initial.{owner}.{name}" for name in cms.initial[owner].names]
    return names


def model_levels(model: nn.Module) -> list[Level]:
    """Every level of ``model`` (a ``CausalLM``, ``SequenceClassifier`` or ``Backbone``):
    ``io``, then per block its parameter levels and its state levels."""
    prefix, blocks = _backbone_blocks(model)
    all_names = [name for name, _ in model.named_parameters()]
    claimed: set[str] = set()
    per_block: list[Level] = []
    for i, block in enumerate(blocks):
        base = f"{prefix}.{i}."
        params: list[Level] = []
        states: list[Level] = []
        memory = _single_module(block, (NeuralMemory, SelfModifyingTitans), "memory")
        if memory is not None:
            sub, module = memory
            names = [n for n, _ in module.named_parameters()]
            initial = [n for n in names if n.startswith(("memory_weights.", "inner_weights."))]
            projections = [n for n in names if n not in initial]
            params.append(Level(f"blocks.{i}.memory.projections", "parameters", None,
                                "the memory's projections, gates and output",
                                tuple(base + sub + "." + n for n in projections), i))
            params.append(Level(f"blocks.{i}.memory.initial", "parameters", None,
                                "the memory's meta-learned initial weights",
                                tuple(base + sub + "." + n for n in initial), i))
            config = module.config
            states.append(Level(f"blocks.{i}.memory.state", "state", config.chunk_size,
                                "the memory's fast weights and momentum at its chunk start",
                                block=i, slot="memory"))
            if isinstance(module, SelfModifyingTitans):
                states.append(Level(f"blocks.{i}.memory.inner.state", "state",
                                    config.inner_chunk_size,
                                    "the inner memories' fast weights and momentum",
                                    block=i, slot="memory.inner"))
        cms_found = _single_module(block, ContinuumMemory, "CMS")
        if cms_found is not None:
            sub, cms = cms_found
            for k, chunk in enumerate(cms.config.chunk_sizes):
                names = tuple(base + sub + "." + n for n in _cms_level_parameters(cms, k))
                params.append(Level(f"blocks.{i}.cms.level{k}", "parameters", chunk,
                                    f"CMS level {k}'s initial weights, norm and target",
                                    names, i))
                if cms.config.level_learns(k):
                    states.append(Level(f"blocks.{i}.cms.level{k}.state", "state", chunk,
                                        f"CMS level {k}'s fast weights and gradient sum",
                                        block=i, slot="cms", index=k))
        for level in params:
            claimed.update(level.parameter_names)
        rest = tuple(n for n in all_names if n.startswith(base) and n not in claimed)
        if rest:
            params.insert(0, Level(f"blocks.{i}.rest", "parameters", None,
                                   "the block's other parameters (attention, MLP, norms)",
                                   rest, i))
            claimed.update(rest)
        per_block += params + states
    io = tuple(n for n in all_names if n not in claimed)
    levels = [Level("io", "parameters", None, "embedding, final norm and head", io)] if io else []
    return levels + per_block


def resolve_levels(model: nn.Module, levels: Iterable[str | Level] | None = None
                   ) -> list[Level]:
    """The model's levels named in ``levels`` (names or ``Level``s; None: all), in the
    model's order. An unknown name raises ``NestlearnError`` listing the known ones."""
    known = model_levels(model)
    if levels is None:
        return known
    if isinstance(levels, (str, Level)):
        levels = [levels]
    wanted = [level.name if isinstance(level, Level) else level for level in levels]
    by_name = {level.name: level for level in known}
    for name in wanted:
        if name not in by_name:
            raise invalid("level", repr(name), "one of " + ", ".join(by_name))
    return [level for level in known if level.name in wanted]


def _copy(value: Any) -> Any:
    return tree_map(lambda t: t.detach().clone(), value)


@dataclass(frozen=True)
class Snapshot:
    """Deep copies of some levels: ``parameters[level][param name]`` and ``state[level]``
    (the level's part of the state), with the state's ``batch_size`` and an optional ``step``."""

    parameters: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    batch_size: int | None = None
    step: int | None = None
    levels: tuple[str, ...] = field(default=())


def snapshot(model: nn.Module, state: LMState | None,
             levels: Iterable[str | Level] | None = None, step: int | None = None) -> Snapshot:
    """Deep copies of ``levels`` (None: every level; state levels only when ``state`` is
    given, unless named, which then requires it)."""
    chosen = resolve_levels(model, levels)
    if state is None and levels is None:
        chosen = [level for level in chosen if level.kind == "parameters"]
    parameters = {}
    states = {}
    for level in chosen:
        if level.kind == "parameters":
            parameters[level.name] = {name: p.detach().clone()
                                      for name, p in level.parameters(model).items()}
        else:
            states[level.name] = _copy(level.read_state(model, state))
    return Snapshot(parameters, states, None if state is None else state.batch_size, step,
                    tuple(level.name for level in chosen))


def _restore(model: nn.Module, state: LMState | None, chosen: Sequence[Level],
             parameter_values: dict[str, dict[str, torch.Tensor]],
             state_values: dict[str, Any], copy_state: bool) -> LMState | None:
    with torch.no_grad():
        for level in chosen:
            if level.kind != "parameters":
                continue
            for name, param in level.parameters(model).items():
                param.copy_(parameter_values[level.name][name])
    for level in chosen:
        if level.kind == "state":
            value = state_values[level.name]
            state = level.write_state(model, state, _copy(value) if copy_state else value)
    _refresh_frozen(model, state, chosen)
    return state


def rollback(model: nn.Module, state: LMState | None, snap: Snapshot,
             level_names: Iterable[str | Level]) -> LMState | None:
    """Put the named levels back to ``snap``, bit for bit: parameters in place, and the
    returned state with those levels' parts replaced by copies of the snapshot's (``state``
    itself is not changed). A frozen level keeps the restored value from then on. Optimizer
    moments are not touched."""
    chosen = resolve_levels(model, level_names)
    for level in chosen:
        held = snap.parameters if level.kind == "parameters" else snap.state
        if level.name not in held:
            raise invalid("level", repr(level.name),
                          "a level in the snapshot (" + ", ".join(snap.levels) + ")")
    return _restore(model, state, chosen, snap.parameters, snap.state, copy_state=True)


_INITIAL: weakref.WeakKeyDictionary[nn.Module, Snapshot] = weakref.WeakKeyDictionary()


def remember_initial(model: nn.Module) -> Snapshot:
    """Record the model's parameters now as what :func:`reset` returns parameter levels to
    (once per model: later calls return the first record)."""
    if model not in _INITIAL:
        _INITIAL[model] = snapshot(model, None)
    return _INITIAL[model]


def reset(model: nn.Module, state: LMState | None, level_names: Iterable[str | Level],
          initial: Snapshot | None = None) -> LMState | None:
    """State levels back to the model's ``init_state`` values (the meta-learned initial
    weights, no momentum or gradient sum); parameter levels back to ``initial`` (default:
    the record of :func:`remember_initial`, which ``StreamMonitor`` makes when built)."""
    chosen = resolve_levels(model, level_names)
    parameter_levels = [level for level in chosen if level.kind == "parameters"]
    if parameter_levels and initial is None:
        if model not in _INITIAL:
            raise invalid("initial", None, "a Snapshot, or remember_initial(model) called "
                          "before training, to reset parameter levels")
        initial = _INITIAL[model]
    fresh = {}
    for level in chosen:
        if level.kind == "state":
            level._require_state(state)
            blocks = _backbone_blocks(model)[1]
            block = blocks[level.block].init_state(state.batch_size)
            fresh_state = dataclasses.replace(state, blocks=tuple(
                block if i == level.block else b for i, b in enumerate(state.blocks)))
            fresh[level.name] = level.read_state(model, fresh_state)
    return _restore(model, state, chosen, {} if initial is None else initial.parameters, fresh,
                    copy_state=False)


@dataclass
class _Frozen:
    parameters: dict[str, list[tuple[nn.Parameter, torch.Tensor, bool]]] = field(
        default_factory=dict)
    state: dict[str, tuple[Level, Any]] = field(default_factory=dict)


_FROZEN: weakref.WeakKeyDictionary[nn.Module, _Frozen] = weakref.WeakKeyDictionary()
_HOOK: list[Any] = []


def _restore_frozen(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """After every optimizer step: write every frozen parameter's kept value back."""
    with torch.no_grad():
        for frozen in list(_FROZEN.values()):
            for entries in frozen.parameters.values():
                for param, kept, _ in entries:
                    param.copy_(kept)


def freeze(model: nn.Module, level_names: Iterable[str | Level],
           state: LMState | None = None) -> None:
    """Hold the named levels at their current values.

    Parameters: ``requires_grad`` is set False and their gradients dropped, and a copy is
    kept and written back after every ``torch.optim`` optimizer step (a global post-step
    hook), so weight decay, momentum or a ``MultiFrequency`` buffer cannot move them.
    State levels (``state`` required): their current values are kept, and
    :func:`hold_frozen` (which ``StreamMonitor.observe`` calls every step) puts them back into
    a state. A level already frozen keeps its first kept value."""
    chosen = resolve_levels(model, level_names)
    frozen = _FROZEN.setdefault(model, _Frozen())
    for level in chosen:
        if level.kind == "parameters":
            if level.name in frozen.parameters:
                continue
            entries = []
            for param in level.parameters(model).values():
                entries.append((param, param.detach().clone(), param.requires_grad))
                param.requires_grad_(False)
                param.grad = None
            frozen.parameters[level.name] = entries
        elif level.name not in frozen.state:
            frozen.state[level.name] = (level, _copy(level.read_state(model, state)))
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_restore_frozen))


def unfreeze(model: nn.Module, level_names: Iterable[str | Level]) -> None:
    """Let the named levels move again (``requires_grad`` as it was before freezing)."""
    frozen = _FROZEN.get(model)
    if frozen is None:
        return
    for level in resolve_levels(model, level_names):
        for param, _, requires_grad in frozen.parameters.pop(level.name, []):
            param.requires_grad_(requires_grad)
        frozen.state.pop(level.name, None)


def frozen_levels(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's frozen levels, in the model's order."""
    frozen = _FROZEN.get(model)
    if frozen is None:
        return ()
    held = set(frozen.parameters) | set(frozen.state)
    return tuple(level.name for level in model_levels(model) if level.name in held)


def hold_frozen(model: nn.Module, state: LMState | None) -> LMState | None:
    """``state`` with every frozen state level put back to its kept value (the same object
    when the model has none, or ``state`` is None)."""
    frozen = _FROZEN.get(model)
    if state is None or frozen is None or not frozen.state:
        return state
    for level, value in frozen.state.values():
        state = level.write_state(model, state, value)
    return state


def _refresh_frozen(model: nn.Module, state: LMState | None, chosen: Sequence[Level]) -> None:
    """A frozen level that was just restored keeps the restored value."""
    frozen = _FROZEN.get(model)
    if frozen is None:
        return
    for level in chosen:
        if level.name in frozen.parameters:
            frozen.parameters[level.name] = [(param, param.detach().clone(), requires_grad)
                                             for param, _, requires_grad
                                             in frozen.parameters[level.name]]
        if level.name in frozen.state and state is not None:
            frozen.state[level.name] = (level, _copy(level.read_state(model, state)))
