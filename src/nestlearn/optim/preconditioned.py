"""Preconditioned momentum (docs/paper.md section 2): m_{i+1} = a m_i - eta P_i g_i.

Momentum as an associative memory whose values are the preconditioned gradients P_i g_i (the
objective <m g^T, P>). The buffer is kept unscaled, as torch's SGD does: buf <- a buf + P g,
W <- W - lr buf, so the paper's m equals -lr * buf while lr is constant and an lr schedule
scales the whole step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from nestlearn.errors import check_choice, check_decay, check_positive
from nestlearn.optim._base import NestedOptimizer, decay_weights

PRECONDITIONERS = ("identity", "diag", "adagrad")


def check_preconditioner(group: dict[str, Any]) -> None:
    """The preconditioner options of a parameter group: its kind, beta2 and eps."""
    check_choice("preconditioner", group["preconditioner"], PRECONDITIONERS)
    check_decay("beta2", group["beta2"])
    check_positive("eps", group["eps"])


def precondition(grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
    """P_i g_i for the group's preconditioner; updates the second-moment state it keeps.

    - ``identity``: P = I.
    - ``diag``: P = diag(1 / (sqrt(v_hat) + eps)), v an exponential average of g^2 with rate
      ``beta2``, bias-corrected as in Adam (the element-wise L2 memory of gradients).
    - ``adagrad``: the same with v the running sum of g^2 (no forgetting).
    """
    kind = group["preconditioner"]
    if kind == "identity":
        return grad
    if "precond_step" not in state:
        state["precond_step"] = 0
        state["second_moment"] = torch.zeros_like(grad)
    state["precond_step"] += 1
    second = state["second_moment"]
    if kind == "adagrad":
        second.addcmul_(grad, grad)
        return grad / second.sqrt().add_(group["eps"])
    beta2 = group["beta2"]
    second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    corrected = second / (1 - beta2 ** state["precond_step"])
    return grad / corrected.sqrt_().add_(group["eps"])


class PreconditionedMomentum(NestedOptimizer):
    """Momentum over preconditioned gradients: ``buf <- a buf + P g;  W <- W - lr buf``.

    Element-wise, so it applies to parameters of any shape: the default ``fallback="none"``
    uses the rule everywhere. With ``preconditioner="identity"`` it is ``torch.optim.SGD``
    with momentum ``a``; with ``"diag"`` and ``momentum=0`` it is Adam with ``beta1=0``.

    Args:
        params: parameters or param groups.
        lr: learning rate (>= 0).
        momentum: the decay ``a`` in [0, 1).
        preconditioner: ``"identity"``, ``"diag"`` (default) or ``"adagrad"``.
        beta2: rate of the ``diag`` second-moment average, in [0, 1).
        eps: added to sqrt(v) before dividing.
        weight_decay: decoupled weight decay.
        fallback, fallback_lr, fallback_betas, fallback_eps: see ``NestedOptimizer``.
    """

    matrix_rule = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.9,
                 preconditioner: str = "diag", beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0, fallback: str = "none", fallback_lr: float = 1e-3,
                 fallback_betas: tuple[float, float] = (0.9, 0.999), fallback_eps: float = 1e-8
                 ) -> None:
        defaults = dict(lr=lr, momentum=momentum, preconditioner=preconditioner, beta2=beta2,
                        eps=eps, weight_decay=weight_decay, fallback=fallback,
                        fallback_lr=fallback_lr, fallback_betas=fallback_betas,
                        fallback_eps=fallback_eps)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_decay("momentum", group["momentum"])
        check_preconditioner(group)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                group: dict[str, Any]) -> None:
        value = precondition(grad, state, group)
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer = state["momentum_buffer"]
        buffer.mul_(group["momentum"]).add_(value)
        decay_weights(param, group)
        param.add_(buffer, alpha=-group["lr"])
