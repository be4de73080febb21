"""Tiny configurations of every wired architecture, shared by the model tests."""

from __future__ import annotations

import torch

from nestlearn.models import ARCHS, ModelConfig, build_model
from nestlearn.nn.self_modifying import SelfModifyingTitansConfig

VOCAB = 17
ARCHS_WIRED = ["transformer", "titans", "titans-mag", "hope", "hope-attention"]

# The `nestlearn bench ops-count` CLI tests' model: one block of width 16, two heads, 32 words.
TINY_BENCH_MODEL = ["--model-dim", "16", "--model-layers", "1", "--heads", "2", "--vocab-size",
                    "32"]


# Names of the parameters that are meta-learned initial states of in-context memories.
INITIAL_STATE_MARKERS = ("memory_weights", "inner_weights", "initial.")


def tiny_config(arch: str, chunk: int | None = None, **overrides) -> ModelConfig:
    """Small chunks, so the short test sequences cross many chunk boundaries.

    ``chunk`` sets every memory chunk (HOPE's inner chunk too; default 4, inner 3).
    ``overrides`` sets model fields; ``memory``, ``cms`` and ``attention`` dicts are merged
    into the tiny sections."""
    spec = ARCHS[arch]
    sections = {
        "memory": ({"chunk_size": chunk or 4, "inner_chunk_size": chunk or 3}
                   if spec.memory is SelfModifyingTitansConfig
                   else {"chunk_size": chunk or 4} if spec.memory is not None else None),
        "cms": {"chunk_sizes": (2, 6), "inner_lr": 0.05} if spec.cms else None,
        "attention": {"window": 4} if arch == "titans-mag" else None,
    }
    for name in ("memory", "cms", "attention"):
        if isinstance(overrides.get(name), dict):
            sections[name] = {**(sections[name] or {}), **overrides.pop(name)}
    fields = {"arch": arch, "vocab_size": VOCAB, "dim": 16, "layers": 2, "heads": 2,
              **sections}
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_config(arch, **overrides)).to(dtype)


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)
