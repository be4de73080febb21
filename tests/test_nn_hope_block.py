"""HOPEBlock = self-modifying Titans + CMS: exact against the naive path, causal, streamable in
segments cut anywhere, and trainable down to every meta-learned initial state."""

import dataclasses

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.nn.cms import CMSConfig
from nestlearn.nn.hope_block import HOPEBlock, HOPEBlockState
from nestlearn.nn.self_modifying import SelfModifyingTitansConfig

DIM = 8


def configs(**titans):
    options = dict(dim=DIM, heads=2, expansion=2, inner_expansion=2, chunk_size=4,
                   inner_chunk_size=3)
    options.update(titans)
    cms = CMSConfig(dim=DIM, chunk_sizes=(2, 5), hidden=16, inner_lr=0.05, init_std=0.3)
    return SelfModifyingTitansConfig(**options), cms


def make(seed=0, **titans):
    torch.manual_seed(seed)
    return HOPEBlock(*configs(**titans)).double()


def naive_twin(block):
    titans = dataclasses.replace(block.titans.config, use_naive=True)
    twin = HOPEBlock(titans, block.cms.config).double()
    twin.load_state_dict(block.state_dict())
    return twin


def inputs(batch=2, length=11, seed=1):
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def state_tensors(state):
    titans = state.titans
    tensors = []
    for chunked in (titans.inner, titans.memory):
        tensors += [*chunked.chunk_start.weights, chunked.keys, chunked.values, chunked.eta]
        if chunked.chunk_start.momentum is not None:
            tensors += list(chunked.chunk_start.momentum)
    for level in state.cms.levels:
        tensors += list(level.weights)
        if level.accumulator is not None:
            tensors += list(level.accumulator)
    return tensors


def assert_states_close(a, b):
    assert a.titans.position == b.titans.position
    assert a.cms.position == b.cms.position
    ta, tb = state_tensors(a), state_tensors(b)
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_fast_equals_naive_outputs_state_and_gradients():
    fast = make()
    naive = naive_twin(fast)
    x = inputs()
    y_fast, s_fast = fast(x)
    y_naive, s_naive = naive(x)
    torch.testing.assert_close(y_fast, y_naive, rtol=1e-10, atol=1e-12)
    assert_states_close(s_fast, s_naive)
    weights = torch.linspace(-1, 1, y_fast.numel(), dtype=torch.float64).view_as(y_fast)
    (y_fast * weights).sum().backward()
    (y_naive * weights).sum().backward()
    for (name, p_fast), p_naive in zip(fast.named_parameters(), naive.parameters(),
                                       strict=True):
        assert (p_fast.grad is None) == (p_naive.grad is None), name
        if p_fast.grad is not None:
            torch.testing.assert_close(p_fast.grad, p_naive.grad, rtol=1e-9, atol=1e-11,
                                       msg=name)


def test_causal():
    block = make()
    x = inputs()
    y, _ = block(x)
    changed = x.clone()
    changed[:, 6] += 1.0
    y_changed, _ = block(changed)
    torch.testing.assert_close(y_changed[:, :6], y[:, :6], rtol=0, atol=1e-13)
    assert not torch.allclose(y_changed[:, 6:], y[:, 6:])


@pytest.mark.parametrize("cuts", [(1, 2, 6, 7, 9), (4,), (5,), tuple(range(1, 11))])
def test_segments_cut_anywhere_equal_one_pass(cuts):
    block = make()
    x = inputs()
    y, final = block(x)
    pieces, state = [], None
    for lo, hi in zip((0, *cuts), (*cuts, 11), strict=True):
        out, state = block(x[:, lo:hi], state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), y, rtol=1e-10, atol=1e-12)
    assert_states_close(state, final)


def test_init_state_equals_no_state():
    block = make()
    x = inputs()
    y, _ = block(x)
    y_init, _ = block(x, block.init_state(2, dtype=torch.float64))
    torch.testing.assert_close(y_init, y, rtol=0, atol=0)


def test_gradients_reach_meta_learned_initial_states():
    block = make()
    y, state = block(inputs())
    assert isinstance(state, HOPEBlockState)
    y.pow(2).sum().backward()
    for weight in (*block.titans.inner_weights, *block.titans.memory_weights):
        assert weight.grad is not None and weight.grad.abs().max() > 0
    for level in range(block.cms.config.num_levels):
        for weight in block.cms.initial_weights(level):
            assert weight.grad is not None and weight.grad.abs().max() > 0
    assert block.norm.weight.grad.abs().max() > 0


def test_reexported_from_nn_hope():
    from nestlearn.nn import hope

    assert hope.HOPEBlock is HOPEBlock


def test_bad_config_and_input():
    titans, _ = configs()
    with pytest.raises(NestlearnError, match=r"cms\.dim"):
        HOPEBlock(titans, CMSConfig(dim=DIM + 1))
    with pytest.raises(NestlearnError, match="titans"):
        HOPEBlock(dict(dim=DIM), CMSConfig(dim=DIM))
    block = make()
    with pytest.raises(NestlearnError, match=r"x\.shape"):
        block(torch.randn(2, 3, DIM + 1, dtype=torch.float64))
    with pytest.raises(NestlearnError, match="state"):
        block(inputs(), state=block.titans.init_state(2, dtype=torch.float64))
    _, state = block(inputs(batch=2))
    with pytest.raises(NestlearnError, match="state"):
        block(inputs(batch=3), state)
