"""Delta-rule momentum (docs/paper.md section 2): m_{i+1} = (a I - g_i^T g_i) m_i - eta P_i g_i.

Momentum trained with the L2 objective ||m g^T - P||^2 instead of the dot product: before a new
gradient is written, what the memory holds along that gradient's directions is partly erased.

For a weight matrix the gradient G is [out, in] and the momentum M has the same shape; the
projection acts on the key (input) side, as in DGD's W (I - x x^T):

    buf <- buf (a I - delta N) + P G,   N = G^T G / (||G||_F^2 + eps),   W <- W - lr buf.

Safe normalization: N is positive semi-definite with trace <= 1, so its eigenvalues lie in
[0, 1] whatever the gradient's scale, and (a I - delta N) has eigenvalues in [a - delta, a]:
with delta in [0, 1] the factor never grows the buffer, and with delta <= a it never flips its
sign. The raw g^T g of the paper has eigenvalues ||g||^2, which explodes or vanishes with the
loss scale. eps only guards the zero gradient (then N = 0 and the rule is plain momentum).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from nestlearn.errors import check_decay, check_positive, check_unit
from nestlearn.optim._base import (
    NestedOptimizer,
    as_matrix,
    decay_weights,
)
from nestlearn.optim.preconditioned import check_preconditioner, precondition


def erase_along_gradient(buffer: torch.Tensor, grad: torch.Tensor, momentum: float, delta: float,
                         eps: float) -> torch.Tensor:
    """``buffer (a I - delta G^T G / (||G||_F^2 + eps))`` on 2-D views, without forming big N.

    Multiplies in the cheaper order: (M G^T) G when G has fewer rows than columns, else
    M (G^T G).
    """
    matrix = as_matrix(buffer)
    keys = as_matrix(grad)
    scale = delta / (keys.pow(2).sum() + eps)
    if keys.shape[0] <= keys.shape[1]:
        projected = (matrix @ keys.mT) @ keys
    else:
        projected = matrix @ (keys.mT @ keys)
    return (momentum * matrix - scale * projected).reshape(buffer.shape)


class DeltaMomentum(NestedOptimizer):
    """Delta-rule momentum: ``buf <- buf (a I - delta N) + P g;  W <- W - lr buf``.

    ``N`` is the normalized key projection of the current gradient (module docstring). With
    ``delta=0`` and ``preconditioner="identity"`` it is ``torch.optim.SGD`` with momentum ``a``.

    Args:
        params: parameters or param groups.
        lr: learning rate (>= 0).
        momentum: the decay ``a`` in [0, 1).
        delta: strength of the erase term in [0, 1].
        preconditioner: ``"identity"`` (default), ``"diag"`` or ``"adagrad"`` (see
            ``PreconditionedMomentum``), giving the values P g.
        beta2, eps: second-moment rate and epsilon of the ``diag``/``adagrad`` preconditioner.
        delta_eps: guards the normalization ||G||_F^2 + delta_eps against a zero gradient.
        weight_decay: decoupled weight decay.
        fallback, fallback_lr, fallback_betas, fallback_eps: see ``NestedOptimizer``; by default
            parameters with fewer than 2 dims use AdamW.
    """

    matrix_rule = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.9,
                 delta: float = 0.5, preconditioner: str = "identity", beta2: float = 0.999,
                 eps: float = 1e-8, delta_eps: float = 1e-30, weight_decay: float = 0.0,
                 fallback: str = "auto", fallback_lr: float = 1e-3,
                 fallback_betas: tuple[float, float] = (0.9, 0.999), fallback_eps: float = 1e-8
                 ) -> None:
        defaults = dict(lr=lr, momentum=momentum, delta=delta, preconditioner=preconditioner,
                        beta2=beta2, eps=eps, delta_eps=delta_eps, weight_decay=weight_decay,
                        fallback=fallback, fallback_lr=fallback_lr,
                        fallback_betas=fallback_betas, fallback_eps=fallback_eps)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_decay("momentum", group["momentum"])
        check_unit("delta", group["delta"])
        check_positive("delta_eps", group["delta_eps"])
        check_preconditioner(group)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                group: dict[str, Any]) -> None:
        value = precondition(grad, state, group)
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer = state["momentum_buffer"]
        if group["delta"]:
            buffer.copy_(erase_along_gradient(buffer, grad, group["momentum"], group["delta"],
                                              group["delta_eps"]))
        else:
            buffer.mul_(group["momentum"])
        buffer.add_(value)
        decay_weights(param, group)
        param.add_(buffer, alpha=-group["lr"])
