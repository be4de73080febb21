"""One protocol for recurrent states: frozen dataclasses registered as pytrees.

Every layer's, block's and model's state (memory weights, KV caches, CMS levels, the LM state)
is a frozen dataclass declared with :func:`state_dataclass`. Its tensor-valued fields (tensors,
tuples of tensors, None, nested states) are the pytree's children; fields declared with
:func:`static_field` (positions, batch sizes, configs, fingerprints) are kept in the tree's
context, so no tensor function ever sees them and they survive every map unchanged. One tree
map then serves detaching (truncated backprop through time), moving and casting, the NaN scan,
the autocast precision raise and compaction; dicts, lists, tuples and named tuples around
states are walked by the same map.

Rebuilding a state from its children does not call ``__init__`` (a map neither re-runs
``__post_init__`` nor needs every field to be an ``__init__`` argument). States change only by
``dataclasses.replace`` or by building a new one. Only torch and the standard library are
imported here, so the ops can use this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.utils._pytree as pytree

T = TypeVar("T")
_STATIC = "nestlearn_static"


def static_field(**kwargs: Any) -> Any:
    """A dataclass field kept as pytree metadata (an int, a config), not as a child."""
    return dataclasses.field(metadata={_STATIC: True}, **kwargs)


class TreeState:
    """Methods every state shares; the dataclass itself comes from :func:`state_dataclass`."""

    def detach(self: T) -> T:
        """The same state cut from the autograd graph (truncated backprop through time)."""
        return detach(self)

    def to(self: T, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> T:
        """The state on ``device``, its floating tensors cast to ``dtype``."""
        return to(self, device=device, dtype=dtype)


def _split_fields(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    fields = dataclasses.fields(cls)
    static = tuple(f.name for f in fields if f.metadata.get(_STATIC))
    children = tuple(f.name for f in fields if not f.metadata.get(_STATIC))
    return children, static


def state_dataclass(cls: type[T]) -> type[T]:
    """Class decorator: ``cls`` as a frozen dataclass (compared by identity: its fields hold
    tensors) registered as a pytree whose children are its non-static fields."""
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    children, static = _split_fields(cls)

    def flatten(state: Any) -> tuple[list[Any], Any]:
        return ([getattr(state, name) for name in children],
                tuple(getattr(state, name) for name in static))

    def flatten_with_keys(state: Any) -> tuple[list[tuple[Any, Any]], Any]:
        values, context = flatten(state)
        return [(pytree.GetAttrKey(name), value)
                for name, value in zip(children, values, strict=True)], context

    def unflatten(values: Any, context: Any) -> Any:
        state = object.__new__(cls)
        for name, value in zip(children, values, strict=True):
            object.__setattr__(state, name, value)
        for name, value in zip(static, context, strict=True):
            object.__setattr__(state, name, value)
        return state

    pytree.register_pytree_node(cls, flatten, unflatten,
                                serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
                                flatten_with_keys_fn=flatten_with_keys)
    return cls


def is_state_class(cls: type) -> bool:
    """Whether ``cls`` is registered as a pytree (by :func:`state_dataclass` or torch)."""
    return cls in pytree.SUPPORTED_NODES


def tree_map(fn: Callable[[torch.Tensor], Any], tree: T) -> T:
    """``tree`` rebuilt with ``fn`` applied to every tensor leaf; None, numbers, strings and
    static fields are kept as they are."""
    return map_instances(fn, tree, torch.Tensor)


def map_instances(fn: Callable[[Any], Any], tree: T, kind: type | tuple[type, ...]) -> T:
    """``tree`` rebuilt with every node of type ``kind`` replaced by ``fn(node)`` (called in
    traversal order; the walk does not enter those nodes)."""

    def is_kind(node: Any) -> bool:
        return isinstance(node, kind)

    return pytree.tree_map(lambda node: fn(node) if is_kind(node) else node, tree,
                           is_leaf=is_kind)


def instances(tree: Any, kind: type | tuple[type, ...]) -> list[Any]:
    """Every node of type ``kind`` in ``tree``, in traversal order."""
    return [node for node in pytree.tree_leaves(tree, is_leaf=lambda n: isinstance(n, kind))
            if isinstance(node, kind)]


def tensors(tree: Any) -> list[torch.Tensor]:
    """Every tensor leaf of ``tree``, in traversal order."""
    return instances(tree, torch.Tensor)


def first_tensor(tree: Any, floating: bool = False) -> torch.Tensor | None:
    """The first tensor leaf of ``tree`` in traversal order (the first floating-point one if
    ``floating``), or None. The walk is lazy and stops there: the memory ops ask this once per
    call (per chunk, per decoded token), and flattening every argument and state to read one
    device or dtype cost more Python time than some of the ops' kernels."""
    for leaf in pytree.tree_iter(tree, is_leaf=lambda node: isinstance(node, torch.Tensor)):
        if isinstance(leaf, torch.Tensor) and (not floating or leaf.is_floating_point()):
            return leaf
    return None


def named_tensors(tree: Any, name: str = "state") -> dict[str, torch.Tensor]:
    """Every tensor leaf keyed by its path, e.g. ``state.blocks[1].memory.conv_tail``."""
    leaves, _ = pytree.tree_flatten_with_path(tree)
    return {name + pytree.keystr(path): leaf for path, leaf in leaves
            if isinstance(leaf, torch.Tensor)}


def flatten(tree: Any) -> tuple[list[Any], pytree.TreeSpec]:
    """``(leaves, spec)``: the leaves in traversal order and what :func:`unflatten` needs."""
    return pytree.tree_flatten(tree)


def unflatten(leaves: list[Any], spec: pytree.TreeSpec) -> Any:
    """Inverse of :func:`flatten`."""
    return pytree.tree_unflatten(leaves, spec)


def detach(tree: T) -> T:
    """``tree`` with every tensor detached."""
    return tree_map(torch.Tensor.detach, tree)


def to(tree: T, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> T:
    """``tree`` on ``device`` with its floating tensors cast to ``dtype`` (integer and bool
    tensors keep their dtype)."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        cast = dtype if dtype is not None and tensor.is_floating_point() else None
        return tensor.to(device=device, dtype=cast)

    return tree_map(move, tree)


def find_nonfinite(tree: Any, name: str = "state") -> str | None:
    """Path of the first floating tensor in ``tree`` holding a NaN or Inf (None if all are
    finite), e.g. ``state.blocks[1].memory.chunk_start.weights[0]``."""
    for path, tensor in named_tensors(tree, name).items():
        if (tensor.is_floating_point() or tensor.is_complex()) \
                and not bool(torch.isfinite(tensor.detach()).all()):
            return path
    return None
