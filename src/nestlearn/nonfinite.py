"""Find NaN/Inf in a loss, a memory state tree or gradients, and say where."""

from __future__ import annotations

import torch

from nestlearn.state import find_nonfinite

__all__ = ["find_nonfinite", "nonfinite_gradient"]


def nonfinite_gradient(model: torch.nn.Module) -> str | None:
    """Name of the first parameter whose gradient holds a NaN or Inf."""
    for param_name, param in model.named_parameters():
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            return f"gradient of {param_name}"
    return None
