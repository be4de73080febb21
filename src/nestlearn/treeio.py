"""Split nested Python structures into a flat tensor dict plus a JSON-safe skeleton.

Optimizer and sampler state dicts are trees of dicts, lists, tuples, numbers and tensors (with
integer dict keys, which JSON cannot hold). Checkpoints store the tensors with safetensors and
the rest as JSON, so nothing is ever pickled; ``unflatten`` rebuilds the exact tree, keeping
tuples, integer keys, floats (``repr`` round-trips) and tensor dtypes bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nestlearn.errors import NestlearnError

_TENSOR = "__tensor__"
_NDARRAY = "__ndarray__"
_TUPLE = "__tuple__"
_DICT = "__dict__"


def flatten(tree: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Return ``(skeleton, tensors)``: ``skeleton`` is JSON-serializable, ``tensors`` maps
    keys (starting with ``prefix``) to contiguous CPU tensors that own their memory."""
    tensors: dict[str, torch.Tensor] = {}

    def visit(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            key = f"{prefix}{len(tensors)}"
            # clone: safetensors refuses tensors that share storage (tied weights, views)
            tensors[key] = node.detach().to("cpu").clone().contiguous()
            return {_TENSOR: key}
        if isinstance(node, np.ndarray):
            key = f"{prefix}{len(tensors)}"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(node).copy())
            return {_NDARRAY: key}
        if isinstance(node, dict):
            return {_DICT: [[visit_key(k, path), visit(v, f"{path}.{k}")] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {_TUPLE: [visit(v, f"{path}[{i}]") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [visit(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, np.generic):
            return node.item()
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise NestlearnError(
            f"{path or 'state'}: cannot store a value of type {type(node).__name__}; allowed: "
            "tensors, numpy arrays, numbers, strings, None and dicts/lists/tuples of these"
        )

    def visit_key(key: Any, path: str) -> Any:
        if key is None or isinstance(key, (bool, int, float, str)):
            return key
        raise NestlearnError(f"{path}: dict key {key!r} is not a number or a string")

    return visit(tree, ""), tensors


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`; a missing tensor key raises a clear error."""

    def tensor(key: str) -> torch.Tensor:
        if key not in tensors:
            raise NestlearnError(f"checkpoint: tensor {key!r} is referenced but missing")
        return tensors[key]

    def visit(node: Any) -> Any:
        if isinstance(node, dict):
            if _TENSOR in node:
                return tensor(node[_TENSOR])
            if _NDARRAY in node:
                return tensor(node[_NDARRAY]).numpy()
            if _TUPLE in node:
                return tuple(visit(v) for v in node[_TUPLE])
            if _DICT in node:
                return {k: visit(v) for k, v in node[_DICT]}
            raise NestlearnError(f"checkpoint: unknown entry with keys {sorted(node)}")
        if isinstance(node, list):
            return [visit(v) for v in node]
        return node

    return visit(skeleton)
