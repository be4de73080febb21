"""Deep momentum gradient descent, DMGD (docs/paper.md section 2).

The momentum is a small MLP memory m(.) trained online on the gradients, and the step is its
read-out at the current gradient: W_{i+1} = W_i - lr sigma(m_{i+1}(g_i)), with
m_{i+1} = a m_i - eta grad L(m_i; g_i). How we make this concrete for a weight matrix
(choices written down in optim/README.md):

- Keys and values are the rows of the gradient G [out, in]: row r has key k_r = g_r / ||g_r||
  (unit norm) and value g_r.
- The memory reads row r as  m(k_r) = b_r + s W2 phi(k_r),  phi(k) = act(W1 k) / ||act(W1 k)||
  (unit-norm features, so the read-out is bounded), with b a matrix of the parameter's shape,
  W1 [hidden, in], W2 [in, hidden], and s = ||G||_F / sqrt(out) the current gradient's row
  scale. The deep part stores gradients in these units (values g_r / s), which keeps inner_lr
  independent of the loss scale.
- Objective "dot" (the objective of plain momentum, <m, -g>): b <- a b + g exactly, and
  W2 <- a W2 - inner_lr grad, W1 <- W1 - inner_lr grad of
  L = -(1/out) sum_r <W2 phi(k_r), g_r / s>. The deep part then reads
  s_i inner_lr sum_j a^(i-j) (1/out) sum_r' (phi_i,r . phi_j,r') g_j,r' / s_j: past gradient
  rows recalled in proportion to how similar their keys are to the current ones, a learned
  kernel-weighted momentum on top of the classical one.
- Objective "l2" (the delta-rule objective of the paper's DMGD): each part regresses its values,
  b <- a b - inner_lr (b - g), and L = (1/(2 out)) sum_r ||W2 phi(k_r) - g_r / s||^2.
- The decay a applies to the value side (b, W2); the key features W1 learn without decay.
- W2 starts at zero; with ``inner_lr=0`` it stays there, and ``hidden=0`` drops the deep part:
  both give torch.optim.SGD(momentum=a) (objective "dot"). The step reads the memory after
  this gradient was written (m_{i+1}(g_i)), so the deep part acts from the first step.
- Non-linear output sigma: "identity" or "newton_schulz" (then W <- W - lr s NS(m(G)), with
  Muon's shape scale s: the paper's Muon reading of DMGD).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.nn import functional

from nestlearn.errors import check_choice, check_decay, check_int, check_nonnegative
from nestlearn.optim._base import (
    NestedOptimizer,
    as_matrix,
    decay_weights,
)
from nestlearn.optim.muon import newton_schulz, shape_scale

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": functional.gelu,
    "tanh": torch.tanh,
    "silu": functional.silu,
}
OBJECTIVES = ("dot", "l2")
OUTPUTS = ("identity", "newton_schulz")


def deep_read(w1: torch.Tensor, w2: torch.Tensor, keys: torch.Tensor,
              activation: str) -> torch.Tensor:
    """W2 phi(k_r) for every row of ``keys`` [out, in], phi = unit-norm act(W1 k)."""
    features = unit_rows(ACTIVATIONS[activation](keys @ w1.mT))
    return features @ w2.mT


def unit_rows(matrix: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Each row of ``matrix`` scaled to unit L2 norm (zero rows stay zero)."""
    return matrix / (matrix.norm(dim=-1, keepdim=True) + eps)


class DeepMomentum(NestedOptimizer):
    """DMGD: momentum as an MLP memory of gradient rows, trained online (module docstring).

    Args:
        params: parameters or param groups.
        lr: outer learning rate (>= 0).
        momentum: the decay ``a`` of the memory's value weights, in [0, 1).
        hidden: hidden width of the memory MLP (>= 0; 0 gives plain momentum).
        inner_lr: step size of the memory's own gradient descent (>= 0).
        objective: ``"dot"`` (default) or ``"l2"``.
        activation: ``"gelu"``, ``"tanh"`` or ``"silu"``.
        output: ``"identity"`` or ``"newton_schulz"`` (the non-linear output sigma).
        ns_steps: Newton-Schulz iterations for ``output="newton_schulz"``.
        seed: seeds the memories' random key features W1 (one generator per parameter).
        weight_decay: decoupled weight decay.
        fallback, fallback_lr, fallback_betas, fallback_eps: see ``NestedOptimizer``; by default
            parameters with fewer than 2 dims use AdamW.
    """

    matrix_rule = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.9,
                 hidden: int = 16, inner_lr: float = 0.5, objective: str = "dot",
                 activation: str = "gelu", output: str = "identity", ns_steps: int = 5,
                 seed: int = 0, weight_decay: float = 0.0, fallback: str = "auto",
                 fallback_lr: float = 1e-3, fallback_betas: tuple[float, float] = (0.9, 0.999),
                 fallback_eps: float = 1e-8) -> None:
        defaults = dict(lr=lr, momentum=momentum, hidden=hidden, inner_lr=inner_lr,
                        objective=objective, activation=activation, output=output,
                        ns_steps=ns_steps, seed=seed, weight_decay=weight_decay,
                        fallback=fallback, fallback_lr=fallback_lr,
                        fallback_betas=fallback_betas, fallback_eps=fallback_eps)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_decay("momentum", group["momentum"])
        check_int("hidden", group["hidden"], 0)
        check_nonnegative("inner_lr", group["inner_lr"])
        check_choice("objective", group["objective"], OBJECTIVES)
        check_choice("activation", group["activation"], ACTIVATIONS)
        check_choice("output", group["output"], OUTPUTS)
        check_int("ns_steps", group["ns_steps"], 1)
        check_int("seed", group["seed"], 0)

    def _init_state(self, param: torch.Tensor, state: dict[str, Any],
                    group: dict[str, Any]) -> None:
        cols = as_matrix(param).shape[1]
        hidden = group["hidden"]
        index = sum(1 for other in self.state.values() if "memory_bias" in other)
        generator = torch.Generator().manual_seed(group["seed"] * 1_000_003 + index)
        w1 = torch.randn(hidden, cols, generator=generator, dtype=torch.float64)
        state["memory_bias"] = torch.zeros_like(param)
        state["memory_w1"] = w1.to(dtype=param.dtype, device=param.device)
        state["memory_w2"] = torch.zeros(cols, hidden, dtype=param.dtype, device=param.device)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                group: dict[str, Any]) -> None:
        if "memory_bias" not in state:
            self._init_state(param, state, group)
        bias, w1, w2 = state["memory_bias"], state["memory_w1"], state["memory_w2"]
        decay, inner_lr = group["momentum"], group["inner_lr"]
        # The classical part b (exactly momentum for the dot objective).
        if group["objective"] == "dot":
            bias.mul_(decay).add_(grad)
        else:
            bias.mul_(decay).sub_(bias - grad, alpha=inner_lr)
        output = as_matrix(bias)
        if group["hidden"] > 0:
            matrix = as_matrix(grad)
            scale = matrix.norm() / matrix.shape[0] ** 0.5
            values = matrix / (scale + 1e-30)
            keys = unit_rows(matrix)
            grad_w1, grad_w2 = self._memory_gradients(w1, w2, keys, values, group)
            w1.sub_(grad_w1, alpha=inner_lr)
            w2.mul_(decay).sub_(grad_w2, alpha=inner_lr)
            output = output + scale * deep_read(w1, w2, keys, group["activation"])
        step_scale = 1.0
        if group["output"] == "newton_schulz":
            step_scale = shape_scale(*output.shape)
            output = newton_schulz(output, group["ns_steps"])
        decay_weights(param, group)
        param.add_(output.reshape(param.shape), alpha=-group["lr"] * step_scale)

    @staticmethod
    def _memory_gradients(w1: torch.Tensor, w2: torch.Tensor, keys: torch.Tensor,
                          values: torch.Tensor, group: dict[str, Any]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the deep part's objective w.r.t. W1 and W2 at the current state."""
        with torch.enable_grad():
            w1_leaf = w1.detach().requires_grad_(True)
            w2_leaf = w2.detach().requires_grad_(True)
            read = deep_read(w1_leaf, w2_leaf, keys, group["activation"])
            rows = values.shape[0]
            if group["objective"] == "dot":
                loss = -(read * values).sum() / rows
            else:
                loss = 0.5 * (read - values).pow(2).sum() / rows
            grad_w1, grad_w2 = torch.autograd.grad(loss, (w1_leaf, w2_leaf))
        return grad_w1, grad_w2
