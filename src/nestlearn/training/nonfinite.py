"""The NaN/Inf guard: find NaN/Inf in a loss, a memory state tree or gradients, say where, and
stop the run after saving the last good state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from nestlearn.errors import NonFiniteError
from nestlearn.state import find_nonfinite

__all__ = ["NonFiniteError", "NonFiniteGuard", "find_nonfinite", "nonfinite_gradient"]



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
