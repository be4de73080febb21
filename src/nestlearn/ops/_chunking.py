"""Splitting sequences into chunks and the per-chunk decay products the chunkwise forms share.

Layout inside the chunkwise forms: token tensors ``[B, T, H, D]`` become ``[B, H, N, C, D]``
and gates ``[B, T, H]`` become ``[B, H, N, C]`` (N chunks of C tokens). The last chunk is
padded at its end; padded tokens come after every real token, so causality keeps them from
touching any real output, and each rule reads its final state at the last real token.
"""

from __future__ import annotations

from typing import Any

import torch

from nestlearn.ops._precision import full_precision


def num_chunks(length: int, chunk_size: int) -> int:
    return -(-length // chunk_size)


def split_tokens(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[B, T, H, D]`` -> ``[B, H, N, C, D]``, zero-padding the time axis to N * C."""
    batch, length, heads, dim = x.shape
    padded = num_chunks(length, chunk_size) * chunk_size
    if padded != length:
        x = torch.cat([x, x.new_zeros(batch, padded - length, heads, dim)], dim=1)
    x = x.reshape(batch, padded // chunk_size, chunk_size, heads, dim).permute(0, 3, 1, 2, 4)
    # One copy here instead of one inside every batched matmul that reads a strided view.
    return x.contiguous()


def split_gate(gate: torch.Tensor, chunk_size: int, pad_value: float) -> torch.Tensor:
    """``[B, T, H]`` -> ``[B, H, N, C]``, padding the time axis with ``pad_value``."""
    batch, length, heads = gate.shape
    padded = num_chunks(length, chunk_size) * chunk_size
    if padded != length:
        pad = gate.new_full((batch, padded - length, heads), pad_value)
        gate = torch.cat([gate, pad], dim=1)
    gate = gate.reshape(batch, padded // chunk_size, chunk_size, heads).permute(0, 3, 1, 2)
    return gate.contiguous()


def merge_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, H, N, C, D]`` -> ``[B, T, H, D]``, dropping the padding."""
    batch, heads, chunks, chunk_size, dim = x.shape
    x = x.permute(0, 2, 3, 1, 4).reshape(batch, chunks * chunk_size, heads, dim)
    return x[:, :length]


def segment_products(gate: torch.Tensor) -> torch.Tensor:
    """Products of a gate over every segment of a chunk, as a lower-triangular matrix.

    ``gate`` is ``[..., C]`` with values in ``[0, 1]``. Returns ``P`` of shape
    ``[..., C + 1, C + 1]`` indexed by *positions*: position 0 is the chunk start and position
    ``p >= 1`` is "just after token p - 1". ``P[p, s] = prod_{s <= j < p} gate[j]`` for
    ``s <= p`` (1 on the diagonal, the empty product) and 0 above the diagonal.

    Built as a cumulative product of factors in [0, 1] down each column, never as a ratio of
    prefix products: it cannot overflow, underflows only towards its true value 0, and a gate
    of exactly 0 keeps finite gradients (no log(0) as a log-space segment sum would take).
    Its backward is exact and reads nothing on the host (``_SegmentProducts``).
    """
    return _SegmentProducts.apply(gate)


def _products_forward(gate: torch.Tensor) -> torch.Tensor:
    size = gate.shape[-1] + 1
    padded = torch.nn.functional.pad(gate, (1, 0), value=1.0)
    # factors[p, s] = padded[p] below the diagonal, 1 on and above it: tril keeps the gates
    # (zeros above), and adding the constant upper triangle of ones is exact. Five kernels,
    # where masks built from aranges and two where's took twelve.
    upper_ones = torch.ones(size, size, dtype=gate.dtype, device=gate.device).triu_()
    factors = torch.tril(padded[..., :, None].expand(*padded.shape, size), -1) + upper_ones
    return torch.cumprod(factors, dim=-2).tril()


@full_precision
def _products_backward(products: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d loss / d gate[j] = sum_s P[j, s] (P^T G)[j + 1, s], with G = d loss / d P.

    P[p, s] (p > j >= s) is P[j, s] gate[j] P[p, j + 1]: the product split around gate[j],
    so its derivative is the two outer factors, with no division by gate[j]. Summed over p
    that is (P^T G)[j + 1, s]; the triangular P keeps only p > j >= s, so the diagonal and
    the upper triangle of G (constants of the forward) never enter.
    """
    carried = products.transpose(-1, -2) @ grad
    return (products[..., :-1, :] * carried[..., 1:, :]).sum(-1)


class _SegmentProducts(torch.autograd.Function):
    """``_products_forward`` with an exact backward free of host reads: torch's own cumprod
    backward checks the input for zeros with ``.item()``, a device sync on a GPU in every
    chunk of every memory. Reverse mode only (no ``jvp``): nothing here uses forward mode."""

    @staticmethod
    def forward(gate: torch.Tensor) -> torch.Tensor:
        return _products_forward(gate)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (products,) = ctx.saved_tensors
        return _products_backward(products, grad)
