"""bf16 / fp16 without autocast (a model cast with ``.to(torch.bfloat16)``): the memory ops
compute in float32 and return the dtype they were given (nestlearn.ops._precision), so no
raw torch error escapes from a kernel with no bf16/fp16 form (the CPU triangular solve)."""

from __future__ import annotations

import pytest
import torch

import test_ops_autocast as autocast_cases
from model_cases import ARCHS_WIRED, random_ids, tiny_config
from nestlearn.errors import NestlearnError
from nestlearn.models import build_model
from nestlearn.ops import gated_delta_rule
from test_ops_autocast import OPS, _call, _inputs, _weights

LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", OPS)
def test_op_in_low_precision_equals_float32_op_in_that_dtype(name, dtype, monkeypatch):
    x = {key: value.to(dtype) for key, value in _inputs().items()}
    weights = _weights()
    # the deep memories' initial weights are part of the call: give them in the same dtype
    monkeypatch.setattr(autocast_cases, "_weights", lambda: tuple(w.to(dtype) for w in weights))
    out = _call(name, x)
    assert out.dtype == dtype
    monkeypatch.setattr(autocast_cases, "_weights",
                        lambda: tuple(w.to(dtype).float() for w in weights))
    expected = _call(name, {key: value.float() for key, value in x.items()})
    assert expected.dtype == torch.float32
    assert torch.equal(out, expected.to(dtype))


def test_low_precision_states_come_back_in_that_dtype_and_gradients_flow():
    x = {key: value.requires_grad_() for key, value in _inputs().items()}
    memory = torch.zeros(2, 2, 8, 8, dtype=torch.bfloat16)
    out, final = gated_delta_rule(x["q"], x["k"], x["v"], x["alpha"], x["eta"],
                                  initial_state=memory, output_final_state=True, chunk_size=4)
    assert out.dtype == final.dtype == torch.bfloat16
    # the returned state streams into the next call (its dtype matches q's)
    again, _ = gated_delta_rule(x["q"], x["k"], x["v"], x["alpha"], x["eta"],
                                initial_state=final, chunk_size=4)
    (out.float().sum() + again.float().sum()).backward()
    for name in ("q", "k", "v", "alpha", "eta"):
        grad = x[name].grad
        assert grad is not None and grad.dtype == torch.bfloat16, name
        assert torch.isfinite(grad.float()).all() and grad.abs().sum() > 0, name


def test_mixed_dtypes_are_still_refused_by_the_op():
    x = _inputs()
    with pytest.raises(NestlearnError, match=r"initial_state.dtype: got torch.float32"):
        gated_delta_rule(x["q"], x["k"], x["v"], x["alpha"], x["eta"],
                         initial_state=torch.zeros(2, 2, 8, 8), chunk_size=4)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("arch", ARCHS_WIRED)
def test_every_model_cast_to_low_precision_runs_on_cpu(arch, dtype):
    torch.manual_seed(0)
    reference = build_model(tiny_config(arch))
    model = build_model(tiny_config(arch))
    model.load_state_dict(reference.state_dict())
    model.to(dtype)
    ids = random_ids(2, 12)
    logits, state = model(ids[:, :6])
    more, _ = model(ids[:, 6:], state)  # the state it returned streams on in its dtype
    assert logits.dtype == more.dtype == dtype
    expected, _ = reference(ids[:, :6])
    # the same model in float32: low precision rounds, it does not change the function
    assert torch.allclose(logits.float(), expected, atol=0.15, rtol=0.05)
    assert torch.isfinite(more.float()).all()
    if dtype == torch.float16:
        return  # fp16 backward needs loss scaling (a Transformer's overflows without it)
    loss = torch.nn.functional.cross_entropy(
        torch.cat([logits, more], 1).float().flatten(0, 1), ids.flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == dtype and torch.isfinite(g.float()).all() for g in grads)
