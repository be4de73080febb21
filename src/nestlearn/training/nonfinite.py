"""The NaN/Inf guard: find NaN/Inf in a loss, a memory state tree or gradients, say where, and
stop the run after saving the last good state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from nestlearn.errors import NonFiniteError
from nestlearn.state import named_tensors

__all__ = ["NonFiniteError", "NonFiniteGuard", "find_nonfinite", "first_nonfinite",
           "nonfinite_gradient"]


def first_nonfinite(named: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating tensor in ``named`` holding a NaN or Inf (None: all finite).

    One flag per tensor, computed on its device and stacked: a single host read (one device
    sync) for the whole set, where a read per tensor would stall a GPU's stream once each."""
    checked = [(name, tensor) for name, tensor in named.items()
               if tensor.is_floating_point() or tensor.is_complex()]
    if not checked:
        return None
    device = checked[0][1].device
    flags = torch.stack([torch.isfinite(tensor.detach()).all().to(device)
                         for _, tensor in checked])
    for (name, _), finite in zip(checked, flags.tolist(), strict=True):
        if not finite:
            return name
    return None


def find_nonfinite(tree: Any, name: str = "state") -> str | None:
    """Path of the first floating tensor of a state tree holding a NaN or Inf (None if all are
    finite), e.g. ``state.blocks[1].memory.chunk_start.weights[0]``; one host read."""
    return first_nonfinite(named_tensors(tree, name))


def nonfinite_gradient(model: torch.nn.Module) -> str | None:
    """Name of the first parameter whose gradient holds a NaN or Inf; one host read."""
    found = first_nonfinite({param_name: param.grad
                             for param_name, param in model.named_parameters()
                             if param.grad is not None})
    return None if found is None else f"gradient of {found}"


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
