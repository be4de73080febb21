"""Autoregressive generation that carries the model's state.

The prompt is read in one pass, then each new token is fed alone with the state: attention
reuses its KV cache, recurrent blocks (Titans, HOPE) update a memory whose size does not depend
on the context length, so their cost per token is flat.
"""

from __future__ import annotations

import torch
from torch import nn

from nestlearn.errors import check_int, invalid
from nestlearn.models.lm import check_ids
from nestlearn.models.state import LMState


def _check_options(max_new_tokens: object, temperature: object, top_k: object,
                   vocab_size: int, generator: object) -> None:
    check_int("max_new_tokens", max_new_tokens, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature >= 0:
        raise invalid("temperature", repr(temperature), "a number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= vocab_size):
        raise invalid("top_k", repr(top_k), f"None or an int in [1, {vocab_size}]")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise invalid("generator", type(generator).__name__, "None or a torch.Generator")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``[B]`` from last-position logits ``[B, V]`` (temperature 0 = argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        threshold = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, state: LMState | None = None,
             return_logits: bool = False
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Continue ``ids [B, T]`` by ``max_new_tokens`` tokens; return ``[B, T + max_new_tokens]``.

    ``temperature`` 0 decodes greedily; ``top_k`` keeps the k most likely tokens before
    sampling; ``generator`` makes sampling reproducible. ``state`` continues a stream whose
    earlier tokens the model has already read (``ids`` are then only the new prompt tokens).
    With ``return_logits`` also returns the logits ``[B, max_new_tokens, V]`` each new token was
    drawn from.
    """
    vocab_size = model.config.vocab_size
    check_ids(ids, vocab_size)
    _check_options(max_new_tokens, temperature, top_k, vocab_size, generator)
    out = ids
    step_logits = []
    if max_new_tokens > 0:
        logits, state = model(ids, state)
        for step in range(max_new_tokens):
            last = logits[:, -1]
            step_logits.append(last)
            token = sample_next(last, temperature, top_k, generator)[:, None]
            out = torch.cat([out, token], dim=1)
            if step + 1 < max_new_tokens:
                logits, state = model(token, state)
    if not return_logits:
        return out
    if step_logits:
        return out, torch.stack(step_logits, dim=1)
    dtype = next(model.parameters()).dtype
    return out, torch.zeros(ids.shape[0], 0, vocab_size, dtype=dtype, device=ids.device)
