"""Tiny configurations of every wired architecture, shared by the model tests."""

from __future__ import annotations

import torch

from nestlearn.models import ModelConfig, build_model

VOCAB = 17
ARCHS_WIRED = ["transformer", "titans", "titans-mag", "hope", "hope-attention"]


# Names of the parameters that are meta-learned initial states of in-context memories.
INITIAL_STATE_MARKERS = ("memory_weights", "inner_weights", "initial.")


def tiny_config(arch: str, **overrides) -> ModelConfig:
    """Small chunks, so the short test sequences cross many chunk boundaries."""
    fields = {"arch": arch, "vocab_size": VOCAB, "dim": 16, "layers": 2, "heads": 2,
              "chunk_size": 4, "inner_chunk_size": 3, "cms_chunk_sizes": (2, 6),
              "cms_inner_lr": 0.05}
    if arch == "titans-mag":
        fields["window"] = 4
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_config(arch, **overrides)).to(dtype)


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)
