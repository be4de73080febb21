"""Autoregressive generation that carries the model's state.

The prompt is read in one pass, then each new token is fed alone with the state: attention
reuses its KV cache, recurrent blocks (Titans, HOPE) update a memory whose size does not depend
on the context length, so their cost per token is flat.

CMS levels driven by the LM teach signal (``teach_signal="lm"``, docs/paper.md section 3) keep
learning while generating, as in training and evaluation: the prompt runs through the
teach-signal driver (``nestlearn.nn.teach_signal``, segments cut at the smallest CMS chunk),
then each new token is read one at a time; its loss needs the next token, so the token is
first read at the levels' current weights to draw the next one, then read again through the
driver with the drawn token as target (twice the work per token for those models).

Under ``nestlearn.ops.set_compile(True)`` each new token is read by the whole model compiled
as one graph (``token_reader``): a token's forward is hundreds of small ops, so what a
token costs is mostly the host's cost per op, which one fused graph removes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from nestlearn.errors import check_int, invalid
from nestlearn.models.lm import check_ids
from nestlearn.models.state import LMState
from nestlearn.models.teaching import scored_forward, uses_lm_teach_signal
from nestlearn.ops._compile import compile_enabled, compiled_step

TokenReader = Callable[..., tuple[torch.Tensor, LMState]]
_readers: weakref.WeakKeyDictionary[nn.Module, TokenReader] = weakref.WeakKeyDictionary()


def token_reader(model: nn.Module) -> TokenReader:
    """``model(ids, state)`` for reading new tokens with the state carried: the model itself,
    or under ``nestlearn.ops.set_compile(True)`` its whole forward compiled as one graph (one
    per model, kept while the model lives; the memories' compiled steps are traced into it;
    a failed compile warns once and reads eagerly). Its values equal the model's."""
    if not compile_enabled():
        return model
    reader = _readers.get(model)
    if reader is None:
        # a weak reference: the cache's value must not keep its own key alive
        model_ref = weakref.ref(model)

        def read_tokens(ids: torch.Tensor, state: LMState | None
                        ) -> tuple[torch.Tensor, LMState]:
            return model_ref()(ids, state)

        reader = _readers[model] = compiled_step(read_tokens)
    return reader


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
             return_logits: bool = False,
             on_token: Callable[[torch.Tensor], None] | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Continue ``ids [B, T]`` by ``max_new_tokens`` tokens; return ``[B, T + max_new_tokens]``.

    ``temperature`` 0 decodes greedily; ``top_k`` keeps the k most likely tokens before
    sampling; ``generator`` makes sampling reproducible. ``state`` continues a stream whose
    earlier tokens the model has already read (``ids`` are then only the new prompt tokens).
    With ``return_logits`` also returns the logits ``[B, max_new_tokens, V]`` each new token was
    drawn from. ``on_token(tokens [B])`` is called with each new token as soon as it is drawn
    (to show text while it is produced). Models with LM-taught CMS levels run under autograd
    inside (see the module docstring), so call this under ``torch.no_grad``, not
    ``torch.inference_mode``.
    """
    vocab_size = model.config.vocab_size
    check_ids(ids, vocab_size)
    _check_options(max_new_tokens, temperature, top_k, vocab_size, generator)
    out = ids
    step_logits = []
    teach = uses_lm_teach_signal(model)
    read = token_reader(model)
    if max_new_tokens > 0:
        if teach:
            # read all but the last prompt token (their targets are known); the last one is
            # read below like every new token, before its target is drawn
            if ids.shape[1] > 1:
                _, state = scored_forward(model, ids[:, :-1], ids[:, 1:], state, teach=True)
            pending = ids[:, -1:]
            logits, _ = model(pending, state)
        else:
            logits, state = model(ids, state)
        for step in range(max_new_tokens):
            last = logits[:, -1]
            step_logits.append(last)
            token = sample_next(last, temperature, top_k, generator)[:, None]
            out = torch.cat([out, token], dim=1)
            if on_token is not None:
                on_token(token[:, 0])
            if step + 1 == max_new_tokens:
                break
            if teach:
                # the levels learn from the pending token's loss on the token just drawn
                _, state = scored_forward(model, pending, token, state, teach=True)
                pending = token
                logits, _ = read(token, state)
            else:
                logits, state = read(token, state)
    if not return_logits:
        return out
    if step_logits:
        return out, torch.stack(step_logits, dim=1)
    dtype = next(model.parameters()).dtype
    return out, torch.zeros(ids.shape[0], 0, vocab_size, dtype=dtype, device=ids.device)
