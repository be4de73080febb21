"""Deep (MLP) memory, chunkwise "dual form": exact, and no per-token weights.

Semantics (the naive reference ``deep_memory_naive.py`` spells them out token by token): per
head a residual MLP memory M(x) = x + W_L s(... s(W_1 x)) is trained in context on
l(M; k, v) = 1/2 ||M(k) - v||^2 (or -<M(k), v>) with momentum, weight decay and, optionally,
delta gradient descent on W_1; gradients of a chunk's tokens are all taken at the chunk's
starting weights W_{t'} (docs/paper.md section 4, "chunkwise-parallel training").

Why no weight is materialized (derivation in ``ops/README.md``, "Deep MLP memory"): at W_{t'}
the gradient of token i for layer W is a rank-1 outer product e_i a_i^T (the error at the
layer's output times its input), so inside a chunk
    W_t = A_t W_{t'} + s_t S_{t'} - sum_{i<=t} c_{t,i} e_i a_i^T
with scalar coefficients from the gates, and a layer's pre-activation at token t is
    W_t x = A_t W_{t'} x + s_t S_{t'} x - sum_{i<=t} c_{t,i} (a_i . x) e_i,
a causal C x C masked matmul, as in attention. With dgd=True the decay of W_1 becomes the
matrix (alpha_t I - eta_t k_t k_t^T): a gated delta rule whose pseudo-values come from one
unit-lower-triangular solve per chunk (the WY / UT transform of DeltaNet, as an explicit
inverse times the right-hand side: ``ops/_unit_triangular.py``). The query rows' read-out is
one autograd node with a written backward (``ops/_chunk_read.py``), and so is the key pass
(``ops/_key_pass.py``).
"""

from __future__ import annotations

import torch

from nestlearn.errors import invalid
from nestlearn.ops._chunk_coefficients import ChunkCoefficients, chunk_coefficients
from nestlearn.ops._chunk_read import chunk_read
from nestlearn.ops._chunking import num_chunks
from nestlearn.ops._compile import compiled_step
from nestlearn.ops._deep_memory_common import (
    DeepMemoryState,
    apply_weight,
    batched_state,
    check_activation,
    check_deep_memory_args,
    check_weights,
    init_deep_memory_weights,
    mlp_forward,
)
from nestlearn.ops._key_pass import key_pass, key_pass_reference
from nestlearn.ops._precision import full_precision
from nestlearn.ops._unit_triangular import unit_lower_solve
from nestlearn.ops.deep_memory_naive import deep_memory_naive

__all__ = [
    "DeepMemoryState",
    "deep_memory",
    "deep_memory_apply",
    "deep_memory_chunk_step",
    "deep_memory_naive",
    "deep_memory_token_step",
    "deep_memory_update",
    "init_deep_memory_weights",
]


def _delta_pseudo_values(momentum: list[torch.Tensor] | None, keys: torch.Tensor,
                         first_pre: torch.Tensor, first_error: torch.Tensor,
                         coeffs: ChunkCoefficients) -> torch.Tensor:
    """w_i = W_{1,i-1} k_i for every token of the chunk, by one triangular solve (UT transform).

    With dgd,
      W_{1,t} = A_t W_{t'} + s_t S_{t'} - sum_{i<=t} [c_{t,i} e_i + (A_t/A_i) eta_i w_i] k_i^T,
    so w_i = W_{1,i-1} k_i satisfies the unit-lower-triangular system
      w_i + sum_{m<i} (A_{i-1}/A_m) eta_m (k_m . k_i) w_m
          = A_{i-1} W_{t'} k_i + s_{i-1} S_{t'} k_i - sum_{m<i} c_{i-1,m} (k_m . k_i) e_m.
    """
    gram = keys @ keys.transpose(-1, -2)
    rhs = coeffs.prev_scale[..., None] * first_pre - (coeffs.prev_coef * gram) @ first_error
    if momentum is not None:
        rhs = rhs + coeffs.prev_carry[..., None] * apply_weight(keys, momentum[0])
    system = coeffs.prev_eta_decay * gram
    return unit_lower_solve(system, rhs)


def _chunk(weights: list[torch.Tensor], momentum: list[torch.Tensor] | None,
           queries: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
           alpha: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor | None, objective: str,
           activation: str, dgd: bool, need_state: bool,
           coeffs: ChunkCoefficients | None = None, read_heads: int | None = None,
           ) -> tuple[torch.Tensor | None, list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """One chunk: outputs M_t(q_t) for its tokens and (if asked) the chunk-end state.

    Token tensors ``[B, H, C, D]``, gates ``[B, H, C]``, weights ``[B, H, out, in]``;
    ``coeffs``: the chunk's gate coefficients if computed already (else from the gates);
    ``read_heads``: queries (and outputs) only for that many last heads (None: every head).
    """
    inputs, errors, first_pre = key_pass(weights, keys, values, objective, activation)
    if coeffs is None:
        coeffs = chunk_coefficients(alpha, eta, theta, previous=dgd)
    pseudo = None
    if dgd:
        pseudo = _delta_pseudo_values(momentum, keys, first_pre, errors[0], coeffs)
    out = None
    if queries is not None:
        def read(x: torch.Tensor) -> torch.Tensor:
            return x if read_heads is None else x[:, x.shape[1] - read_heads:]

        # one node with a written backward (ops/_chunk_read.py); each tensor sliced once
        with_pseudo = pseudo is not None
        out = chunk_read(
            activation, queries, read(coeffs.scale), read(coeffs.coef),
            read(coeffs.carry) if momentum is not None else None,
            read(coeffs.eta_decay) if with_pseudo else None,
            read(pseudo) if with_pseudo else None, [read(w) for w in weights],
            None if momentum is None else [read(m) for m in momentum],
            [read(a) for a in inputs], [read(e) for e in errors])
    if not need_state:
        return out, None, None
    # the chunk-end state: the same sums at t = C (the coefficients' end rows)
    last_coef = coeffs.end_coef[..., None]
    last_scale = coeffs.end_scale[..., None, None]
    weight_errors = []
    for index in range(len(weights)):
        weighted = errors[index] * last_coef
        if pseudo is not None and index == 0:
            # the delta-rule terms share the input k_i: one matmul for both
            weighted = weighted + pseudo * coeffs.end_eta_decay[..., None]
        weight_errors.append(weighted)
    if momentum is None:
        new_weights = [last_scale * w - e.transpose(-1, -2) @ a
                       for w, e, a in zip(weights, weight_errors, inputs, strict=True)]
        return out, new_weights, None
    last_mom = coeffs.end_momentum[..., None]
    carry_end = coeffs.end_carry[..., None, None]
    theta_end = coeffs.theta_end[..., None, None]
    new_weights, new_momentum = [], []
    for w, m, e, we, a in zip(weights, momentum, errors, weight_errors, inputs, strict=True):
        new_w, new_m = _MomentumStateStep.apply(w, m, a, we, e * last_mom, last_scale, carry_end,
                                                theta_end)
        new_weights.append(new_w)
        new_momentum.append(new_m)
    return out, new_weights, new_momentum


# The chunk step as the ops run it: compiled under nestlearn.ops.set_compile(True).
_chunk_step = compiled_step(_chunk)


def _minus_outer(target: torch.Tensor, errors: torch.Tensor, inputs: torch.Tensor
                 ) -> torch.Tensor:
    """``target - errors^T @ inputs`` as one batched gemm (no product temporary).

    ``target`` ``[..., out, in]``, ``errors`` ``[..., C, out]``, ``inputs`` ``[..., C, in]``.
    Out of place: torch.compile in torch 2.11 (not 2.13) lost the gradient of an autograd
    Function's output updated in place through a view (``tests/test_ops_compile.py``)."""
    flat = torch.baddbmm(target.reshape(-1, *target.shape[-2:]),
                         errors.reshape(-1, *errors.shape[-2:]).transpose(1, 2),
                         inputs.reshape(-1, *inputs.shape[-2:]), alpha=-1)
    return flat.view(target.shape)


def _frobenius(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over the last two dims, ``[..., 1, 1]``: one fused dot product, no temporary (a
    view when both are contiguous). Not a matrix-vector product of the flattened operands:
    fewer kernels on paper, but 150 us against 20 us per call at HOPE's shapes on this CPU."""
    return torch.linalg.vecdot(a.flatten(-2), b.flatten(-2))[..., None, None]


class _MomentumStateStep(torch.autograd.Function):
    """One chunk's state step of a layer with momentum, with a hand-written backward:

        W' = A W + s S - we^T a,        S' = Theta S - me^T a

    (``we``, ``me`` the chunk's gate-weighted output errors, ``a`` its inputs; ``A``, ``s``,
    ``Theta`` per-head scalars ``[..., 1, 1]``). Autograd of the plain expression would
    materialize every weight-sized product and reduce it for the scalar gradients; here each
    scalar gradient is one Frobenius product and each weight-sized output one fused pass.
    The backward uses differentiable ops only, so it can itself be differentiated.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, momentum: torch.Tensor, inputs: torch.Tensor,
                weight_error: torch.Tensor, momentum_error: torch.Tensor, scale: torch.Tensor,
                carry: torch.Tensor, theta_end: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        new_weight = _minus_outer(torch.addcmul(weight * scale, momentum, carry), weight_error,
                                  inputs)
        new_momentum = _minus_outer(momentum * theta_end, momentum_error, inputs)
        ctx.save_for_backward(weight, momentum, inputs, weight_error, momentum_error, scale,
                              carry, theta_end)
        return new_weight, new_momentum

    @staticmethod
    def backward(ctx, grad_weight: torch.Tensor, grad_momentum: torch.Tensor,
                 ) -> tuple[torch.Tensor | None, ...]:
        weight, momentum, inputs, weight_error, momentum_error, scale, carry, theta_end = (
            ctx.saved_tensors)
        need = ctx.needs_input_grad
        # incoming gradients often arrive transposed (from the x @ W^T reads); one copy to the
        # weights' layout makes every weight-sized product below a single streaming pass
        grad_weight = grad_weight.contiguous()
        grad_momentum = grad_momentum.contiguous()
        grads: list[torch.Tensor | None] = [None] * 8
        if need[0]:
            grads[0] = grad_weight * scale
        if need[1]:
            grads[1] = torch.addcmul(grad_momentum * theta_end, grad_weight, carry)
        if need[2]:
            # -(we @ gW) - me @ gM, the second product's negation folded into one baddbmm
            flat = torch.baddbmm(
                (momentum_error @ grad_momentum).flatten(0, -3),
                weight_error.flatten(0, -3), grad_weight.flatten(0, -3), beta=-1, alpha=-1)
            grads[2] = flat.view(inputs.shape)
        if need[3] or need[4]:
            negated = -inputs  # chunk-sized: one negation for both products
            if need[3]:
                grads[3] = negated @ grad_weight.transpose(-1, -2)
            if need[4]:
                grads[4] = negated @ grad_momentum.transpose(-1, -2)
        if need[5]:
            grads[5] = _frobenius(grad_weight, weight)
        if need[6]:
            grads[6] = _frobenius(grad_weight, momentum)
        if need[7]:
            grads[7] = _frobenius(grad_momentum, momentum)
        return tuple(grads)


def _all_coefficients(alpha: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor | None,
                      chunk_size: int, dgd: bool) -> list[ChunkCoefficients]:
    """Every chunk's gate coefficients (gates ``[B, T, H]``): the whole chunks from one
    batched computation, a last partial chunk from one of its own (its end rows are its
    last real token's)."""
    length = alpha.shape[1]
    whole = length // chunk_size
    sizes = [size for size in (whole * chunk_size, length - whole * chunk_size) if size]
    # one split per gate: heads-first [B, H, T] pieces, the whole chunks' first
    pieces = [None if gate is None else gate.transpose(1, 2).split(sizes, -1)
              for gate in (alpha, eta, theta)]
    chunks = []
    if whole:
        alpha_w, eta_w, theta_w = (None if p is None else p[0].unflatten(-1, (whole, chunk_size))
                                   for p in pieces)
        chunks.extend(chunk_coefficients(alpha_w, eta_w, theta_w, previous=dgd).per_chunk())
    if length > whole * chunk_size:
        alpha_p, eta_p, theta_p = (None if p is None else p[-1] for p in pieces)
        chunks.append(chunk_coefficients(alpha_p, eta_p, theta_p, previous=dgd))
    return chunks


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, ...]`` -> ``[B, H, T, ...]``, contiguous so each chunk's matmuls run on it
    without copying (copies would also be kept for the backward pass)."""
    return x.transpose(1, 2).contiguous()


@full_precision
def deep_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                eta: torch.Tensor, theta: torch.Tensor | None = None, *,
                initial_state: DeepMemoryState | None = None, objective: str = "l2",
                activation: str = "gelu", dgd: bool = False, output_final_state: bool = False,
                chunk_size: int = 64, check_values: bool = True
                ) -> tuple[torch.Tensor, DeepMemoryState | None]:
    """Deep MLP memory trained in context, chunkwise; exact against :func:`deep_memory_naive`.

    Args:
        q, k, v: ``[B, T, H, D]`` queries, keys, values (one D: the memory is residual).
        alpha: ``[B, T, H]`` weight decay (retention) in [0, 1].
        eta: ``[B, T, H]`` inner learning rate >= 0.
        theta: ``[B, T, H]`` momentum in [0, 1], or ``None`` for no momentum.
        initial_state: the memory's weights (``[B, H, out, in]`` or ``[H, out, in]``) and
            momentum (``None``: zeros when theta is given).
        objective: ``"l2"`` (1/2 ||M(k) - v||^2) or ``"dot"`` (-<M(k), v>).
        activation: the MLP's nonlinearity (``"gelu"``, ``"silu"``, ``"relu"``, ``"tanh"``).
        dgd: precondition W_1 with (alpha_t I - eta_t k_t k_t^T) (delta gradient descent).
        output_final_state: also return the state after the last token.
        chunk_size: tokens whose gradients are taken at the same (chunk-start) weights.
        check_values: check the gates' values (finite, in range) on the host; layers that
            call the op per chunk pass False: one device sync less per call
            (``nestlearn.debug_checks`` turns the check back on).

    Returns:
        ``(o, state)``: ``o`` ``[B, T, H, D]`` with o_t = M_t(q_t), read after token t's update,
        and the final :class:`DeepMemoryState` (weights ``[B, H, out, in]``) or ``None``.
    """
    check_deep_memory_args(q, k, v, alpha, eta, theta, initial_state, objective, activation,
                           chunk_size, check_values=check_values)
    batch, length = q.shape[:2]
    weights, momentum = batched_state(initial_state, batch, theta is not None)
    count = num_chunks(length, chunk_size)

    # torch.split, not slicing: its backward writes every chunk's gradient into one tensor,
    # where per-chunk slices would each allocate and add a full-length zero gradient (O(T^2)).
    def chunks(x: torch.Tensor | None) -> list[torch.Tensor | None]:
        if x is None:
            return [None] * count
        return list(torch.split(_heads_first(x), chunk_size, dim=2))

    parts = zip(*(chunks(x) for x in (q, k, v, alpha, eta, theta)), strict=True)
    coefficients = _all_coefficients(alpha, eta, theta, chunk_size, dgd)
    outputs = []
    for index, (q_c, k_c, v_c, alpha_c, eta_c, theta_c) in enumerate(parts):
        need_state = output_final_state or index < count - 1
        out, new_weights, new_momentum = _chunk_step(
            weights, momentum, q_c, k_c, v_c, alpha_c, eta_c, theta_c, objective, activation,
            dgd, need_state, coefficients[index])
        outputs.append(out)
        if need_state:
            weights, momentum = new_weights, new_momentum
    o = torch.cat(outputs, dim=2).transpose(1, 2)
    if not output_final_state:
        return o, None
    return o, DeepMemoryState(tuple(weights), tuple(momentum) if momentum is not None else None)


@full_precision
def deep_memory_update(state: DeepMemoryState, k: torch.Tensor, v: torch.Tensor,
                       alpha: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor | None = None,
                       *, objective: str = "l2", activation: str = "gelu",
                       dgd: bool = False, check_values: bool = True) -> DeepMemoryState:
    """The state after one chunk of tokens ``k, v`` (``[B, T, H, D]``) whose gradients are all
    taken at ``state``: what :func:`deep_memory` carries from one chunk to the next. Layers
    whose outputs for a chunk come from the previous chunk's state call this once per chunk
    (with ``check_values=False``, as for :func:`deep_memory`)."""
    # k stands in for q in the shared checks, so name k's own shape errors here
    if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[1] == 0:
        got = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
        raise invalid("k.shape", got, "a torch.Tensor [B, T, H, D] with T >= 1")
    check_deep_memory_args(k, k, v, alpha, eta, theta, state, objective, activation, None,
                           state_name="state", check_values=check_values)
    weights, momentum = batched_state(state, k.shape[0], theta is not None)
    _, new_weights, new_momentum = _chunk_step(
        weights, momentum, None, _heads_first(k), _heads_first(v), _heads_first(alpha),
        _heads_first(eta), _heads_first(theta) if theta is not None else None, objective,
        activation, dgd, True)
    return DeepMemoryState(tuple(new_weights),
                           tuple(new_momentum) if new_momentum is not None else None)


def deep_memory_chunk_step(weights: list[torch.Tensor], momentum: list[torch.Tensor] | None,
                           q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
                           alpha: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor | None,
                           *, objective: str = "l2", activation: str = "gelu", dgd: bool = False,
                           read_heads: int | None = None,
                           momentum_products: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor | None, list[torch.Tensor],
                                      list[torch.Tensor] | None]:
    """One chunk of :func:`deep_memory`: the outputs M_t(q_t) of its tokens (None when ``q`` is
    None: the state step alone) and the state after it, every gradient taken at ``weights``
    (and ``momentum``, None without theta).

    For layers that drive the chunk loop themselves: tensors are heads-first (tokens
    ``[B, H, C, D]``, gates ``[B, H, C]``, weights ``[B, H, out, in]``) and nothing is checked
    (the caller has checked the shapes once; gate values as with ``check_values=False``).
    ``read_heads``: ``q`` holds queries for that many last heads only, and only they are read
    (a stack of memories of which only some are read out); None: every head.
    ``momentum_products``: theta's segment products ``[B, H, C + 1, C + 1]`` if the caller has
    them already (``segment_products`` of every chunk's theta in one batched call: theta does
    not depend on the memory, unlike the other gates of a self-modifying layer).
    """
    coeffs = None
    if momentum_products is not None:
        coeffs = chunk_coefficients(alpha, eta, theta, dgd, momentum_products)
    out, new_weights, new_momentum = _chunk_step(
        weights, momentum, q, k, v, alpha, eta, theta, objective, activation, dgd, True, coeffs,
        read_heads)
    return out, new_weights, new_momentum


@full_precision
def deep_memory_token_step(chunk_start: DeepMemoryState, current: DeepMemoryState,
                           q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                           eta: torch.Tensor, theta: torch.Tensor | None = None, *,
                           objective: str = "l2", activation: str = "gelu", dgd: bool = False,
                           ) -> tuple[torch.Tensor, DeepMemoryState]:
    """One token of :func:`deep_memory` without the chunk machinery: ``o [B, 1, H, D]`` and the
    memory after the token.

    ``chunk_start`` is the memory at the start of the token's chunk (where its gradient is
    taken), ``current`` the memory after the chunk's earlier tokens (``chunk_start`` itself
    for a chunk's first token); ``q, k, v`` ``[B, 1, H, D]``, gates ``[B, 1, H]``. The step is
    the per-token recurrence of :func:`deep_memory_naive`, whose chunk-end state and outputs
    the chunkwise form equals: G = e a^T per layer from the hand-written key pass at
    ``chunk_start``, S <- theta S - eta G, W <- alpha W + S (with ``dgd``,
    W_1 <- W_1 (alpha I - eta k k^T) + S_1), o = M_W(q). Nothing is checked (decoding
    layers check their state once per call)."""
    batch = q.shape[0]
    start, _ = batched_state(chunk_start, batch, False)
    weights, momentum = batched_state(current, batch, theta is not None)
    out, new_weights, new_momentum = _token_step_compiled(
        start, weights, momentum, q, k, v, alpha, eta, theta, objective, activation, dgd)
    return out, DeepMemoryState(tuple(new_weights),
                                tuple(new_momentum) if new_momentum is not None else None)


def _token_step(start: list[torch.Tensor], weights: list[torch.Tensor],
                momentum: list[torch.Tensor] | None, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, alpha: torch.Tensor, eta: torch.Tensor,
                theta: torch.Tensor | None, objective: str, activation: str, dgd: bool,
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None]:
    """The tensor work of ``deep_memory_token_step`` (batched weights ``[B, H, out, in]``):
    ``o [B, 1, H, D]``, the new weights and momentum (None without theta)."""
    key, query = _heads_first(k), _heads_first(q)
    inputs, errors, _ = key_pass_reference(start, key, _heads_first(v), objective,
                                           activation)

    def scalar(gate: torch.Tensor) -> torch.Tensor:
        return gate.transpose(1, 2)[..., None]  # [B, 1, H] -> [B, H, 1, 1]

    # Fused multiply-adds (addcmul): a decoded token's cost is its kernel count.
    descent, decay = -scalar(eta), scalar(alpha)
    persistence = scalar(theta) if momentum is not None else None
    new_weights, new_momentum = [], []
    for index, (weight, layer_input, error) in enumerate(zip(weights, inputs, errors,
                                                             strict=True)):
        gradient = error.transpose(-1, -2) @ layer_input
        if momentum is not None:
            step = torch.addcmul(persistence * momentum[index], descent, gradient)
            new_momentum.append(step)
        else:
            step = descent * gradient
        if dgd and index == 0:
            # W_1 (alpha I - eta k k^T) = alpha W_1 - eta (W_1 k^T) k
            step = torch.addcmul(step, descent, (weight @ key.transpose(-1, -2)) @ key)
        new_weights.append(torch.addcmul(step, decay, weight))
    out = mlp_forward(tuple(new_weights), query, activation).transpose(1, 2)
    return out, new_weights, (new_momentum if momentum is not None else None)


# The token step as decoding runs it: compiled under nestlearn.ops.set_compile(True).
_token_step_compiled = compiled_step(_token_step)


@full_precision
def deep_memory_apply(weights: tuple[torch.Tensor, ...], x: torch.Tensor,
                      activation: str = "gelu") -> torch.Tensor:
    """M(x) with fixed weights (``[B, H, out, in]`` or ``[H, out, in]``); x ``[B, T, H, D]``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise invalid("x", got, "a torch.Tensor [B, T, H, D]")
    check_activation(activation)
    batch, _, heads, dim = x.shape
    checked = check_weights("weights", weights, heads, dim, batch, x)
    return mlp_forward(checked, _heads_first(x), activation).transpose(1, 2)
