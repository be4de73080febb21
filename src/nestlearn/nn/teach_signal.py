"""The LM teach signal for CMS levels: the gradient of the stream's next-token loss.

PAPER.md section 3 leaves open what error f a CMS level accumulates in context; the paper's
"teach signal" reading is the gradient of the language-modelling loss at the level. This
driver runs any ``model(ids, state) -> (logits, state)`` over a stream whose state holds
``ContinuumMemoryState``s built with ``teach_signal="lm"``:

1. the stream is cut into segments of at most ``segment_len`` tokens (default: the smallest
   chunk size), also cut at every level boundary, so no level changes inside a segment;
2. before a segment, each learning level's fast weights ``w`` are used as ``w + z`` with ``z``
   a zero leaf of shape ``[B, out, in]``; after the segment, ``torch.autograd.grad`` of the
   segment's loss w.r.t. ``z`` is the per-batch-element gradient at the level;
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
import torch.nn.functional as F

from nestlearn.errors import invalid
from nestlearn.nn.cms import (
    CMSConfig,
    CMSLevelState,
    ContinuumMemoryState,
    commit_teach_signal,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _map_state(obj: Any, on_cms: Callable[[ContinuumMemoryState], Any] | None,
               on_tensor: Callable[[torch.Tensor], torch.Tensor] | None) -> Any:
    """Rebuild a nested state (dataclasses, tuples, named tuples, lists, dicts), applying
    ``on_cms`` to every CMS state (in a fixed traversal order) and ``on_tensor`` to tensors."""
    if on_cms is not None and isinstance(obj, ContinuumMemoryState):
        return on_cms(obj)
    if isinstance(obj, torch.Tensor):
        return obj if on_tensor is None else on_tensor(obj)
    if isinstance(obj, CMSConfig):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _map_state(getattr(obj, f.name), on_cms, on_tensor)
                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_state(item, on_cms, on_tensor) for item in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_state(item, on_cms, on_tensor) for item in obj)
    if isinstance(obj, dict):
        return {key: _map_state(value, on_cms, on_tensor) for key, value in obj.items()}
    return obj


def find_cms_states(state: Any) -> list[ContinuumMemoryState]:
    """Every ``ContinuumMemoryState`` inside ``state``, in traversal order."""
    found: list[ContinuumMemoryState] = []

    def collect(cms: ContinuumMemoryState) -> ContinuumMemoryState:
        found.append(cms)
        return cms

    _map_state(state, collect, None)
    return found


def map_cms_states(state: Any, fn: Callable[[int, ContinuumMemoryState], Any]) -> Any:
    """``state`` with its i-th CMS state (traversal order) replaced by ``fn(i, cms_state)``."""
    counter = iter(range(1 << 62))
    return _map_state(state, lambda cms: fn(next(counter), cms), None)


def detach_state(state: Any) -> Any:
    """``state`` with every tensor detached."""
    return _map_state(state, None, torch.Tensor.detach)


def sum_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy summed over batch and tokens (each token's gradient counts
    once, as in the paper's sum over the chunk, independent of the batch size)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="sum")


def _check_stream(ids: object, targets: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise invalid("ids", got, "a tensor [B, T] with T >= 1")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape[:2]) != tuple(ids.shape):
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise invalid("targets", got, f"a tensor whose first two dims are {tuple(ids.shape)}")
    return ids, targets


def _check_cms_states(states: list[ContinuumMemoryState]) -> int:
    if not states:
        raise invalid("state", "no ContinuumMemoryState inside",
                      "a model state holding at least one CMS state")
    for index, cms in enumerate(states):
        if cms.config.teach_signal != "lm":
            raise invalid(f"CMS state {index} teach_signal", repr(cms.config.teach_signal),
                          "'lm' (layers built with CMSConfig(teach_signal='lm'))")
    positions = {cms.position for cms in states}
    if len(positions) != 1:
        raise invalid("CMS state positions", sorted(positions), "one common stream position")
    return positions.pop()


def _next_cut(position: int, states: list[ContinuumMemoryState]) -> int:
    """The next absolute position where some level of some CMS layer reaches a boundary."""
    return min((position // size + 1) * size
               for cms in states for size in cms.config.chunk_sizes)


def stream_with_teach_signal(model: Callable[..., tuple[torch.Tensor, Any]], ids: torch.Tensor,
                             targets: torch.Tensor, state: Any = None,
                             loss_fn: LossFn | None = None,
                             segment_len: int | None = None) -> tuple[torch.Tensor, Any]:
    """Run ``model`` over ``ids [B, T]`` updating its CMS levels with the LM teach signal.

    ``targets`` are the next tokens (``[B, T]``) and ``loss_fn(logits, targets) -> scalar``
    the segment's loss (default: cross entropy summed over tokens and batch, so a level
    accumulates the sum of per-token gradients of its chunk). ``state=None`` starts from
    ``model.init_state(B)``. Returns ``(logits [B, T, V], state)``; chaining calls with the
    returned state continues the stream. With gradients enabled the returned logits keep the
    outer graph (for training through the stream); under ``torch.no_grad`` (in-context
    learning at inference) only the inner gradients are computed and everything returned is
    detached.
    """
    ids, targets = _check_stream(ids, targets)
    if torch.is_inference_mode_enabled():
        raise invalid("torch.inference_mode", "enabled",
                      "torch.no_grad() (the teach signal needs autograd)")
    if state is None:
        if not hasattr(model, "init_state"):
            raise invalid("state", None, "a model state (the model has no init_state)")
        state = model.init_state(ids.shape[0])
    if segment_len is not None and (isinstance(segment_len, bool)
                                    or not isinstance(segment_len, int) or segment_len < 1):
        raise invalid("segment_len", repr(segment_len), "None or an int >= 1")
    loss_fn = sum_cross_entropy if loss_fn is None else loss_fn
    position = _check_cms_states(find_cms_states(state))
    if segment_len is None:
        segment_len = min(cms.config.chunk_sizes[0] for cms in find_cms_states(state))
    outer = torch.is_grad_enabled()
    length = ids.shape[1]
    logits_parts = []
    offset = 0
    while offset < length:
        before = find_cms_states(state)
        stop = min(_next_cut(position, before), position + segment_len,
                   position + length - offset)
        size = stop - position
        with torch.enable_grad():
            leafy_state, leaves = _attach_leaves(state, ids.shape[0])
            logits, new_state = model(ids[:, offset:offset + size], leafy_state)
            loss = loss_fn(logits, targets[:, offset:offset + size])
            flat = [z for per_cms in leaves for zs in per_cms if zs is not None for z in zs]
            grads = torch.autograd.grad(loss, flat, retain_graph=outer,
                                        allow_unused=True) if flat else ()
        grads = [torch.zeros_like(z) if g is None else g for g, z in zip(grads, flat,
                                                                        strict=True)]
        state = _commit_segment(new_state, before, leaves, grads, stop)
        if not outer:
            state = detach_state(state)
            logits = logits.detach()
        logits_parts.append(logits)
        position = stop
        offset += size
    return torch.cat(logits_parts, dim=1), state


def _attach_leaves(state: Any, batch: int
                   ) -> tuple[Any, list[list[list[torch.Tensor] | None]]]:
    """Use each learning level's weights as ``w + z`` with ``z`` a zero leaf ``[B, out, in]``:
    the gradient w.r.t. ``z`` is the per-batch-element gradient at the level."""
    leaves: list[list[list[torch.Tensor] | None]] = []

    def attach(index: int, cms: ContinuumMemoryState) -> ContinuumMemoryState:
        per_level: list[list[torch.Tensor] | None] = []
        levels = []
        for level_index, level in enumerate(cms.levels):
            if not cms.config.level_learns(level_index):
                per_level.append(None)
                levels.append(level)
                continue
            zeros = [torch.zeros(batch, *w.shape[-2:], dtype=w.dtype, device=w.device,
                                 requires_grad=True) for w in level.weights]
            per_level.append(zeros)
            levels.append(CMSLevelState(
                tuple(w + z for w, z in zip(level.weights, zeros, strict=True)),
                level.accumulator))
        leaves.append(per_level)
        return dataclasses.replace(cms, levels=tuple(levels))

    return map_cms_states(state, attach), leaves


def _commit_segment(new_state: Any, before: list[ContinuumMemoryState],
                    leaves: list[list[list[torch.Tensor] | None]], grads: list[torch.Tensor],
                    stop: int) -> Any:
    """Put each CMS state back on its own weights, add the segment's gradients to the
    accumulators and apply the updates due at ``stop``."""
    after = find_cms_states(new_state)
    if len(after) != len(before) or any(cms.position != stop for cms in after):
        raise invalid("model state", "CMS states that did not advance with the segment",
                      "a model that passes each CMS state through its layer")
    grad_iter = iter(grads)

    def commit(index: int, cms: ContinuumMemoryState) -> ContinuumMemoryState:
        per_level = tuple(None if zs is None else tuple(next(grad_iter) for _ in zs)
                          for zs in leaves[index])
        # The level ran on w + 0: continue from w itself (the leaves are not kept).
        restored = dataclasses.replace(cms, levels=tuple(
            CMSLevelState(old.weights, old.accumulator) for old in before[index].levels))
        return commit_teach_signal(restored, per_level)

    return map_cms_states(new_state, commit)
