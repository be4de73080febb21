"""Clipping that checks the gradients for NaN/Inf through their total norm: the same norm and
clipped gradients as ``clip_grad_norm_``, the bad gradient named with nothing changed, and no
per-tensor check (nor its host read) while the norm is finite."""

from __future__ import annotations

import pytest
import torch

from host_reads import ReadCounter
from nestlearn.training import grad_norm
from nestlearn.training.grad_norm import NORM_OVERFLOW, clip_finite_gradients


def model_with_gradients(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2),
                                torch.nn.Linear(2, 2)).to(dtype)
    model[3].weight.requires_grad_(False)  # a parameter without a gradient is left out
    (model(torch.randn(5, 3, dtype=dtype)) * 40).square().sum().backward()
    return model


def gradients(model: torch.nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def without_torch_helpers(monkeypatch) -> None:
    """The torch < 2.6 path: no ``get_total_norm`` / ``clip_grads_with_norm_``."""
    for name in ("get_total_norm", "clip_grads_with_norm_"):
        monkeypatch.delattr(torch.nn.utils, name, raising=False)


@pytest.mark.parametrize("helpers", ["torch", "fallback"])
@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e9])
def test_norm_and_clipped_gradients_equal_clip_grad_norm(monkeypatch, helpers, max_norm):
    reference = model_with_gradients()
    expected_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in reference.parameters() if p.grad is not None],
        max_norm if max_norm > 0 else float("inf"))
    if helpers == "fallback":
        without_torch_helpers(monkeypatch)
    model = model_with_gradients()
    norm, where = clip_finite_gradients(model, max_norm)
    assert where is None
    assert norm == pytest.approx(float(expected_norm), rel=1e-14)
    assert norm > 0.5  # so that clipping to 0.5 changes the gradients
    for got, want in zip(gradients(model), gradients(reference), strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("helpers", ["torch", "fallback"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_bad_gradient_is_named_and_nothing_is_changed(monkeypatch, helpers, bad):
    if helpers == "fallback":
        without_torch_helpers(monkeypatch)
    model = model_with_gradients()
    model[2].bias.grad[1] = bad
    before = gradients(model)
    norm, where = clip_finite_gradients(model, 0.5)
    assert where == "gradient of 2.bias"
    assert norm != norm or norm == float("inf")
    for got, want in zip(gradients(model), before, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("helpers", ["torch", "fallback"])
def test_an_overflowing_norm_of_finite_gradients_stops_too(monkeypatch, helpers):
    if helpers == "fallback":
        without_torch_helpers(monkeypatch)
    model = model_with_gradients(torch.float32)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.fill_(1e30)  # finite, but its square is not in float32
    before = gradients(model)
    norm, where = clip_finite_gradients(model, 1.0)
    assert where == NORM_OVERFLOW
    assert norm == float("inf")
    assert all(torch.equal(g, w) for g, w in zip(gradients(model), before, strict=True)
               if g is not None)


def test_finite_gradients_take_one_host_read_and_no_per_tensor_check(monkeypatch):
    model = model_with_gradients()

    def per_tensor_check(_model):
        raise AssertionError("the per-tensor check ran although the norm is finite")

    monkeypatch.setattr(grad_norm, "nonfinite_gradient", per_tensor_check)
    reads = ReadCounter(monkeypatch)
    clip_finite_gradients(model, 0.5)
    assert reads.count == 1


def test_no_gradients_give_a_zero_norm():
    model = torch.nn.Linear(2, 2)
    assert clip_finite_gradients(model, 1.0) == (0.0, None)
