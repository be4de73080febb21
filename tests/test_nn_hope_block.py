"""HOPEBlock = self-modifying Titans + CMS: causal and trainable down to every meta-learned
initial state. Segments = one pass and chunkwise = naive are checked for every layer in
test_streaming_contract.py."""

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


def inputs(batch=2, length=11, seed=1):
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def test_causal():
    block = make()
    x = inputs()
    y, _ = block(x)
    changed = x.clone()
    changed[:, 6] += 1.0
    y_changed, _ = block(changed)
    torch.testing.assert_close(y_changed[:, :6], y[:, :6], rtol=0, atol=1e-13)
    assert not torch.allclose(y_changed[:, 6:], y[:, 6:])


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


def test_both_hope_blocks_exported_from_nn():
    import nestlearn.nn
    from nestlearn.nn.hope_attention import HOPEAttentionBlock

    assert nestlearn.nn.HOPEBlock is HOPEBlock
    assert nestlearn.nn.HOPEAttentionBlock is HOPEAttentionBlock


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
