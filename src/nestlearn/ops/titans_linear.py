"""Titans linear memory with momentum ("surprise") and forgetting, gradients at the chunk start.

S_t = theta_t S_{t-1} - eta_t (M_{t'} k_t - v_t) k_t^T,   M_t = alpha_t M_{t-1} + S_t,
o_t = M_t q_t, where M_{t'} is the memory at the start of t's chunk (Titans' chunkwise
training, docs/paper.md section 4; the gradient of 1/2 ||M k - v||^2 is (M k - v) k^T). The chunk
size is part of the semantics; chunk_size=1 is the per-token recurrence. The state is the pair
(memory M, momentum S), each ``[B, H, Dv, Dk]``; derivation of the chunkwise form in
``ops/README.md``.
"""

from __future__ import annotations

import torch

from nestlearn.errors import invalid
from nestlearn.ops._chunking import merge_tokens, segment_products, split_gate, split_tokens
from nestlearn.ops._precision import full_precision
from nestlearn.ops._validate import check_matrix_state, check_rule_inputs
from nestlearn.state import TreeState, state_dataclass


@state_dataclass
class TitansLinearState(TreeState):
    """Memory ``M`` and momentum ``S`` of a Titans linear memory, each ``[B, H, Dv, Dk]``.

    As an initial state either part may also be ``[H, Dv, Dk]``, shared by the batch.
    """

    memory: torch.Tensor
    momentum: torch.Tensor


def _check(q, k, v, alpha, eta, theta, initial_state, chunk_size,
                                        check_values):
    batch, length, heads, dk, dv = check_rule_inputs(
        q, k, v,
        {"alpha": (alpha, 0.0, 1.0), "eta": (eta, 0.0, None), "theta": (theta, 0.0, 1.0)},
        chunk_size, check_values,
    )
    shape = (batch, heads, dv, dk)
    if initial_state is None:
        return length, q.new_zeros(shape), q.new_zeros(shape)
    if not isinstance(initial_state, TitansLinearState):
        raise invalid("initial_state", type(initial_state).__name__,
                      "a TitansLinearState(memory, momentum) or None")
    memory = check_matrix_state("initial_state.memory", initial_state.memory, *shape, q)
    momentum = check_matrix_state("initial_state.momentum", initial_state.momentum, *shape, q)
    return length, memory, momentum


@full_precision
def titans_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    theta: torch.Tensor,
    initial_state: TitansLinearState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    *,
    check_values: bool = True,
) -> tuple[torch.Tensor, TitansLinearState | None]:
    """Chunkwise Titans linear memory; exact for the chunk-start-gradient semantics.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
        alpha: memory retention ``[B, T, H]`` in [0, 1]. eta: step size ``[B, T, H]``, >= 0.
        theta: momentum retention ``[B, T, H]`` in [0, 1].
        initial_state: ``TitansLinearState`` before the first token (zeros if None); each
            part ``[B, H, Dv, Dk]`` or ``[H, Dv, Dk]`` (shared by the batch).
        output_final_state: also return the state after the last token.
        chunk_size: tokens sharing one gradient point (the state at their chunk's start).
        check_values: check the gates' values (finite, in range) on the host; layers that
            call the op per chunk pass False: one device sync less per
            call (``nestlearn.debug_checks`` turns the check back on).

    Returns:
        ``(o [B, T, H, Dv], TitansLinearState or None)``.
    """
    length, memory, momentum = _check(q, k, v, alpha, eta, theta, initial_state, chunk_size,
                                        check_values)
    size = min(chunk_size, length)
    qc, kc, vc = (split_tokens(x, size) for x in (q, k, v))
    ac = split_gate(alpha, size, 1.0)
    ec = split_gate(eta, size, 0.0)
    tc = split_gate(theta, size, 1.0)
    chunks = qc.shape[2]
    last = length - (chunks - 1) * size  # real tokens in the last chunk

    memory_decay = segment_products(ac)
    momentum_decay = segment_products(tc)
    # Write i reaches M_t through every S_s, i <= s <= t: sum_s alpha(s, t] theta(i, s].
    # Column 0 is the same sum for S_0. One (C+1) x (C+1) matmul per chunk, all terms >= 0.
    mixed = memory_decay[..., 1:] @ momentum_decay[..., 1:, :]

    def end_row(matrix: torch.Tensor) -> torch.Tensor:
        # The state after a chunk is read at its last real token (padded ones still add S to M).
        return torch.cat([matrix[:, :, :-1, size], matrix[:, :, -1:, last]], dim=2)

    memory_end, momentum_end, mixed_end = (
        end_row(m) for m in (memory_decay, momentum_decay, mixed)
    )
    keys_to_memory = mixed_end[..., 1:, None] * kc
    keys_to_momentum = momentum_end[..., 1:, None] * kc
    scaled_values = ec[..., None] * vc
    scaled_keys = ec[..., None] * kc

    # unbind, not indexing: its backward is one stack instead of a full-size scatter per chunk.
    memory_starts, momentum_starts, all_writes = [], [], []
    for values_n, keys_n, to_memory_n, to_momentum_n, memory_total, momentum_total, mixed_n in zip(
        scaled_values.unbind(2), scaled_keys.unbind(2), keys_to_memory.unbind(2),
        keys_to_momentum.unbind(2), memory_end[..., 0, None, None].unbind(2),
        momentum_end[..., 0, None, None].unbind(2), mixed_end[..., 0, None, None].unbind(2),
        strict=True,
    ):
        memory_starts.append(memory)
        momentum_starts.append(momentum)
        # writes e_i = -eta_i (M_0 k_i - v_i): negative gradients at the chunk start.
        writes = values_n - keys_n @ memory.transpose(-1, -2)
        all_writes.append(writes)
        writes_t = writes.transpose(-1, -2)
        memory, momentum = (
            memory_total * memory + mixed_n * momentum + writes_t @ to_memory_n,
            momentum_total * momentum + writes_t @ to_momentum_n,
        )
    memory_starts_t = torch.stack(memory_starts, dim=2).transpose(-1, -2)
    momentum_starts_t = torch.stack(momentum_starts, dim=2).transpose(-1, -2)
    writes = torch.stack(all_writes, dim=2)

    scores = (qc @ kc.transpose(-1, -2)) * mixed[..., 1:, 1:]
    out = (scores @ writes
           + memory_decay[..., 1:, 0, None] * (qc @ memory_starts_t)
           + mixed[..., 1:, 0, None] * (qc @ momentum_starts_t))
    final = TitansLinearState(memory, momentum) if output_final_state else None
    return merge_tokens(out, length), final


@full_precision
def titans_linear_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    theta: torch.Tensor,
    initial_state: TitansLinearState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    *,
    check_values: bool = True,
) -> tuple[torch.Tensor, TitansLinearState | None]:
    """Token-by-token reference of :func:`titans_linear` with the same chunk semantics."""
    length, memory, momentum = _check(q, k, v, alpha, eta, theta, initial_state, chunk_size,
                                        check_values)
    outputs = []
    for t in range(length):
        if t % chunk_size == 0:
            anchor = memory  # M_{t'}: gradients of this chunk are taken here
        key = k[:, t, :, None, :]
        gradient = (anchor @ k[:, t, :, :, None] - v[:, t, :, :, None]) * key
        momentum = theta[:, t, :, None, None] * momentum - eta[:, t, :, None, None] * gradient
        memory = alpha[:, t, :, None, None] * memory + momentum
        outputs.append((memory @ q[:, t, :, :, None]).squeeze(-1))
    final = TitansLinearState(memory, momentum) if output_final_state else None
    return torch.stack(outputs, dim=1), final
