"""M3, Multi-scale Momentum Muon (docs/paper.md section 2; Nested Learning arXiv Alg. 1).

The Continuum Memory System applied to the optimizer: a fast momentum level written every step
and a slow one written every ``frequency`` steps from the gradients gathered since its last
write, both orthogonalized, the sum normalized element-wise by a second moment:

    every step:        M1 <- beta1 M1 + g;   V <- beta2 V + (1 - beta2) g^2;   O1 = NS(M1)
                       W  <- W - lr (O1 + alpha O2) / (sqrt(V_hat) + eps)
    every f-th step:   M2 <- beta3 M2 + (sum of the last f gradients);  O2 = NS(M2)

Choices where the algorithm box is terse (written down in optim/README.md): the box writes the
memories as running sums "M += beta g"; we read them as decaying memories (beta multiplies the
old content), as in every momentum, so that they forget. Newton-Schulz ignores the overall
scale, so only the decay matters for M1 and M2. V is bias-corrected (V_hat) as in Adam. The
slow level is written after the step that completes a block, so block k uses the gradients of
blocks < k, as in the box; before the first write O2 = 0.

Where the division by sqrt(V) happens (``normalize``):
- ``"after"`` (the box, literally): W <- W - lr (O1 + alpha O2) / (sqrt(V_hat) + eps). The
  orthogonalized O has no units, so the step scales like 1 / |g|: large where gradients are
  small. Kept for fidelity; it needs a small lr and does not settle at a minimum.
- ``"before"`` (default): O_l = NS(M_l / (sqrt(V_hat) + eps)), W <- W - lr (O1 + alpha O2):
  the same second-moment normalization applied to the momenta before orthogonalizing, so the
  step keeps Muon's scale whatever the gradient's.
- ``"none"``: no second moment (with alpha = 0 this is Muon without Nesterov).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from nestlearn.errors import (
    check_choice,
    check_decay,
    check_int,
    check_nonnegative,
    check_positive,
)
from nestlearn.optim._base import (
    NestedOptimizer,
    as_matrix,
    decay_weights,
)
from nestlearn.optim.muon import NS_COEFFICIENTS, newton_schulz

NORMALIZATIONS = ("before", "after", "none")


class M3(NestedOptimizer):
    """Multi-scale momentum Muon with second-moment normalization (module docstring).

    With ``alpha=0`` the slow level is off and this is its single-level form; with also
    ``normalize="none"`` it is ``Muon(nesterov=False, scale_by_shape=False)``.

    Args:
        params: parameters or param groups.
        lr: learning rate (>= 0).
        beta1: decay of the fast momentum M1, in [0, 1).
        beta2: rate of the second moment V, in [0, 1).
        beta3: decay of the slow momentum M2, in [0, 1).
        alpha: weight of the slow level's output (>= 0; 0 turns it off).
        frequency: the slow level is written every ``frequency`` steps (>= 1).
        ns_steps, ns_coefficients: Newton-Schulz settings (see ``newton_schulz``).
        eps: added to sqrt(V_hat).
        normalize: ``"before"`` (default), ``"after"`` (the paper's box literally) or ``"none"``:
            where the second-moment division happens (module docstring).
        weight_decay: decoupled weight decay.
        fallback, fallback_lr, fallback_betas, fallback_eps: see ``NestedOptimizer``.
    """

    matrix_rule = True

    def __init__(self, params: Iterable[Any], lr: float = 0.02, beta1: float = 0.9,
                 beta2: float = 0.999, beta3: float = 0.9, alpha: float = 1.0,
                 frequency: int = 10, ns_steps: int = 5, ns_coefficients: str = "quintic",
                 eps: float = 1e-8, normalize: str = "before", weight_decay: float = 0.0,
                 fallback: str = "auto", fallback_lr: float = 1e-3,
                 fallback_betas: tuple[float, float] = (0.9, 0.999), fallback_eps: float = 1e-8
                 ) -> None:
        defaults = dict(lr=lr, beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha,
                        frequency=frequency, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
                        eps=eps, normalize=normalize, weight_decay=weight_decay,
                        fallback=fallback, fallback_lr=fallback_lr,
                        fallback_betas=fallback_betas, fallback_eps=fallback_eps)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        for name in ("beta1", "beta2", "beta3"):
            check_decay(name, group[name])
        check_nonnegative("alpha", group["alpha"])
        check_int("frequency", group["frequency"], 1)
        check_int("ns_steps", group["ns_steps"], 1)
        check_choice("ns_coefficients", group["ns_coefficients"], NS_COEFFICIENTS)
        check_positive("eps", group["eps"])
        check_choice("normalize", group["normalize"], NORMALIZATIONS)

    def _orthogonalize(self, memory: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        matrix = as_matrix(memory)
        return newton_schulz(matrix, group["ns_steps"], group["ns_coefficients"]).reshape(
            memory.shape)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any],
                group: dict[str, Any]) -> None:
        normalize = group["normalize"]
        if "step" not in state:
            state["step"] = 0
            state["fast_momentum"] = torch.zeros_like(param)
            if normalize != "none":
                state["second_moment"] = torch.zeros_like(param)
        state["step"] += 1
        fast = state["fast_momentum"]
        fast.mul_(group["beta1"]).add_(grad)
        denom = self._second_moment_denominator(grad, state, group)
        update = self._orthogonalize(fast / denom if normalize == "before" else fast, group)
        if group["alpha"] > 0 and "slow_output" in state:
            update = update.add(state["slow_output"], alpha=group["alpha"])
        if normalize == "after":
            update = update / denom
        decay_weights(param, group)
        param.add_(update, alpha=-group["lr"])
        if group["alpha"] > 0:
            self._write_slow_level(grad, denom, state, group)

    @staticmethod
    def _second_moment_denominator(grad: torch.Tensor, state: dict[str, Any],
                                   group: dict[str, Any]) -> torch.Tensor | None:
        """sqrt(V_hat) + eps after writing g^2 into V (None when normalize is "none")."""
        if group["normalize"] == "none":
            return None
        beta2 = group["beta2"]
        second = state["second_moment"]
        second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        return (second / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])

    def _write_slow_level(self, grad: torch.Tensor, denom: torch.Tensor | None,
                          state: dict[str, Any], group: dict[str, Any]) -> None:
        """Gather g; at the end of each block of ``frequency`` steps, write M2 and refresh O2."""
        if "gradient_sum" not in state:
            state["gradient_sum"] = torch.zeros_like(grad)
            state["slow_momentum"] = torch.zeros_like(grad)
        state["gradient_sum"].add_(grad)
        if state["step"] % group["frequency"] == 0:
            slow = state["slow_momentum"]
            slow.mul_(group["beta3"]).add_(state["gradient_sum"])
            state["gradient_sum"].zero_()
            source = slow / denom if group["normalize"] == "before" else slow
            state["slow_output"] = self._orthogonalize(source, group)
