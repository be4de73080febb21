"""Gradient clipping that doubles as the NaN/Inf check of the gradients.

A NaN or Inf in any gradient makes the total norm NaN or Inf, so one finite norm clears every
gradient at once. The step computes the norm (which clipping needs anyway), reads it back once
and only when it is not finite looks tensor by tensor for the one to name. Checking each
gradient up front instead costs five small kernels per gradient (``isfinite`` is four,
``all`` one) and a host read of its own every step: for the `bench` HOPE model 540 kernels and
two host reads for the check and the clip together, against 9 kernels and one read here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nestlearn.training.nonfinite import nonfinite_gradient

# Where a step stops when every gradient is finite but the sum of their squares overflows:
# clipping would scale the update to zero, so the run has diverged all the same.
NORM_OVERFLOW = "the gradient norm: every gradient is finite, the sum of their squares overflows"


@torch.no_grad()
def total_gradient_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all of ``grads`` together, as ``clip_grad_norm_`` computes it (a 0-dim
    tensor on the first gradient's device; 0 without gradients)."""
    if not grads:
        return torch.zeros(())
    total_norm: Callable[..., torch.Tensor] | None = getattr(torch.nn.utils, "get_total_norm",
                                                              None)
    if total_norm is not None:  # torch >= 2.6: grouped by device and dtype, foreach kernels
        return total_norm(grads, 2.0)
    device = grads[0].device
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g).to(device) for g in grads]))


@torch.no_grad()
def scale_to_norm(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients of ``params`` in place so their total norm ``norm`` is at most
    ``max_norm`` (the factor ``min(1, max_norm / (norm + 1e-6))`` of ``clip_grad_norm_``, kept
    on the device)."""
    if not params:
        return
    clip: Callable[..., None] | None = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
    if clip is not None:  # torch >= 2.6 (it takes the parameters, not their gradients)
        clip(params, max_norm, norm)
        return
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for grad in (p.grad for p in params if p.grad is not None):
        grad.mul_(factor.to(grad.device))


def clip_finite_gradients(model: torch.nn.Module, max_norm: float,
                          reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          find_bad: Callable[[], str | None] | None = None,
                          ) -> tuple[float, str | None]:
    """``(the total gradient norm before clipping, None)`` after clipping it to ``max_norm``
    (0 = no clipping), or ``(norm, where)`` naming the first gradient with a NaN or Inf
    (or ``NORM_OVERFLOW``) with no gradient changed. One host read when all is finite.

    For a sharded model (``nestlearn.training.sharded``): ``reduce`` turns the norm of the
    local shards into the plain global norm, ``find_bad`` names the bad gradient (default:
    ``nonfinite_gradient(model)``)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = total_gradient_norm([p.grad for p in params])
    if reduce is not None:
        norm = reduce(norm)
    value = float(norm)
    if not math.isfinite(value):
        where = find_bad() if find_bad is not None else nonfinite_gradient(model)
        return value, where or NORM_OVERFLOW
    if max_norm > 0:
        scale_to_norm(params, max_norm, norm)
    return value, None
