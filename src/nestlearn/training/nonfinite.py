"""The NaN/Inf guard: find NaN/Inf in a loss, a memory state tree or gradients, say where, and
stop the run after saving the last good state."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from nestlearn.errors import NestlearnError


class NonFiniteError(NestlearnError):
    """The loss, a memory state or a gradient became NaN/Inf; the run stopped."""


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


class NonFiniteGuard:
    """Stops training at the first NaN/Inf. ``save_last_good(sampler_state, rng_state)``
    checkpoints the state before the failing step (from which ``--resume`` continues) and
    returns its folder; the error names the step, the place and that folder."""

    def __init__(self, save_last_good: Callable[[Any, Any], Path | None],
                 checkpoints: Path) -> None:
        self.save_last_good = save_last_good
        self.checkpoints = checkpoints

    def stop(self, step: int, where: str, loss: float | None, sampler_state: Any,
             rng_state: Any) -> NoReturn:
        """Save the last good state (``step`` steps done) and raise naming the place."""
        saved = self.save_last_good(sampler_state, rng_state) or self.checkpoints
        loss_part = "" if loss is None else f" (loss {loss:.6g})"
        raise NonFiniteError(
            f"training stopped at step {step + 1}: NaN/Inf in {where}{loss_part}; "
            f"last good checkpoint (step {step}) saved in {saved}"
        )
