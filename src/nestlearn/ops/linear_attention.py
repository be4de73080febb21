"""Gated linear attention (Hebbian memory, dot-product objective).

M_t = alpha_t M_{t-1} + eta_t v_t k_t^T and o_t = M_t q_t: one gradient step with rate eta_t on
the objective -<M k_t, v_t> after decaying the memory by alpha_t (docs/paper.md section 1, "dot"
objective). State M is ``[B, H, Dv, Dk]``. The derivation of the chunkwise form is in
``ops/README.md``.
"""

from __future__ import annotations

import torch

from nestlearn.ops._chunking import merge_tokens, segment_products, split_gate, split_tokens
from nestlearn.ops._precision import full_precision
from nestlearn.ops._validate import check_gated_matrix_rule


@full_precision
def gated_linear_attention(
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
    """Chunkwise gated linear attention: per chunk, masked matmuls plus one state step.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
        alpha: retention gate ``[B, T, H]`` in [0, 1]. eta: write strength ``[B, T, H]``, >= 0.
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
    # Padded tokens carry alpha = 1, eta = 0: they leave the memory unchanged.
    ac = split_gate(alpha, size, 1.0)
    ec = split_gate(eta, size, 0.0)

    products = segment_products(ac)
    decay = products[..., 1:, 1:]  # decay[t, i] = alpha_{i+1} ... alpha_t
    from_start = products[..., 1:, 0]  # alpha_0 ... alpha_t
    to_end = products[..., -1, :]  # [chunk total, decay from each token to the chunk end]

    scores = (qc @ kc.transpose(-1, -2)) * decay * ec[..., None, :]
    intra = scores @ vc
    increments = (vc * (ec * to_end[..., 1:])[..., None]).transpose(-1, -2) @ kc

    # unbind, not indexing: its backward is one stack instead of a full-size scatter per chunk.
    starts = []
    for total, increment in zip(to_end[..., 0, None, None].unbind(2), increments.unbind(2),
                                strict=True):
        starts.append(memory)
        memory = total * memory + increment
    start_states = torch.stack(starts, dim=2)
    inter = from_start[..., None] * (qc @ start_states.transpose(-1, -2))
    out = merge_tokens(intra + inter, length)
    return out, (memory if output_final_state else None)


@full_precision
def gated_linear_attention_naive(
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
    """Token-by-token reference of :func:`gated_linear_attention` (``chunk_size`` is unused)."""
    length, memory = check_gated_matrix_rule(q, k, v, alpha, eta, initial_state, chunk_size,
                                             check_values)
    outputs = []
    for t in range(length):
        write = eta[:, t, :, None, None] * (v[:, t, :, :, None] * k[:, t, :, None, :])
        memory = alpha[:, t, :, None, None] * memory + write
        outputs.append((memory @ q[:, t, :, :, None]).squeeze(-1))
    return torch.stack(outputs, dim=1), (memory if output_final_state else None)
