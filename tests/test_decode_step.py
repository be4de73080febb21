"""Per-token decoding: a one-token segment steps the deep memory from its current state
(``deep_memory_token_step``) instead of replaying the chunk's pending tokens, and equals the
full forward over the same tokens (float64), inside chunks and across their ends."""

from __future__ import annotations

import pytest
import torch

from model_cases import random_ids, tiny_model
from nestlearn.nn import memory_stream
from nestlearn.ops.deep_memory import (
    DeepMemoryState,
    deep_memory,
    deep_memory_token_step,
    init_deep_memory_weights,
)

HEADS, DIM = 2, 4


def memory_inputs(length: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    q, k, v = (torch.nn.functional.normalize(rand(2, length, HEADS, DIM) - 0.5, dim=-1)
               for _ in range(3))
    return q, k, v, 0.8 + 0.2 * rand(2, length, HEADS), 0.5 * rand(2, length, HEADS), \
        rand(2, length, HEADS)


@pytest.mark.parametrize("options", [
    {"objective": "l2", "dgd": True, "momentum": True, "depth": 2},
    {"objective": "l2", "dgd": False, "momentum": False, "depth": 3},
    {"objective": "dot", "dgd": False, "momentum": True, "depth": 2, "activation": "silu"},
])
def test_token_steps_equal_the_chunkwise_op(options):
    # tokens of a chunk stepped one at a time from the chunk start: the outputs and the state
    # after every token equal deep_memory over the chunk's tokens so far
    options = dict(options)
    momentum, depth = options.pop("momentum"), options.pop("depth")
    q, k, v, alpha, eta, theta = memory_inputs(5)
    theta = theta if momentum else None
    weights = tuple(w.double() for w in init_deep_memory_weights(
        HEADS, DIM, 3 * DIM, depth, generator=torch.Generator().manual_seed(1)))
    start = DeepMemoryState(weights, None)
    current = start
    for t in range(5):
        token = slice(t, t + 1)
        o, current = deep_memory_token_step(
            start, current, q[:, token], k[:, token], v[:, token], alpha[:, token],
            eta[:, token], None if theta is None else theta[:, token], **options)
        o_ref, state_ref = deep_memory(
            q[:, :t + 1], k[:, :t + 1], v[:, :t + 1], alpha[:, :t + 1], eta[:, :t + 1],
            None if theta is None else theta[:, :t + 1], initial_state=start,
            output_final_state=True, chunk_size=5, **options)
        torch.testing.assert_close(o, o_ref[:, t:], rtol=1e-10, atol=1e-12)
        for got, want in zip(torch.utils._pytree.tree_leaves(current),
                             torch.utils._pytree.tree_leaves(state_ref), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("arch", "overrides"), [
    ("titans", {}),
    ("titans-mag", {}),
    ("hope", {}),
    ("hope", {"chunk": 4}),  # equal chunks: the prompt runs the stacked memories
    ("hope-attention", {}),
])
@pytest.mark.parametrize("prompt", [1, 4, 6])
def test_decoding_token_by_token_equals_the_full_forward(arch, overrides, prompt,
                                                         monkeypatch):
    model = tiny_model(arch, **overrides).eval()
    steps = []
    original = memory_stream.deep_memory_token_step
    monkeypatch.setattr(memory_stream, "deep_memory_token_step",
                        lambda *a, **k: steps.append(1) or original(*a, **k))
    ids = random_ids(2, prompt + 9)  # nine decoded tokens cross at least two chunk ends
    with torch.no_grad():
        full, _ = model(ids)
        logits, state = model(ids[:, :prompt])
        pieces = [logits]
        for t in range(prompt, ids.shape[1]):
            logits, state = model(ids[:, t:t + 1], state)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-9, atol=1e-11)
    uses_memory = arch != "hope-attention"
    assert bool(steps) == uses_memory
