"""The state stream training carries from one segment to the next: row resets, attention
caches, and its form in a checkpoint.

- :func:`reset_rows` gives chosen batch rows the model's fresh state and keeps the others'.
  The fresh state's tensor at the path of a carried tensor is either per row (the same shape:
  taken row by row), a batch-shared initial value (meta-learned initial weights
  ``[H, out, in]``, the same shape for every batch size: broadcast to the reset rows, so
  gradients reach them) or absent (``None``: a momentum or a CMS accumulator that has not
  started, i.e. zeros). The rows that are not reset keep their carried values exactly; for a
  batch-shared initial value their gradient reaches it as if the in-context change were a
  constant added to it (first order, as ``nestlearn.nn.teach_signal`` treats CMS updates), so
  the initial weights keep learning between resets; a carried tensor that is still the
  initial value itself (a CMS level before its first update) becomes today's value. Static
  fields (positions, configs) keep the carried values:
  stream positions are a clock shared by the batch, so a CMS level of a reset row restarts
  its weights and accumulator but keeps the shared level boundaries. A tensor whose carried
  and fresh shapes differ otherwise (the pending tokens of a memory chunk when ``seq_len`` is
  not a multiple of the memory's chunk size) cannot be reset for one row: refused, naming
  the tensor.
- :func:`carried_form`: what is carried, detached, caches emptied and every CMS level's held
  tokens turned into their gradient sum (taken before the optimizer's step).
- :func:`drop_attention_caches`: a carried KV cache would grow without bound (global
  attention) and cannot be emptied for one row, so stream training carries the recurrent
  memories only; attention sees its own segment, as in window training (its position, the
  RoPE offset, keeps counting).
- :func:`state_to_tree` / :func:`tree_from_state_tree`: a state as plain dicts, tuples and
  tensors (class names, fields, static values), which ``nestlearn.treeio`` stores without
  pickle; rebuilt only from classes of nestlearn.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from nestlearn.errors import NestlearnError
from nestlearn.nn.cms import ContinuumMemoryState, settled
from nestlearn.nn.transformer import AttentionState
from nestlearn.state import detach, is_state_class, map_instances, named_tensors

_CLASS = "__class__"
_FIELDS = "fields"


def reset_rows(carried: Any, init_state: Callable[[int], Any], reset: torch.Tensor) -> Any:
    """The state to run the next segment from: ``carried`` (detached, from the previous
    segment) with the rows where ``reset`` (BoolTensor ``[B]``) is True replaced by the
    model's fresh state; ``init_state(batch)`` is the model's ``init_state``. See the module
    docstring for how each tensor is matched."""
    batch = int(reset.shape[0])
    fresh = named_tensors(init_state(batch))
    other = named_tensors(init_state(batch + 1))
    leaves, spec = pytree.tree_flatten_with_path(carried)
    out = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            out.append(leaf)
            continue
        name = "state" + pytree.keystr(path)
        new = fresh.get(name)
        shared = new is not None and new.shape == other[name].shape
        mask = reset.to(leaf.device).view(-1, *([1] * (leaf.dim() - 1)))
        if new is None:  # not started in a fresh state (momentum, accumulator): zeros
            out.append(torch.where(mask, torch.zeros_like(leaf), leaf))
        elif shared and leaf.shape == new.shape:  # still the initial value: today's
            out.append(new.to(leaf.dtype))
        elif shared and leaf.shape[1:] == new.shape:
            new = new.to(leaf.dtype)
            # the carried value, with the gradient reaching the initial value as if the
            # in-context change were a constant added to it (first order, as the CMS teach
            # signal treats its updates); the carried value itself is exact
            kept = leaf.detach() + (new - new.detach())
            out.append(torch.where(mask, new.expand_as(leaf), kept))
        elif new.shape == leaf.shape:
            out.append(torch.where(mask, new.to(leaf.dtype), leaf))
        else:
            raise NestlearnError(
                f"{name}: carried shape {tuple(leaf.shape)}, fresh {tuple(new.shape)}; a batch "
                "row can be reset only where both agree (stream training: data.seq_len a "
                "multiple of every memory chunk size, or train.state_reset='never')")
    return pytree.tree_unflatten(out, spec)


def carried_form(state: Any) -> Any:
    """What stream training carries to its next segment: ``state`` detached, its KV caches
    emptied (``drop_attention_caches``) and every CMS level's held tokens turned into their
    gradient sum (``nn.cms.settled``): taken now, at the weights and with the parameters
    that saw them, as a level's running sum has always been carried. Left held, their
    gradients would be taken after the optimizer's step, with the next step's parameters,
    and reach them through the carried inputs."""
    with torch.no_grad():
        state = map_instances(settled, state, ContinuumMemoryState)
    return drop_attention_caches(detach(state))


def drop_attention_caches(state: Any) -> Any:
    """``state`` with every KV cache emptied (``[B, H, 0, Dh]``), positions kept."""

    def empty(cache: AttentionState) -> AttentionState:
        return dataclasses.replace(cache, key=cache.key[:, :, :0], value=cache.value[:, :, :0])

    return map_instances(empty, state, AttentionState)


def state_to_tree(node: Any) -> Any:
    """A state (or anything holding states) as dicts, tuples, lists, tensors and scalars."""
    if node is None or isinstance(node, (torch.Tensor, bool, int, float, str)):
        return node
    if isinstance(node, tuple):
        return tuple(state_to_tree(v) for v in node)
    if isinstance(node, list):
        return [state_to_tree(v) for v in node]
    if isinstance(node, dict):
        return {k: state_to_tree(v) for k, v in node.items()}
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        cls = type(node)
        return {_CLASS: f"{cls.__module__}:{cls.__qualname__}",
                _FIELDS: {f.name: state_to_tree(getattr(node, f.name))
                          for f in dataclasses.fields(cls)}}
    raise NestlearnError(f"carried state: cannot store a {type(node).__name__}")


def _class(name: object) -> type:
    module, _, qualname = str(name).partition(":")
    if not module.startswith("nestlearn.") or not qualname:
        raise NestlearnError(f"carried state: class {name!r} refused; allowed: nestlearn's")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError):
        raise NestlearnError(f"carried state: class {name!r} not found") from None
    if not dataclasses.is_dataclass(cls):
        raise NestlearnError(f"carried state: class {name!r} is not a state or a config")
    return cls


def tree_from_state_tree(node: Any) -> Any:
    """Inverse of :func:`state_to_tree`."""
    if isinstance(node, tuple):
        return tuple(tree_from_state_tree(v) for v in node)
    if isinstance(node, list):
        return [tree_from_state_tree(v) for v in node]
    if isinstance(node, dict) and _CLASS in node:
        cls = _class(node[_CLASS])
        fields = {k: tree_from_state_tree(v) for k, v in node[_FIELDS].items()}
        if not is_state_class(cls):
            return cls(**fields)  # a config: validated again
        state = object.__new__(cls)  # as the pytree rebuilds states (nestlearn.state)
        for name, value in fields.items():
            object.__setattr__(state, name, value)
        return state
    if isinstance(node, dict):
        return {k: tree_from_state_tree(v) for k, v in node.items()}
    return node
