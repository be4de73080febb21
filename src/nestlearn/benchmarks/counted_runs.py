"""The runs the op budget and its sites count (``opcount.py``, ``kernel_sites.py``): one seeded
training step, greedy generation after a seeded prompt, and which aten ops count as kernels.
Shared so both count exactly the same work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from nestlearn.models import ModelConfig, build_model

# Ops that only relabel memory (no kernel on a GPU) besides those whose schema says "view".
METADATA_OPS = frozenset({"_unsafe_view", "lift_fresh"})


def is_kernel(func: Any) -> bool:
    """Whether an aten op computes (a kernel on a GPU), not only relabels memory."""
    return not func.is_view and func.overloadpacket.__name__ not in METADATA_OPS


def make_step(model: nn.Module, ids: torch.Tensor,
              before_backward: Callable[[], None] | None = None
              ) -> Callable[[], torch.Tensor]:
    """One training step's forward and backward (no optimizer), as the trainer runs it;
    ``before_backward`` is called between the two (``kernel_sites`` switches phase there)."""

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        logits, _ = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        if before_backward is not None:
            before_backward()
        loss.backward()
        return loss.detach()

    return step


def seeded_step(config: ModelConfig, length: int, batch: int, seed: int = 0,
                before_backward: Callable[[], None] | None = None
                ) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """The model of ``config`` and one training step of it on seeded random ids (the same
    model and ids for every count of the same seed)."""
    torch.manual_seed(seed)
    model = build_model(config)
    ids = torch.randint(0, config.vocab_size, (batch, length + 1),
                        generator=torch.Generator().manual_seed(seed))
    return model, make_step(model, ids, before_backward)


def prompted_decoder(config: ModelConfig, length: int, batch: int, tokens: int,
                     seed: int = 0) -> Callable[[], torch.Tensor]:
    """Greedy generation of ``tokens`` tokens after a seeded prompt of ``length`` tokens: the
    prompt is read here, once; each call of the returned function generates from the state
    the prompt left (the same tokens every call) and returns them."""
    from nestlearn.models.generation import generate

    torch.manual_seed(seed)
    model = build_model(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, length),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        state = model(ids[:, :-1])[1] if length > 1 else None

    def decode() -> torch.Tensor:
        return generate(model, ids[:, -1:], tokens, temperature=0, state=state)

    return decode


def run_decode(config: ModelConfig, length: int, batch: int, tokens: int,
               mode: TorchDispatchMode, seed: int = 0) -> None:
    """:func:`prompted_decoder`'s generation once, with ``mode`` (a counter) active for the
    generation only (the prompt is read before)."""
    decode = prompted_decoder(config, length, batch, tokens, seed)
    with mode:
        decode()
