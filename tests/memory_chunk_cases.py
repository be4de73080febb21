"""Random float64 inputs of one deep-memory chunk, shared by the tests of its written nodes."""

from __future__ import annotations

from collections.abc import Callable

import torch

BATCH, HEADS, SIZE, DIM, HIDDEN = 2, 3, 5, 4, 6  # B, H, C, D and the hidden width


def seeded_randn(seed: int) -> Callable[..., torch.Tensor]:
    """``randn(*shape)`` in float64 from its own generator."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return randn


def layer_widths(layers: int) -> list[int]:
    """Widths of a residual memory MLP of ``layers`` layers: D -> hidden ... -> D."""
    return [DIM] + [HIDDEN] * (layers - 1) + [DIM]


def random_weights(randn: Callable[..., torch.Tensor], layers: int, shared: bool,
                   scale: float) -> list[torch.Tensor]:
    """``[H, out, in]`` (``shared``: one initial state for the batch) or ``[B, H, out, in]``."""
    widths = layer_widths(layers)
    lead = (HEADS,) if shared else (BATCH, HEADS)
    return [scale * randn(*lead, widths[i + 1], widths[i]) for i in range(layers)]
