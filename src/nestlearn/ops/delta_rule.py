"""Gated delta rule: delta gradient descent (DGD) with weight decay on a linear memory.

M_t = M_{t-1} (alpha_t I - eta_t k_t k_t^T) + eta_t v_t k_t^T
    = alpha_t M_{t-1} + eta_t (v_t - M_{t-1} k_t) k_t^T,   o_t = M_t q_t.
With alpha_t = 1 this is one gradient step with rate eta_t on 1/2 ||M k_t - v_t||^2 (docs/paper.md
sections 2 and 5, DGD). The chunkwise form is exact: inside a chunk the memory's writes solve a
unit lower-triangular system (the WY / UT transform of DeltaNet, Yang et al. 2024); see
``ops/README.md``. State M is ``[B, H, Dv, Dk]``.
"""

from __future__ import annotations

import torch

from nestlearn.ops._chunking import merge_tokens, segment_products, split_gate, split_tokens
from nestlearn.ops._precision import full_precision
from nestlearn.ops._unit_triangular import unit_lower_solve
from nestlearn.ops._validate import check_gated_matrix_rule


@full_precision
def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    *,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact chunkwise gated delta rule.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
        alpha: retention gate ``[B, T, H]`` in [0, 1]. eta: step size ``[B, T, H]``, >= 0.
        initial_state: memory ``[B, H, Dv, Dk]`` (or ``[H, Dv, Dk]``, shared by the batch)
            before the first token; zeros if None.
        output_final_state: also return the memory after the last token.
        chunk_size: tokens per chunk; any value gives the same result up to rounding.
        check_values: check the gates' values (finite, in range) on the host; layers that
            call the op per chunk pass False: one device sync less per
            call (``nestlearn.debug_checks`` turns the check back on).

    Returns:
        ``(o [B, T, H, Dv], final memory or None)``.
    """
    length, memory = check_gated_matrix_rule(q, k, v, alpha, eta, initial_state, chunk_size,
                                             check_values)
    size = min(chunk_size, length)
    qc, kc, vc = (split_tokens(x, size) for x in (q, k, v))
    # Padded tokens (k = 0, alpha = 1, eta = 0) write nothing and leave the memory unchanged.
    ac = split_gate(alpha, size, 1.0)
    ec = split_gate(eta, size, 0.0)

    products = segment_products(ac)
    decay = products[..., 1:, 1:]  # decay[t, i] = alpha_{i+1} ... alpha_t (i <= t)
    from_start = products[..., 1:, 0]  # alpha_0 ... alpha_t
    # Same products one position earlier: what M_{t-1} carries of each write and of M_0.
    decay_before = products[..., :-1, 1:]  # alpha_{i+1} ... alpha_{t-1}, zero unless i < t
    start_before = products[..., :-1, 0]  # alpha_0 ... alpha_{t-1}
    to_end = products[..., -1, :]

    # M_t = from_start_t M_0 + sum_{i<=t} decay[t, i] u_i k_i^T with writes
    # u_t = eta_t (v_t - M_{t-1} k_t), i.e. (I + A) U = eta V - (eta start_before K) M_0^T.
    # A's strictly lower part; the solve reads no diagonal (it is I's)
    system = ec[..., :, None] * decay_before * (kc @ kc.transpose(-1, -2))
    # One solve for both right-hand sides: the writes are value_writes - key_writes M_0^T.
    solved = unit_lower_solve(
        system, torch.cat([ec[..., None] * vc, (ec * start_before)[..., None] * kc], dim=-1))
    value_writes, key_writes = solved.split([vc.shape[-1], kc.shape[-1]], dim=-1)
    keys_to_end = to_end[..., 1:, None] * kc

    # Per-chunk pieces come from unbind (not indexing): its backward is one stack, where
    # indexing chunk n would scatter into a full-size zero gradient for every chunk.
    starts, writes = [], []
    for chunk_values, chunk_keys, total, chunk_keys_to_end in zip(
        value_writes.unbind(2), key_writes.unbind(2), to_end[..., 0, None, None].unbind(2),
        keys_to_end.unbind(2), strict=True,
    ):
        starts.append(memory)
        chunk_writes = chunk_values - chunk_keys @ memory.transpose(-1, -2)
        writes.append(chunk_writes)
        memory = total * memory + chunk_writes.transpose(-1, -2) @ chunk_keys_to_end
    start_states = torch.stack(starts, dim=2)
    all_writes = torch.stack(writes, dim=2)

    scores = (qc @ kc.transpose(-1, -2)) * decay
    out = scores @ all_writes + from_start[..., None] * (qc @ start_states.transpose(-1, -2))
    return merge_tokens(out, length), (memory if output_final_state else None)


@full_precision
def gated_delta_rule_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    eta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    *,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token reference of :func:`gated_delta_rule` (``chunk_size`` is unused)."""
    length, memory = check_gated_matrix_rule(q, k, v, alpha, eta, initial_state, chunk_size,
                                             check_values)
    outputs = []
    for t in range(length):
        key = k[:, t, :, None, :]
        error = v[:, t, :, :, None] - memory @ k[:, t, :, :, None]
        memory = alpha[:, t, :, None, None] * memory + eta[:, t, :, None, None] * (error * key)
        outputs.append((memory @ q[:, t, :, :, None]).squeeze(-1))
    return torch.stack(outputs, dim=1), (memory if output_final_state else None)
