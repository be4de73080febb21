"""Multi-frequency parameter levels (docs/paper.md section 3, the CMS rule) for any optimizer.

A level is a param group with an update period C: its parameters change only every C steps,
by the error signals gathered over the block (the CMS rule
theta_{i+1} = theta_i - sum_{t=i-C}^{i} eta_t f(theta_t; x_t) if i = 0 mod C, else theta_i).
``MultiFrequency`` wraps any ``torch.optim.Optimizer``: between boundaries it adds each
gradient into a buffer and hides the group from the wrapped optimizer (a parameter without a
gradient is skipped by every torch optimizer); at a boundary it hands over the gathered
gradient and lets the wrapped optimizer step. Period 1 is plain stepping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from nestlearn.errors import check_choice, check_int, invalid

REDUCTIONS = ("sum", "mean")


def level_param_groups(levels: Sequence[tuple[Iterable[torch.Tensor], int]],
                       **options: Any) -> list[dict[str, Any]]:
    """Param groups ``[{"params": [...], "period": C, **options}, ...]`` from (params, C) pairs.

    For example ``level_param_groups([(fast.parameters(), 1), (slow.parameters(), 16)])``.
    """
    groups = []
    for index, (params, period) in enumerate(levels):
        check_int(f"levels[{index}].period", period, 1)
        groups.append({"params": list(params), "period": period, **options})
    return groups


class MultiFrequency(Optimizer):
    """Give each param group of ``optimizer`` its own update period C.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (its param groups are shared, so lr
            schedulers and ``add_param_group`` act on both).
        periods: one period (int >= 1) per param group; when omitted each group's
            ``"period"`` entry is used (default 1).
        reduction: how the C gathered gradients are combined at the boundary: ``"sum"`` (the
            CMS rule's sum, default) or ``"mean"``.

    The step count is global: a group with period C steps after steps C, 2C, ... (counting
    ``step()`` calls). ``zero_grad()`` clears gradients only; the buffers persist and are part
    of ``state_dict()``.
    """

    def __init__(self, optimizer: Optimizer, periods: Sequence[int] | None = None,
                 reduction: str = "sum") -> None:
        if not isinstance(optimizer, Optimizer):
            raise invalid("optimizer", type(optimizer).__name__, "a torch.optim.Optimizer")
        if isinstance(optimizer, MultiFrequency):
            raise invalid("optimizer", "a MultiFrequency", "an optimizer that is not wrapped yet")
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        groups = optimizer.param_groups
        if periods is not None:
            periods = list(periods)
            if len(periods) != len(groups):
                raise invalid("periods", f"{len(periods)} periods",
                              f"one per param group ({len(groups)})")
            for index, (group, period) in enumerate(zip(groups, periods, strict=True)):
                group["period"] = check_int(f"periods[{index}]", period, 1)
        else:
            for index, group in enumerate(groups):
                group["period"] = check_int(f"param_groups[{index}]['period']",
                                            group.get("period", 1), 1)
        super().__init__(groups, {"period": 1})
        # Share the wrapped optimizer's list of groups (the same dicts): one source of truth.
        self.param_groups = optimizer.param_groups
        self.optimizer = optimizer
        self.steps = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "optimizer"):
            super().add_param_group(param_group)
            return
        param_group["period"] = check_int("param_group['period']",
                                          param_group.get("period", 1), 1)
        self.optimizer.add_param_group(param_group)

    def _gather(self, group: dict[str, Any]) -> bool:
        """Add the group's gradients to its buffers; True when this step is its boundary."""
        period = group["period"]
        boundary = self.steps % period == 0
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if "gradient_sum" not in state:
                state["gradient_sum"] = torch.zeros_like(param)
            state["gradient_sum"].add_(param.grad)
        return boundary

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Count one step; groups at their boundary step with the gathered gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.steps += 1
        replaced: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for group in self.param_groups:
            if group["period"] == 1:
                continue
            boundary = self._gather(group)
            for param in group["params"]:
                state = self.state[param]
                if boundary and "gradient_sum" in state:
                    # Applied even if this last step gave the parameter no gradient.
                    replaced.append((param, param.grad))
                    gathered = state.pop("gradient_sum")
                    if self.reduction == "mean":
                        gathered.div_(group["period"])
                    param.grad = gathered
                elif param.grad is not None:
                    replaced.append((param, param.grad))
                    param.grad = None
        try:
            self.optimizer.step()
        finally:
            for param, grad in replaced:
                param.grad = grad
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus the step count and gradient buffers."""
        index = {id(p): i for i, p in enumerate(self._all_params())}
        buffers = {index[id(p)]: s["gradient_sum"].clone() for p, s in self.state.items()
                   if "gradient_sum" in s}
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps,
                "reduction": self.reduction, "gradient_sums": buffers,
                "periods": [group["period"] for group in self.param_groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("optimizer", "steps", "gradient_sums", "periods"):
            if key not in state_dict:
                raise invalid("state_dict", f"no {key!r} entry", "a MultiFrequency.state_dict()")
        periods = list(state_dict["periods"])
        if len(periods) != len(self.param_groups):
            raise invalid("state_dict['periods']", f"{len(periods)} groups",
                          f"{len(self.param_groups)} groups as in this optimizer")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        # torch's load_state_dict builds new group dicts: share them again.
        self.param_groups = self.optimizer.param_groups
        for group, period in zip(self.param_groups, periods, strict=True):
            group["period"] = period
        self.steps = int(state_dict["steps"])
        params = self._all_params()
        self.state.clear()
        for position, buffer in state_dict["gradient_sums"].items():
            param = params[int(position)]
            self.state[param]["gradient_sum"] = buffer.to(dtype=param.dtype,
                                                          device=param.device).clone()

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def __repr__(self) -> str:
        periods = [group["period"] for group in self.param_groups]
        return (f"MultiFrequency(periods={periods}, reduction={self.reduction!r}, "
                f"{self.optimizer!r})")
