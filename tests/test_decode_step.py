"""Per-token decoding: a one-token segment steps the deep memory from its current state
(``deep_memory_token_step``) instead of replaying the chunk's pending tokens, and equals the
full forward over the same tokens (float64), inside chunks and across their ends."""

from __future__ import annotations

import pytest
import torch

from model_cases import random_ids, tiny_config, tiny_model
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


@pytest.mark.parametrize("arch", ["titans", "titans-mag", "hope", "hope-attention"])
def test_state_after_one_token_steps_equals_one_segment_and_survives_saving(arch):
    # The state after N one-token forwards (decoding: per-token memory steps, pending tokens
    # appended one at a time) equals the state after one N-token segment, leaf by leaf; saved
    # as a plain tree and rebuilt, it decodes the next tokens as the unsaved state does.
    from nestlearn import treeio
    from nestlearn.training.carried_state import state_to_tree, tree_from_state_tree

    model = tiny_model(arch).eval()
    ids = random_ids(2, 16)
    prompt, steps = 3, 9  # the steps cross inner and main chunk ends
    with torch.no_grad():
        _, start = model(ids[:, :prompt])
        _, segment = model(ids[:, prompt:prompt + steps], start)
        stepped = start
        for t in range(prompt, prompt + steps):
            _, stepped = model(ids[:, t:t + 1], stepped)
        leaves = torch.utils._pytree.tree_leaves
        assert len(leaves(stepped)) == len(leaves(segment))
        for got, want in zip(leaves(stepped), leaves(segment), strict=True):
            if isinstance(want, torch.Tensor):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
            else:
                assert got == want
        skeleton, tensors = treeio.flatten(state_to_tree(stepped), "state")
        restored = tree_from_state_tree(treeio.unflatten(skeleton, tensors))
        after, state_after = stepped, stepped
        for t in range(prompt + steps, ids.shape[1]):
            want_logits, after = model(ids[:, t:t + 1], after)
            got_logits, state_after = model(ids[:, t:t + 1], restored)
            restored = state_after
            torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=0)


def test_hope_inner_pending_tokens_are_kept_once_for_all_inner_memories():
    # The inner memories' pending k, v and gates are stored once ([B, r, H, ...]), not per
    # inner memory: their self-generated targets are made at the chunk's end.
    config = tiny_config("hope").memory
    model = tiny_model("hope").eval()
    pending = config.inner_chunk_size - 1
    ids = random_ids(2, config.inner_chunk_size + pending)
    with torch.no_grad():
        _, state = model(ids[:, :-1])
        _, state = model(ids[:, -1:], state)  # a decoded token: the chunk's last pending one
    inner = state.blocks[0].titans.inner
    assert inner.chunk_start.weights[0].shape[-3] == 4 * config.heads
    assert inner.keys.shape == inner.values.shape == (2, pending, config.heads, config.head_dim)
    assert inner.alpha.shape == inner.eta.shape == inner.theta.shape == (2, pending,
                                                                        config.heads)
