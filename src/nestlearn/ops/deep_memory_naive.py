"""Deep (MLP) memory, naive reference: one token at a time, every weight materialized.

This is the slow definition the chunkwise form in ``deep_memory.py`` is tested against. Per
token t (docs/paper.md sections 4 and 5), with t' the start of t's chunk:
    G_t = grad_W l(M_{W_{t'}}; k_t, v_t)          (gradients at the chunk's starting weights)
    S_t = theta_t S_{t-1} - eta_t G_t              (momentum; theta=None means S_t = -eta_t G_t)
    W_t = alpha_t W_{t-1} + S_t                    (every matrix but, with dgd, W_1)
    W_{1,t} = W_{1,t-1}(alpha_t I - eta_t k_t k_t^T) + S_{1,t}   (dgd=True: delta gradient descent)
    o_t = M_{W_t}(q_t)
The gradient is taken with ``torch.func.grad`` (autograd), not with the hand-written backward
of the chunkwise form, so the two share no derivative code.
"""

from __future__ import annotations

import torch

from nestlearn.ops._deep_memory_common import (
    DeepMemoryState,
    batched_state,
    check_deep_memory_args,
    mlp_forward,
)
from nestlearn.ops._precision import full_precision


def _inner_loss(weights: tuple[torch.Tensor, ...], key: torch.Tensor, value: torch.Tensor,
                objective: str, activation: str) -> torch.Tensor:
    """Sum over batch and heads of l(M; k, v); heads are independent, so its gradient wrt the
    batched weights is every head's own gradient."""
    out = mlp_forward(weights, key, activation)
    if objective == "l2":
        return 0.5 * ((out - value) ** 2).sum()
    return -(out * value).sum()


@full_precision
def deep_memory_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                      eta: torch.Tensor, theta: torch.Tensor | None = None, *,
                      initial_state: DeepMemoryState | None = None, objective: str = "l2",
                      activation: str = "gelu", dgd: bool = False,
                      output_final_state: bool = False, chunk_size: int = 64,
                      check_values: bool = True) -> tuple[torch.Tensor, DeepMemoryState | None]:
    """Token-by-token deep memory; same contract as :func:`nestlearn.ops.deep_memory`."""
    check_deep_memory_args(q, k, v, alpha, eta, theta, initial_state, objective, activation,
                           chunk_size, check_values=check_values)
    batch, length = q.shape[:2]
    weights, momentum = batched_state(initial_state, batch, theta is not None)
    grad_fn = torch.func.grad(_inner_loss)
    outputs = []
    for t in range(length):
        if t % chunk_size == 0:
            chunk_start = tuple(weights)
        key = k[:, t, :, None, :]  # [B, H, 1, D]
        grads = grad_fn(chunk_start, key, v[:, t, :, None, :], objective, activation)
        a_t = alpha[:, t, :, None, None]
        e_t = eta[:, t, :, None, None]
        new_weights = []
        for index, (weight, grad) in enumerate(zip(weights, grads, strict=True)):
            if momentum is not None:
                momentum[index] = theta[:, t, :, None, None] * momentum[index] - e_t * grad
                step = momentum[index]
            else:
                step = -e_t * grad
            if dgd and index == 0:
                # W (alpha I - eta k k^T) = alpha W - eta (W k) k^T
                wk = weight @ key.transpose(-1, -2)
                decayed = a_t * weight - e_t * (wk @ key)
            else:
                decayed = a_t * weight
            new_weights.append(decayed + step)
        weights = new_weights
        outputs.append(mlp_forward(tuple(weights), q[:, t, :, None, :], activation))
    out = torch.cat(outputs, dim=2).transpose(1, 2)
    if not output_final_state:
        return out, None
    final = DeepMemoryState(tuple(weights), tuple(momentum) if momentum is not None else None)
    return out, final
