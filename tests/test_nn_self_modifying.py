"""SelfModifyingTitans: causal, inner memories that move only at their chunk ends, and
gradients that reach every meta-learned initial memory. Segments cut at any token = one pass
and chunkwise = naive are checked for every layer in test_streaming_contract.py."""

import dataclasses

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.nn.self_modifying import (
    INNER_MEMORIES,
    SelfModifyingTitans,
    SelfModifyingTitansConfig,
)
from nestlearn.ops.deep_memory import DeepMemoryState, deep_memory_apply, deep_memory_naive

DIM = 8
HEADS = 2


def make(seed=0, **overrides):
    options = dict(dim=DIM, heads=HEADS, expansion=2, inner_expansion=2, chunk_size=4,
                   inner_chunk_size=3)
    options.update(overrides)
    torch.manual_seed(seed)
    return SelfModifyingTitans(SelfModifyingTitansConfig(**options)).double()


def inputs(batch=2, length=11, seed=1):
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("position", [0, 4, 8])
def test_causal(position):
    layer = make()
    x = inputs(length=11)
    y, _ = layer(x)
    changed = x.clone()
    changed[:, position] += torch.randn(DIM, dtype=torch.float64)
    y_changed, _ = layer(changed)
    torch.testing.assert_close(y_changed[:, :position], y[:, :position], rtol=0, atol=1e-13)
    assert not torch.allclose(y_changed[:, position:], y[:, position:])


def test_inner_memories_move_only_at_their_chunk_ends():
    layer = make()
    x = inputs(length=5)
    _, state = layer(x[:, :2])  # inside the first inner chunk (3): still the initial memories
    assert state.inner.pending == 2
    for initial, current in zip(layer.inner_weights, state.inner.chunk_start.weights, strict=True):
        assert current is initial
    _, state = layer(x[:, 2:5], state)  # crosses the boundary at token 3
    assert state.inner.pending == 2
    for index, (initial, current) in enumerate(
            zip(layer.inner_weights, state.inner.chunk_start.weights, strict=True)):
        moved = (current - initial).abs().amax(dim=(0, 2, 3))  # per stacked head
        assert bool((moved > 1e-8).all()), f"inner layer {index}: {moved}"


def test_inner_memories_shape_later_chunks():
    # Tokens of the second inner chunk are produced by the updated memories: with every
    # inner learning rate ~ 0 they would differ.
    layer = make()
    frozen = make()
    with torch.no_grad():
        frozen.eta_bias.fill_(-60.0)
    x = inputs(length=9)
    y, _ = layer(x)
    y_frozen, _ = frozen(x)
    assert (y[:, 3:] - y_frozen[:, 3:]).abs().max() > 1e-5


def test_gradients_reach_every_meta_learned_initial_memory():
    layer = make()
    y, _ = layer(inputs(length=10))
    y.pow(2).sum().backward()
    heads = HEADS
    for weight in layer.inner_weights:
        for index, name in enumerate(INNER_MEMORIES):
            grad = weight.grad[index * heads:(index + 1) * heads]
            assert grad.abs().max() > 0, name
    for weight in layer.memory_weights:
        assert weight.grad.abs().max() > 0
    for name in ("eta_readout", "alpha_readout", "eta_bias", "alpha_bias"):
        assert getattr(layer, name).grad.abs().max() > 0, name


def test_init_state_equals_no_state():
    layer = make()
    x = inputs()
    y, _ = layer(x)
    y_init, _ = layer(x, layer.init_state(2, dtype=torch.float64))
    torch.testing.assert_close(y_init, y, rtol=0, atol=0)


@pytest.mark.parametrize("field, value", [
    ("dim", 0), ("heads", 3), ("depth", 1), ("inner_depth", 1), ("chunk_size", 0),
    ("inner_chunk_size", 0), ("activation", "elu"), ("eta_max", 0.0), ("dgd", 1),
    ("input_projection", "no"), ("memory_target", "v_hat"), ("normalize_inputs", None),
])
def test_bad_config_names_field(field, value):
    options = dict(dim=DIM, heads=HEADS)
    options[field] = value
    with pytest.raises(NestlearnError, match=field):
        SelfModifyingTitansConfig(**options)


def test_input_projection_off_needs_matching_width():
    with pytest.raises(NestlearnError, match="input_projection"):
        SelfModifyingTitansConfig(dim=DIM, heads=HEADS, head_dim=3, input_projection=False)


def test_bad_input_and_state():
    layer = make()
    with pytest.raises(NestlearnError, match=r"x\.shape"):
        layer(torch.randn(2, 5, DIM + 1, dtype=torch.float64))
    with pytest.raises(NestlearnError, match=r"x\.shape"):
        layer(torch.randn(2, 0, DIM, dtype=torch.float64))
    with pytest.raises(NestlearnError, match="state"):
        layer(inputs(), state={"memory": None})
    _, state = layer(inputs(batch=2))
    with pytest.raises(NestlearnError, match=r"state\.inner"):
        layer(inputs(batch=3), state)
    _, other = make(momentum=False)(inputs())
    with pytest.raises(NestlearnError, match="theta"):
        layer(inputs(), other)
    _, other = make(inner_chunk_size=8)(inputs(length=7))
    with pytest.raises(NestlearnError, match=r"state\.inner"):
        layer(inputs(), other)
    _, other = make(conv=False)(inputs())
    with pytest.raises(NestlearnError, match=r"state\.conv_tail"):
        layer(inputs(), other)


def test_default_memories_stay_bounded_on_a_long_stream():
    # Self-generated targets M(v) feed the memories' own scale back to them; with unit-norm
    # inputs the default gates reach a steady size (unnormalized inputs blow up to inf here).
    torch.manual_seed(0)
    layer = SelfModifyingTitans(SelfModifyingTitansConfig(dim=32, chunk_size=16,
                                                          inner_chunk_size=16))
    x = torch.randn(1, 1024, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_half, half = layer(x[:, :512])
        y_end, end = layer(x[:, 512:], half)
    assert torch.isfinite(y_half).all() and torch.isfinite(y_end).all()
    for middle, last in zip(half.inner.chunk_start.weights, end.inner.chunk_start.weights,
                            strict=True):
        assert last.norm() < 1.5 * middle.norm()


def test_inner_update_regresses_each_memory_on_its_own_targets():
    # Rebuild the first inner chunk's update by hand, one memory at a time, with the
    # token-by-token op: keys k = normalize(M_k(x^k)), targets v_hat_* = M_*(v), v = M_v(x^v).
    layer = make()
    size = layer.config.inner_chunk_size
    x = inputs(length=size)
    _, state = layer(x)
    assert state.inner.pending == 0
    _, reads, _ = layer._features(x, None)
    per_memory = [tuple(w[i * HEADS:(i + 1) * HEADS] for w in layer.inner_weights)
                  for i in range(len(INNER_MEMORIES))]
    outputs = [deep_memory_apply(weights, reads[:, :, i * HEADS:(i + 1) * HEADS])
               for i, weights in enumerate(per_memory)]
    k = torch.nn.functional.normalize(outputs[0], dim=-1)
    v = outputs[1]
    eta = layer.config.resolved_inner_eta_max * torch.sigmoid(
        (outputs[2] * layer.eta_readout).sum(-1) + layer.eta_bias)
    alpha = torch.sigmoid((outputs[3] * layer.alpha_readout).sum(-1) + layer.alpha_bias)
    theta = torch.sigmoid(layer.theta(x))
    for i, weights in enumerate(per_memory):
        targets = deep_memory_apply(weights, v)
        _, expected = deep_memory_naive(k, k, targets, alpha, eta, theta,
                                        initial_state=DeepMemoryState(weights), dgd=True,
                                        output_final_state=True, chunk_size=size)
        for got, want in zip(state.inner.chunk_start.weights, expected.weights, strict=True):
            torch.testing.assert_close(got[:, i * HEADS:(i + 1) * HEADS], want,
                                       rtol=1e-10, atol=1e-12, msg=INNER_MEMORIES[i])


def test_self_target_main_memory_learns_its_own_output_of_v():
    # memory_target="self": the pending values of the main memory's current chunk are
    # M_memory(v_t) with the memory at the chunk's start, not v_t itself.
    layer = make(memory_target="self")
    plain = make(memory_target="v")
    x = inputs(length=6)  # one main chunk of 4, then 2 pending tokens
    _, state = layer(x)
    _, plain_state = plain(x)
    assert state.memory.pending == 2
    chunk_start = state.memory.chunk_start
    v = plain_state.memory.values  # same parameters, so the same generated v_t
    expected = deep_memory_apply(chunk_start.weights, v)
    torch.testing.assert_close(state.memory.values, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(state.memory.values, v)


def run_with_grads(layer, x, lengths):
    """Outputs, final state and gradients (input, every parameter, final state's tensors
    reached through a probe loss) of ``layer`` over ``x`` cut into ``lengths``."""
    x = x.clone().requires_grad_()
    outputs, state, start = [], None, 0
    for size in lengths:
        y, state = layer(x[:, start:start + size], state)
        outputs.append(y)
        start += size
    y = torch.cat(outputs, 1)
    leaves = [t for t in (*state.inner.chunk_start.weights, *state.memory.chunk_start.weights,
                          *(state.inner.chunk_start.momentum or ()),
                          *(state.memory.chunk_start.momentum or ()))]
    loss = y.pow(2).sum() + sum((t * t.detach().sin()).sum() for t in leaves)
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    return y, state, grads


def assert_same_runs(layer, reference, x, lengths):
    """Equal outputs, final state and gradients (float64) of two layers over ``x`` cut into
    ``lengths``."""
    y, state, grads = run_with_grads(layer, x, lengths)
    y_ref, state_ref, grads_ref = run_with_grads(reference, x, lengths)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.utils._pytree.tree_leaves(state),
                         torch.utils._pytree.tree_leaves(state_ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    names = ["input", *(name for name, _ in layer.named_parameters())]
    for name, got, want in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)


def separate_only(layer, monkeypatch):
    """The layer with its stacked path switched off (every token through the separate ops,
    the inner memories piece by piece: none of the helpers the fused paths share)."""
    monkeypatch.setattr(layer, "_stacked_span", lambda inner, memory, length: (0, 0, length))
    return pieces_only(layer, monkeypatch)


def pieces_only(layer, monkeypatch):
    """The layer with its fused inner chunks switched off (every inner chunk through
    ``_run_inner_pieces``: read, append, ``_inner_update``)."""
    monkeypatch.setattr(layer, "_run_inner_chunks", layer._run_inner_pieces)
    return layer


@pytest.mark.parametrize("overrides", [
    {},
    {"momentum": False, "weight_decay": False, "dgd": False},
    {"memory_target": "v", "normalize_values": True},
    {"adaptive_q": True},
    {"adaptive_k": False, "adaptive_v": False, "activation": "silu", "depth": 3,
     "inner_depth": 3},
])
@pytest.mark.parametrize("lengths", [(13,), (2, 9, 2), (4, 8)])
def test_stacked_memories_equal_separate_ops(overrides, lengths, monkeypatch):
    # equal chunks and shapes: whole chunks run as one stacked memory; the separate per-memory
    # path must give the same outputs, state and gradients (float64)
    options = {"inner_chunk_size": 4, **overrides}
    stacked = make(**options)
    separate = separate_only(make(**options), monkeypatch)
    assert stacked._stacked_span(stacked.init_state(2).inner, stacked.init_state(2).memory,
                                 13)[1] == 12
    assert_same_runs(stacked, separate, inputs(length=sum(lengths)), lengths)


@pytest.mark.parametrize("overrides", [
    {},
    {"momentum": False, "weight_decay": False, "dgd": False},
    {"memory_target": "v", "normalize_values": True},
    {"adaptive_q": True},
    {"adaptive_k": False, "adaptive_v": False, "activation": "silu", "inner_depth": 3},
])
@pytest.mark.parametrize("lengths", [(13,), (2, 9, 2), (4, 8), (1, 1, 5, 6)])
def test_fused_inner_chunks_equal_the_inner_pieces(overrides, lengths, monkeypatch):
    # inner chunk 3 under a main chunk of 4 (not stacked): whole inner chunks take one fused
    # step each; reading, appending and updating piece by piece must give the same outputs,
    # state and gradients (float64)
    fused = make(**overrides)
    calls = []
    run_chunks = fused._run_inner_chunks

    def counted(reads, theta, state):
        calls.append(reads.shape[1])
        return run_chunks(reads, theta, state)

    monkeypatch.setattr(fused, "_run_inner_chunks", counted)
    pieces = pieces_only(make(**overrides), monkeypatch)
    assert_same_runs(fused, pieces, inputs(length=sum(lengths)), lengths)
    assert calls and all(size % 3 == 0 for size in calls)


def test_stacked_path_only_where_chunks_and_shapes_agree():
    state = make().init_state(1)
    assert make()._stacked_span(state.inner, state.memory, 12) == (0, 0, 12)  # chunks 4 and 3
    assert make(inner_chunk_size=4, expansion=3)._stacked_span(
        state.inner, state.memory, 12) == (0, 0, 12)
    assert make(inner_chunk_size=4, readout="chunk_start")._stacked_span(
        state.inner, state.memory, 12) == (0, 0, 12)
    layer = make(inner_chunk_size=4)
    _, partial = layer(inputs(batch=1, length=3))
    assert layer._stacked_span(partial.inner, partial.memory, 10) == (1, 8, 1)
    assert layer._stacked_span(partial.inner, partial.memory, 2) == (1, 0, 1)


def test_an_inner_state_from_before_the_once_per_head_layout_is_refused_with_a_hint():
    # before, the inner state's pending keys had one copy per inner memory (4 x the heads)
    layer = make()
    state = layer.init_state(2)
    keys = state.inner.keys
    older = dataclasses.replace(state.inner, keys=keys.new_zeros(2, 0, 4 * keys.shape[2],
                                                                  keys.shape[3]))
    with pytest.raises(NestlearnError, match=r"state\.inner\.keys\.shape: .*start a fresh state"):
        layer(inputs(length=3), dataclasses.replace(state, inner=older))
