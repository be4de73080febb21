"""Find NaN/Inf in a loss, a memory state tree or gradients, and say where."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def find_nonfinite(tree: Any, name: str = "state") -> str | None:
    """Path of the first tensor in ``tree`` holding a NaN or Inf (``None`` if all finite).

    Walks tensors, dataclasses (memory states), named tuples, tuples, lists and dicts, so the
    path names the layer and the tensor, e.g. ``state[1].memory.weights[0]``.
    """
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            return None if bool(torch.isfinite(tree.detach()).all()) else name
        return None
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        for f in dataclasses.fields(tree):
            found = find_nonfinite(getattr(tree, f.name), f"{name}.{f.name}")
            if found:
                return found
        return None
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        for key, value in zip(tree._fields, tree, strict=True):
            found = find_nonfinite(value, f"{name}.{key}")
            if found:
                return found
        return None
    if isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            found = find_nonfinite(value, f"{name}[{i}]")
            if found:
                return found
        return None
    if isinstance(tree, dict):
        for key, value in tree.items():
            found = find_nonfinite(value, f"{name}[{key!r}]")
            if found:
                return found
        return None
    return None


def nonfinite_gradient(model: torch.nn.Module) -> str | None:
    """Name of the first parameter whose gradient holds a NaN or Inf."""
    for param_name, param in model.named_parameters():
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            return f"gradient of {param_name}"
    return None
