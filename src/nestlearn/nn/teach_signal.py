"""The LM teach signal for CMS levels: the gradient of the stream's next-token loss.

docs/paper.md section 3 leaves open what error f a CMS level accumulates in context; the paper's
"teach signal" reading is the gradient of the language-modelling loss at the level. This
driver runs any ``model(ids, state, *, teach_hook) -> (logits, state)`` over a stream whose
state holds ``ContinuumMemoryState``s built with ``teach_signal="lm"``; the model hands
``teach_hook`` down to its CMS layers (``CausalLM``, the blocks and ``ContinuumMemory`` all take
it as an argument, there is no hidden global switch):

1. the stream is cut into segments of at most ``segment_len`` tokens (default: the smallest
   chunk size), also cut at every level boundary, so no level changes inside a segment;
2. while a segment runs, each LM-driven CMS layer uses its learning levels' fast weights
   ``w`` as ``w + z`` with ``z`` a zero leaf of shape ``[B, out, in]`` (through
   ``teach_hook``, which the layer applies to its incoming state, so CMS states the model
   creates itself, e.g. from a state of None, are covered too); after the segment,
   ``torch.autograd.grad`` of the segment's loss w.r.t. ``z`` is the per-batch-element
   gradient at the level;
3. that gradient is added to the level's accumulator, and a level whose boundary is reached
   takes its step ``w <- w - eta * accumulator`` (``cms.commit_teach_signal``).

First order: the gradients are taken without ``create_graph``, so an update is a constant for
the outer graph (outer gradients still reach the initial weights through ``w``, but not
through how the update was computed). Inside a segment the loss is differentiated through the
segment only: states carried from earlier segments (a KV cache, for instance) are constants
for the teach signal, so the result depends on ``segment_len`` when the model mixes tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from nestlearn.errors import check_optional_int, invalid
from nestlearn.losses import lm_loss_sum
from nestlearn.nn.cms import (
    CMSConfig,
    CMSLevelState,
    ContinuumMemory,
    ContinuumMemoryState,
    commit_teach_signal,
)
from nestlearn.state import detach, instances, map_instances

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def find_cms_states(state: Any) -> list[ContinuumMemoryState]:
    """Every ``ContinuumMemoryState`` inside ``state``, in traversal order."""
    return instances(state, ContinuumMemoryState)


def map_cms_states(state: Any, fn: Callable[[int, ContinuumMemoryState], Any]) -> Any:
    """``state`` with its i-th CMS state (traversal order) replaced by ``fn(i, cms_state)``."""
    counter = iter(range(1 << 62))
    return map_instances(lambda cms: fn(next(counter), cms), state, ContinuumMemoryState)


def _check_stream(ids: object, targets: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise invalid("ids", got, "a tensor [B, T] with T >= 1")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape[:2]) != tuple(ids.shape):
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise invalid("targets", got, f"a tensor whose first two dims are {tuple(ids.shape)}")
    return ids, targets


def _lm_configs(model: object, states: list[ContinuumMemoryState]) -> list[CMSConfig]:
    """Configs of the CMS layers driven by the LM signal (from the state, else the model)."""
    configs = [cms.config for cms in states if cms.config.teach_signal == "lm"]
    if not configs and isinstance(model, torch.nn.Module):
        configs = [module.config for module in model.modules()
                   if isinstance(module, ContinuumMemory) and module.config.teach_signal == "lm"]
    if not configs:
        raise invalid("model", "no CMS layer with teach_signal='lm'",
                      "a model holding ContinuumMemory layers built with teach_signal='lm'")
    return configs


def _stream_position(states: list[ContinuumMemoryState]) -> int:
    """The common position of the LM-driven CMS states (0 for a fresh state without any)."""
    positions = {cms.position for cms in states if cms.config.teach_signal == "lm"}
    if len(positions) > 1:
        raise invalid("CMS state positions", sorted(positions), "one common stream position")
    return positions.pop() if positions else 0


def _next_cut(position: int, configs: list[CMSConfig]) -> int:
    """The next absolute position where some level of some CMS layer reaches a boundary."""
    return min((position // size + 1) * size for config in configs
               for size in config.chunk_sizes)


def stream_with_teach_signal(model: Callable[..., tuple[torch.Tensor, Any]], ids: torch.Tensor,
                             targets: torch.Tensor, state: Any = None,
                             loss_fn: LossFn | None = None,
                             segment_len: int | None = None) -> tuple[torch.Tensor, Any]:
    """Run ``model`` over ``ids [B, T]`` updating its CMS levels with the LM teach signal.

    ``targets`` are the next tokens (``[B, T]``) and ``loss_fn(logits, targets) -> scalar``
    the segment's loss (default: ``nestlearn.losses.lm_loss_sum``, cross entropy summed over
    tokens and batch, so a level accumulates the sum of per-token gradients of its chunk).
    ``model`` is called as ``model(ids, state, teach_hook=hook)`` and must pass ``teach_hook``
    to its CMS layers. ``state`` is passed to the model as is (None: the model's fresh state);
    CMS layers with ``teach_signal="lm"`` are found as they run. Returns
    ``(logits [B, T, V], state)``; chaining calls with the returned state continues the
    stream. With gradients enabled the returned logits keep the outer graph (for training
    through the stream); under ``torch.no_grad`` (in-context learning at inference) only the
    inner gradients are computed and everything returned is detached. CMS layers with the
    local signal in the same model keep updating themselves inside ``forward``.
    """
    ids, targets = _check_stream(ids, targets)
    if torch.is_inference_mode_enabled():
        raise invalid("torch.inference_mode", "enabled",
                      "torch.no_grad() (the teach signal needs autograd)")
    check_optional_int("segment_len", segment_len)
    loss_fn = lm_loss_sum if loss_fn is None else loss_fn
    found = find_cms_states(state)
    configs = _lm_configs(model, found)
    position = _stream_position(found)
    if segment_len is None:
        segment_len = min(config.chunk_sizes[0] for config in configs)
    outer = torch.is_grad_enabled()
    length = ids.shape[1]
    logits_parts = []
    offset = 0
    while offset < length:
        stop = min(_next_cut(position, configs), position + segment_len,
                   position + length - offset)
        size = stop - position
        attached = _Attachments(ids.shape[0])
        with torch.enable_grad():
            logits, new_state = model(ids[:, offset:offset + size], state,
                                      teach_hook=attached.attach)
            loss = loss_fn(logits, targets[:, offset:offset + size])
            flat = attached.leaves()
            if not flat and not attached.entries:
                raise invalid("model", "no CMS layer with teach_signal='lm' ran",
                              "a model whose forward runs its LM-driven CMS layers")
            grads = torch.autograd.grad(loss, flat, retain_graph=outer,
                                        allow_unused=True) if flat else ()
        grads = [torch.zeros_like(z) if g is None else g for g, z in zip(grads, flat,
                                                                        strict=True)]
        state = attached.commit(new_state, grads, stop)
        if not outer:
            state = detach(state)
            logits = logits.detach()
        logits_parts.append(logits)
        position = stop
        offset += size
    return torch.cat(logits_parts, dim=1), state


class _Attachments:
    """The CMS states that ran in one segment, with the zero leaves their weights were given.

    ``attach`` (the CMS layers' LM hook) uses each learning level's weights as ``w + z``,
    ``z`` a zero leaf ``[B, out, in]``: the gradient w.r.t. ``z`` is the per-batch-element
    gradient at the level. The layer hands the same ``levels`` object back in its returned
    state, which is how ``commit`` finds each CMS state again, wherever the model keeps it.
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch
        # id(levels used) -> (levels used, original levels, per-level leaves or None)
        self.entries: dict[int, tuple[tuple[CMSLevelState, ...], tuple[CMSLevelState, ...],
                                      list[list[torch.Tensor] | None]]] = {}

    def attach(self, cms: ContinuumMemoryState) -> ContinuumMemoryState:
        if id(cms.levels) in self.entries:
            raise invalid("model", "a CMS state run twice in one segment",
                          "each CMS layer run once per segment on its own state")
        if cms.batch_size != self.batch:
            raise invalid("CMS state batch_size", cms.batch_size, f"the batch of ids "
                          f"({self.batch})")
        per_level: list[list[torch.Tensor] | None] = []
        levels = []
        for index, level in enumerate(cms.levels):
            if not cms.config.level_learns(index):
                per_level.append(None)
                levels.append(level)
                continue
            zeros = [torch.zeros(self.batch, *w.shape[-2:], dtype=w.dtype, device=w.device,
                                 requires_grad=True) for w in level.weights]
            per_level.append(zeros)
            levels.append(CMSLevelState(
                tuple(w + z for w, z in zip(level.weights, zeros, strict=True)),
                level.accumulator))
        used = tuple(levels)
        self.entries[id(used)] = (used, cms.levels, per_level)
        return dataclasses.replace(cms, levels=used)

    def leaves(self) -> list[torch.Tensor]:
        return [z for _, _, per_level in self.entries.values()
                for zs in per_level if zs is not None for z in zs]

    def commit(self, new_state: Any, grads: list[torch.Tensor], stop: int) -> Any:
        """Put each CMS state back on its own weights, add the segment's gradients to the
        accumulators and apply the updates due at ``stop``."""
        offsets, start = {}, 0
        for key, (_, _, per_level) in self.entries.items():
            offsets[key] = start
            start += sum(len(zs) for zs in per_level if zs is not None)
        seen: set[int] = set()

        def commit_one(_: int, cms: ContinuumMemoryState) -> ContinuumMemoryState:
            if cms.config.teach_signal != "lm":
                return cms
            entry = self.entries.get(id(cms.levels))
            if entry is None or cms.position != stop:
                raise invalid("model state", "a CMS state that did not advance with the segment",
                              "a model that passes each CMS state through its layer")
            seen.add(id(cms.levels))
            _, original, per_level = entry
            cursor = offsets[id(cms.levels)]
            level_grads = []
            for zs in per_level:
                if zs is None:
                    level_grads.append(None)
                    continue
                level_grads.append(tuple(grads[cursor:cursor + len(zs)]))
                cursor += len(zs)
            # The level ran on w + 0: continue from w itself (the leaves are not kept).
            return commit_teach_signal(dataclasses.replace(cms, levels=original),
                                       tuple(level_grads))

        committed = map_cms_states(new_state, commit_one)
        if len(seen) != len(self.entries):
            raise invalid("model state", f"{len(seen)} of the {len(self.entries)} CMS states "
                          "that ran", "a returned state holding every CMS state that ran")
        return committed
