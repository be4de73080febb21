"""NeuralMemory (Titans) and the causal depthwise conv: conv gradients against the naive path,
causality, and in-context learning down to the meta-learned initial memory. Segments = one pass
and chunkwise = naive are checked for every layer in test_streaming_contract.py."""

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.nn.conv import CausalDepthwiseConv
from nestlearn.nn.titans import NeuralMemory, NeuralMemoryConfig

DIM = 8


def make(seed=0, **overrides):
    options = dict(dim=DIM, heads=2, depth=2, expansion=2, chunk_size=4)
    options.update(overrides)
    torch.manual_seed(seed)
    return NeuralMemory(NeuralMemoryConfig(**options)).double()


def inputs(batch=2, length=11, seed=1):
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


# --- conv ---------------------------------------------------------------------------------------

def test_conv_matches_naive_and_streams():
    torch.manual_seed(0)
    conv = CausalDepthwiseConv(5, 4).double()
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    y, tail = conv(x)
    y_ref, tail_ref = conv.forward_naive(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(tail, tail_ref)
    pieces, state = [], None
    for lo, hi in ((0, 2), (2, 3), (3, 9)):
        out, state = conv(x[:, lo:hi], state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), y)
    torch.testing.assert_close(state, tail)
    changed = x.clone()
    changed[:, 6] += 1.0
    y_changed, _ = conv(changed)
    torch.testing.assert_close(y_changed[:, :6], y[:, :6])
    assert not torch.allclose(y_changed[:, 6:], y[:, 6:])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("width", [1, 4])
def test_conv_gradients_match_naive(bias, width):
    torch.manual_seed(0)
    conv = CausalDepthwiseConv(5, width, bias=bias).double()
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    tail = torch.randn(2, width - 1, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 7, 5, dtype=torch.float64)
    tail_weights = torch.randn(2, width - 1, 5, dtype=torch.float64)
    params = [x, tail, *conv.parameters()]
    grads = []
    for forward in (conv, conv.forward_naive):
        y, new_tail = forward(x, tail)
        loss = (y * weights).sum() + (new_tail * tail_weights).sum()
        grads.append(torch.autograd.grad(loss, params))
    for fast, naive in zip(*grads, strict=True):
        torch.testing.assert_close(fast, naive, rtol=1e-12, atol=1e-12)


def test_conv_tail_is_a_copy_not_a_view_of_the_segment():
    # a view would keep the whole padded segment alive for as long as the carried state
    _, tail = CausalDepthwiseConv(5, 4)(torch.randn(2, 50, 5))
    assert tail.shape == (2, 3, 5)
    assert tail.untyped_storage().nbytes() == tail.numel() * tail.element_size()


def test_conv_keeps_the_low_precision_of_autocast():
    conv = CausalDepthwiseConv(5, 4)
    x = torch.randn(2, 7, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, tail = conv(x)
    assert y.dtype == tail.dtype == torch.bfloat16
    expected, _ = conv.to(torch.bfloat16)(x)
    torch.testing.assert_close(y, expected)


def test_conv_rejects_bad_input():
    conv = CausalDepthwiseConv(5, 4)
    with pytest.raises(NestlearnError, match=r"x\.shape"):
        conv(torch.randn(2, 3, 4))
    with pytest.raises(NestlearnError, match=r"tail\.shape"):
        conv(torch.randn(2, 3, 5), torch.zeros(2, 2, 5))
    with pytest.raises(NestlearnError, match="width"):
        CausalDepthwiseConv(5, 0)


# --- NeuralMemory -------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(), dict(persistent_tokens=2, chunk_size=3)])
def test_causal(overrides):
    layer = make(**overrides)
    x = inputs(length=10)
    y, _ = layer(x)
    changed = x.clone()
    changed[:, 6] += torch.randn(DIM, dtype=torch.float64)
    y_changed, _ = layer(changed)
    torch.testing.assert_close(y_changed[:, :6], y[:, :6], rtol=0, atol=1e-13)
    assert not torch.allclose(y_changed[:, 6:], y[:, 6:])


def test_init_state_equals_no_state():
    layer = make(persistent_tokens=2)
    x = inputs()
    y, _ = layer(x)
    y_init, _ = layer(x, layer.init_state(2, dtype=torch.float64))
    torch.testing.assert_close(y_init, y, rtol=0, atol=0)


def test_memory_learns_in_context_and_grads_reach_initial_memory():
    layer = make(persistent_tokens=2)
    x = inputs(length=12)
    y, state = layer(x)
    # 2 persistent + 12 tokens = 3 full chunks of 4 then 2 pending: the memory has moved.
    assert state.memory.pending == 2
    for initial, learned in zip(layer.memory_weights, state.memory.chunk_start.weights,
                                strict=True):
        assert learned.shape == (2, *initial.shape)
        assert (learned - initial).abs().max() > 1e-6
    y.pow(2).sum().backward()
    for weight in layer.memory_weights:
        assert weight.grad is not None and weight.grad.abs().max() > 0
    assert layer.persistent.grad.abs().max() > 0
    assert layer.gates.weight.grad.abs().max() > 0


def test_memory_changes_the_output():
    # A layer whose memory never learns (eta ~ 0) reads out differently: the memory matters.
    layer = make()
    x = inputs(length=12)
    y, _ = layer(x)
    frozen = make()
    with torch.no_grad():
        frozen.gates.bias.view(3, -1)[0].fill_(-60.0)
    y_frozen, _ = frozen(x)
    torch.testing.assert_close(y[:, :4], y_frozen[:, :4], rtol=0.2, atol=0.2)
    assert (y[:, 4:] - y_frozen[:, 4:]).abs().max() > 1e-4


def test_gates_in_range():
    layer = make()
    alpha, eta, theta = layer.gate_values(inputs() * 50)
    assert ((alpha >= 0) & (alpha <= 1)).all()
    assert ((eta >= 0) & (eta <= layer.config.resolved_eta_max)).all()
    assert ((theta >= 0) & (theta <= 1)).all()
    alpha, _, theta = make(momentum=False, weight_decay=False).gate_values(inputs())
    assert theta is None and bool((alpha == 1).all())


@pytest.mark.parametrize("field, value", [
    ("dim", 0), ("heads", 3), ("head_dim", 0), ("depth", 1), ("expansion", 1.5),
    ("chunk_size", 0), ("objective", "l1"), ("activation", "elu"), ("eta_max", -1.0),
    ("persistent_tokens", -1), ("momentum", "yes"), ("conv_width", 0),
])
def test_bad_config_names_field(field, value):
    options = dict(dim=DIM, heads=2)
    options[field] = value
    with pytest.raises(NestlearnError, match=field):
        NeuralMemoryConfig(**options)


def test_bad_input_and_state():
    layer = make()
    with pytest.raises(NestlearnError, match=r"x\.shape"):
        layer(torch.randn(2, 5, DIM + 1, dtype=torch.float64))
    with pytest.raises(NestlearnError, match=r"x\.shape"):
        layer(torch.randn(2, 0, DIM, dtype=torch.float64))
    with pytest.raises(NestlearnError, match=r"x\.dtype"):
        layer(torch.ones(2, 5, DIM, dtype=torch.long))
    with pytest.raises(NestlearnError, match="state"):
        layer(inputs(), state=(1, 2))
    _, state = layer(inputs(batch=2))
    with pytest.raises(NestlearnError, match=r"state\.memory"):
        layer(inputs(batch=3), state)
    _, other = make(momentum=False)(inputs())
    with pytest.raises(NestlearnError, match="theta"):
        layer(inputs(), other)
    with pytest.raises(NestlearnError, match="config"):
        NeuralMemory(dict(dim=DIM))
