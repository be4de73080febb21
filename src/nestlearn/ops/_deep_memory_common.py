"""What the deep-memory forms share: the state, the memory MLP, activations, argument checks.

The memory of one head is a residual MLP (docs/paper.md section 4, "Memory M is an MLP ...
(residual)"):  M(x) = x + W_L s(W_{L-1} ... s(W_1 x)),  weights[0] = W_1 ([hidden, D]) and
weights[-1] = W_L ([D, hidden]). Both the naive and the chunkwise form import from here, so a
check or an activation is written once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nestlearn.errors import check_choice, check_int, invalid
from nestlearn.ops._validate import check_chunk_size, check_gate, check_qkv, check_same_kind
from nestlearn.state import TreeState, state_dataclass

OBJECTIVES = ("l2", "dot")


@state_dataclass
class DeepMemoryState(TreeState):
    """Weights (and momentum) of the memory MLP per batch element and head.

    ``weights[l]`` is ``[B, H, out, in]`` (or ``[H, out, in]``, shared by the batch: how a layer
    passes meta-learned initial weights so that gradients reach them). ``momentum`` has the
    same shapes, or is ``None`` when the rule runs without momentum.
    """

    weights: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...] | None = None


def _unit_gradient(z: torch.Tensor) -> torch.Tensor:
    """Ones shaped like ``z``, so an activation's backward kernel with this gradient returns the
    activation's slope itself. Written out in full: with a broadcast scalar (stride 0) the
    kernel takes its strided loop: 1.2-1.8x slower than both kernels here at the sizes
    measured (608 to 1.2M elements; BENCHMARKS.md, "Decoding's fixed cost")."""
    return torch.ones_like(z)


def _gelu_slope(z: torch.Tensor) -> torch.Tensor:
    # d/dz [z Phi(z)] = Phi(z) + z phi(z), the exact (erf) GELU that F.gelu computes by default,
    # as the kernel autograd runs for F.gelu's backward, given ones (two kernels; the closed
    # form is ten)
    return torch.ops.aten.gelu_backward(_unit_gradient(z), z)


def _gelu_curvature(z: torch.Tensor) -> torch.Tensor:
    # phi(z) (2 - z^2), phi the standard normal density
    square = z * z
    return torch.exp(-0.5 * square) * (2.0 - square) * (1.0 / math.sqrt(2.0 * math.pi))


def _silu_slope(z: torch.Tensor) -> torch.Tensor:
    # sigma(z) (1 + z (1 - sigma(z))), as the kernel of F.silu's backward, given ones
    return torch.ops.aten.silu_backward(_unit_gradient(z), z)


def _silu_curvature(z: torch.Tensor) -> torch.Tensor:
    sig = torch.sigmoid(z)
    return sig * (1.0 - sig) * (2.0 + z * (1.0 - 2.0 * sig))


def _relu_slope(z: torch.Tensor) -> torch.Tensor:
    return (z > 0).to(z.dtype)


def _relu_curvature(z: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(z)


def _tanh_slope(z: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.tanh(z) ** 2


def _tanh_curvature(z: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(z)
    return -2.0 * t * (1.0 - t * t)


# name -> (activation s, its slope s', its curvature s''), derivatives written out: the chunkwise
# form's hand-written backward uses s', and the outer loss differentiates s' through s''.
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = {
    "gelu": (F.gelu, _gelu_slope, _gelu_curvature),
    "silu": (F.silu, _silu_slope, _silu_curvature),
    "relu": (F.relu, _relu_slope, _relu_curvature),
    "tanh": (torch.tanh, _tanh_slope, _tanh_curvature),
}


class _Slope(torch.autograd.Function):
    """s'(z) that saves only z for the backward (grad * s''(z)), instead of every intermediate
    of the closed form: less activation memory in the chunkwise form, same values."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, activation: str) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.activation = activation
        return ACTIVATIONS[activation][1](z)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (z,) = ctx.saved_tensors
        return grad * ACTIVATIONS[ctx.activation][2](z), None


def activation_slope(z: torch.Tensor, activation: str) -> torch.Tensor:
    """s'(z), differentiable (once more through s'')."""
    return _Slope.apply(z, activation)


def check_activation(activation: str) -> None:
    check_choice("activation", activation, ACTIVATIONS)


def check_objective(objective: str) -> None:
    check_choice("objective", objective, OBJECTIVES)


def apply_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rows ``W x_t`` (``x @ W^T``), computed as ``(W @ x^T)^T``: the same product, but the
    weight's gradient then comes out in the weight's own memory layout, so summing it with its
    other gradients (and the state step's weight-sized products) streams instead of transposing.
    """
    return (weight @ x.transpose(-1, -2)).transpose(-1, -2)


def add_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``total + a @ b`` (``[..., M, K] x [..., K, N]``) as one fused kernel (``baddbmm``)
    where the three share their leading dims, else as a product and a sum. Unrecorded use
    only (the written nodes' forwards and backwards)."""
    lead = total.shape[:-2]
    if a.shape[:-2] != lead or b.shape[:-2] != lead:
        return total + a @ b
    flat = torch.baddbmm(total.reshape(-1, *total.shape[-2:]), a.reshape(-1, *a.shape[-2:]),
                         b.reshape(-1, *b.shape[-2:]))
    return flat.view(total.shape)


def accumulate(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """``total + part``, or ``part`` when nothing was summed yet (a written backward's sums)."""
    return part if total is None else total + part


def sum_to_shape(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` summed over the dims that ``like`` broadcasts (a shared initial state)."""
    return grad if grad.shape == like.shape else grad.sum_to_size(like.shape)


def mlp_forward(weights: tuple[torch.Tensor, ...], x: torch.Tensor,
                activation: str) -> torch.Tensor:
    """M(x) for ``x`` ``[..., N, D]`` and weights ``[..., out, in]`` (leading dims broadcast)."""
    act = ACTIVATIONS[activation][0]
    hidden = x
    for index, weight in enumerate(weights):
        pre = hidden @ weight.transpose(-1, -2)
        hidden = act(pre) if index < len(weights) - 1 else pre
    return x + hidden


def check_weights(name: str, tensors: object, heads: int, dim: int, batch: int,
                  reference: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A chain of >= 2 matrices ``[B?, H, out, in]``: D -> hidden ... -> D, q's dtype and device."""
    if not isinstance(tensors, (tuple, list)) or len(tensors) < 2:
        got = type(tensors).__name__ if not isinstance(tensors, (tuple, list)) else len(tensors)
        raise invalid(name, got, "a tuple of >= 2 weight tensors (W_1 ... W_L)")
    expected_in = dim
    for index, tensor in enumerate(tensors):
        item = f"{name}[{index}]"
        if not isinstance(tensor, torch.Tensor):
            raise invalid(item, type(tensor).__name__, "a torch.Tensor [B, H, out, in]")
        shape = tuple(tensor.shape)
        last = index == len(tensors) - 1
        out_dim = dim if last or tensor.dim() < 2 else shape[-2]
        out_text = str(out_dim) if last else "hidden"
        allowed = f"[{batch}, {heads}, {out_text}, {expected_in}] or [{heads}, {out_text}, " \
                  f"{expected_in}]"
        if tensor.dim() not in (3, 4) or shape[-3:] != (heads, out_dim, expected_in) \
                or (tensor.dim() == 4 and shape[0] != batch):
            raise invalid(f"{item}.shape", shape, allowed)
        check_same_kind(reference, {item: tensor})
        expected_in = out_dim
    return tuple(tensors)


def check_deep_memory_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           alpha: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor | None,
                           initial_state: DeepMemoryState | None, objective: str,
                           activation: str, chunk_size: int | None,
                           state_name: str = "initial_state", check_values: bool = True) -> None:
    """Every check of the deep-memory contract; raises NestlearnError naming the argument.
    The gates' values are read (a device sync) only if ``check_values`` or under
    ``nestlearn.debug_checks``."""
    batch, _, heads, dk, dv = check_qkv(q, k, v)
    if dk != dv:
        raise invalid("v.shape", tuple(v.shape), f"the last dim of k ({dk}): the memory is "
                      "residual, M(x) = x + MLP(x), so keys and values share one dim")
    check_gate("alpha", alpha, q, 0.0, 1.0, check_values)
    check_gate("eta", eta, q, 0.0, None, check_values)
    if theta is not None:
        check_gate("theta", theta, q, 0.0, 1.0, check_values)
    check_objective(objective)
    check_activation(activation)
    if chunk_size is not None:
        check_chunk_size(chunk_size)
    if not isinstance(initial_state, DeepMemoryState):
        raise invalid(state_name, type(initial_state).__name__,
                      "a DeepMemoryState (the memory weights define depth and hidden width)")
    weights = check_weights(f"{state_name}.weights", initial_state.weights, heads, dk, batch, q)
    momentum = initial_state.momentum
    if momentum is None:
        return
    if theta is None:
        raise invalid(f"{state_name}.momentum", "tensors while theta is None",
                      "None when theta is None (no momentum)")
    check_weights(f"{state_name}.momentum", momentum, heads, dk, batch, q)
    if len(momentum) != len(weights):
        raise invalid(f"{state_name}.momentum", f"{len(momentum)} tensors",
                      f"one per weight ({len(weights)})")
    for index, (m, w) in enumerate(zip(momentum, weights, strict=True)):
        if m.shape[-2:] != w.shape[-2:]:
            raise invalid(f"{state_name}.momentum[{index}].shape", tuple(m.shape),
                          f"the shape of {state_name}.weights[{index}] {tuple(w.shape)}")


def batched_state(state: DeepMemoryState, batch: int,
                  with_momentum: bool) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Weights and momentum as ``[B, H, out, in]`` (broadcast if given without the batch dim);
    zero momentum when the rule has momentum and the state has none."""
    # contiguous copies: a stride-0 batch dim would be copied by every matmul that reads it
    weights = [w if w.dim() == 4 else w.expand(batch, *w.shape).contiguous()
               for w in state.weights]
    if not with_momentum:
        return weights, None
    if state.momentum is None:
        return weights, [torch.zeros_like(w) for w in weights]
    momentum = [m if m.dim() == 4 else m.expand(batch, *m.shape).contiguous()
                for m in state.momentum]
    return weights, momentum


def init_deep_memory_weights(heads: int, dim: int, hidden: int, depth: int = 2,
                             generator: torch.Generator | None = None,
                             dtype: torch.dtype = torch.float32,
                             device: torch.device | str | None = None,
                             ) -> tuple[torch.Tensor, ...]:
    """Initial weights ``[H, out, in]`` for a memory of ``depth`` matrices (>= 2).

    Hidden layers get N(0, 1/fan_in) (unit-scale pre-activations for unit-scale inputs); the
    output matrix W_L gets a 10x smaller scale, so the residual memory starts close to the
    identity while gradients still reach every layer (a zero W_L would block them).
    """
    for name, value, low in (("heads", heads, 1), ("dim", dim, 1), ("hidden", hidden, 1),
                             ("depth", depth, 2)):
        check_int(name, value, low)
    sizes = [dim] + [hidden] * (depth - 1) + [dim]
    weights = []
    for index in range(depth):
        fan_in, fan_out = sizes[index], sizes[index + 1]
        scale = 1.0 / math.sqrt(fan_in) * (0.1 if index == depth - 1 else 1.0)
        weight = torch.randn(heads, fan_out, fan_in, generator=generator, dtype=dtype,
                             device=generator.device if generator is not None else device)
        weights.append((weight * scale).to(device=device))
    return tuple(weights)
