"""Learning-rate schedule: linear warmup then cosine decay (or constant).

The learning rate is a pure function of the step number, so a resumed run needs nothing but
the step to continue the schedule exactly.
"""

from __future__ import annotations

import math

import torch

from nestlearn.errors import invalid


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str = "cosine",
              min_lr_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate for the update made at 0-based ``step``.

    Warmup rises linearly to 1 over ``warmup_steps`` updates; cosine then falls to
    ``min_lr_ratio`` at ``total_steps - 1`` and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise invalid("schedule.kind", repr(kind), "cosine, constant")
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULED_KEYS: tuple[str, ...] = ("lr", "fallback_lr")  # fallback_lr: nestlearn.optim's AdamW part


class WarmupCosine:
    """Sets each param group's ``lr`` (and ``fallback_lr``, the learning rate nestlearn
    optimizers use for non-matrix parameters) to ``base * lr_factor(step)`` before an update."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 kind: str = "cosine", min_lr_ratio: float = 0.1) -> None:
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.kind = kind
        self.min_lr_ratio = min_lr_ratio
        self.base_lrs = [
            {key: float(group[key]) for key in SCHEDULED_KEYS if key in group}
            for group in optimizer.param_groups
        ]

    def apply(self, step: int) -> float:
        """Set the learning rates for the update at ``step``; return the first group's."""
        factor = lr_factor(step, self.warmup_steps, self.total_steps, self.kind,
                           self.min_lr_ratio)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            for key, value in base.items():
                group[key] = value * factor
        return self.base_lrs[0]["lr"] * factor

    def state_dict(self) -> dict:
        return {"base_lrs": [dict(base) for base in self.base_lrs],
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "kind": self.kind, "min_lr_ratio": self.min_lr_ratio}

    def load_state_dict(self, state: dict) -> None:
        if len(state["base_lrs"]) != len(self.base_lrs):
            raise invalid("scheduler.base_lrs", len(state["base_lrs"]),
                          f"{len(self.base_lrs)} param groups")
        self.base_lrs = [{k: float(v) for k, v in base.items()} for base in state["base_lrs"]]
