"""What every nestlearn optimizer shares: argument checks, the step loop, the AdamW fallback.

Rules built on matrix structure (Muon's orthogonalization, the delta term's key projection, a
memory over gradient rows) have no meaning for a bias or a norm's scale. Such parameters get a
plain AdamW step instead (the fallback), with its own learning rate ``fallback_lr``; see
``optim/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from nestlearn.errors import (
    check_choice,
    check_decay,
    check_nonnegative,
    check_positive,
    invalid,
)

FALLBACK_CHOICES = ("auto", "adamw", "none")

# Group options every nestlearn optimizer accepts, with their defaults.
COMMON_DEFAULTS: dict[str, Any] = {
    "weight_decay": 0.0,
    "fallback": "auto",
    "fallback_lr": 1e-3,
    "fallback_betas": (0.9, 0.999),
    "fallback_eps": 1e-8,
}


def check_betas(name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise invalid(name, repr(value), "a pair (beta1, beta2) of numbers in [0, 1)")
    return check_decay(f"{name}[0]", value[0]), check_decay(f"{name}[1]", value[1])


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D view: matrices as they are, conv kernels as [out, rest], vectors as one row."""
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() > 2:
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.reshape(1, -1)


def adamw_step(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
               group: dict[str, Any]) -> None:
    """One AdamW step (decoupled weight decay, bias-corrected moments): the fallback rule."""
    lr = group["fallback_lr"]
    beta1, beta2 = group["fallback_betas"]
    if "fallback_step" not in state:
        state["fallback_step"] = 0
        state["fallback_exp_avg"] = torch.zeros_like(param)
        state["fallback_exp_avg_sq"] = torch.zeros_like(param)
    state["fallback_step"] += 1
    step = state["fallback_step"]
    exp_avg, exp_avg_sq = state["fallback_exp_avg"], state["fallback_exp_avg_sq"]
    param.mul_(1 - lr * group["weight_decay"])
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["fallback_eps"])
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


class NestedOptimizer(Optimizer):
    """Base class: validates every param group (also ones added later) and runs the step loop.

    Subclasses set ``matrix_rule`` (whether their rule needs matrix structure), implement
    ``_check_group(group)`` for their own hyperparameters and ``_update(param, grad, state,
    group)`` for one parameter's step.

    The group option ``fallback`` chooses who updates a parameter: ``"auto"`` (parameters with
    fewer than 2 dims use AdamW when the rule needs matrices), ``"adamw"`` (every parameter of
    the group uses AdamW: put embeddings and output heads in such a group), ``"none"`` (the rule
    itself everywhere; vectors are treated as one-row matrices).
    """

    matrix_rule: ClassVar[bool] = True

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        if isinstance(params, torch.Tensor):
            params = [params]
        params = list(params)
        if not params:
            raise invalid("params", "an empty list", "at least one tensor to optimize")
        super().__init__(params, {**COMMON_DEFAULTS, **defaults})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise invalid("param_group", type(param_group).__name__, "a dict with 'params'")
        params = param_group.get("params")
        if params is None:
            raise invalid("param_group['params']", "nothing", "tensors to optimize")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for index, entry in enumerate(params):
            tensor = entry[1] if isinstance(entry, tuple) and len(entry) == 2 else entry
            if not isinstance(tensor, torch.Tensor):
                raise invalid(f"params[{index}]", type(tensor).__name__, "a torch.Tensor")
            if not tensor.is_leaf:
                raise invalid(f"params[{index}]", "a non-leaf tensor (the result of an op)",
                              "leaf tensors such as model.parameters(); use "
                              "tensor.detach().requires_grad_() for a computed tensor")
            if not tensor.is_floating_point():
                raise invalid(f"params[{index}].dtype", tensor.dtype, "a floating dtype")
        group = {**self.defaults, **param_group, "params": params}
        self._check_common(group)
        self._check_group(group)
        super().add_param_group(group)

    @staticmethod
    def _check_common(group: dict[str, Any]) -> None:
        check_nonnegative("lr", group["lr"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_choice("fallback", group["fallback"], FALLBACK_CHOICES)
        check_nonnegative("fallback_lr", group["fallback_lr"])
        check_betas("fallback_betas", group["fallback_betas"])
        check_positive("fallback_eps", group["fallback_eps"])

    def _check_group(self, group: dict[str, Any]) -> None:
        """Check this optimizer's own hyperparameters (subclasses)."""

    def uses_fallback(self, group: dict[str, Any], param: torch.Tensor) -> bool:
        """Whether ``param`` of ``group`` is updated by the AdamW fallback."""
        if group["fallback"] == "adamw":
            return True
        if group["fallback"] == "none":
            return False
        return self.matrix_rule and param.dim() < 2

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                group: dict[str, Any]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise invalid("param.grad", "a sparse gradient", "dense gradients")
                state = self.state[param]
                if self.uses_fallback(group, param):
                    adamw_step(param, param.grad, state, group)
                else:
                    self._update(param, param.grad, state, group)
        return loss


def decay_weights(param: torch.Tensor, group: dict[str, Any]) -> None:
    """Decoupled weight decay (as in AdamW): shrink before the update, scaled by the lr."""
    if group["weight_decay"]:
        param.mul_(1 - group["lr"] * group["weight_decay"])
