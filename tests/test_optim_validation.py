"""Bad hyperparameters and parameters fail at construction with a message naming them."""

import math

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.optim import M3, DeepMomentum, DeltaMomentum, Muon, PreconditionedMomentum

ALL = [DeltaMomentum, PreconditionedMomentum, DeepMomentum, Muon, M3]
MOMENTUM_NAME = {M3: "beta1"}


def params():
    return [torch.nn.Parameter(torch.zeros(3, 4))]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("lr", [-0.1, math.nan, math.inf, "0.1", True])
def test_bad_learning_rate(cls, lr):
    with pytest.raises(NestlearnError, match=r"^lr: got"):
        cls(params(), lr=lr)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, math.nan])
def test_momentum_outside_unit_interval(cls, value):
    name = MOMENTUM_NAME.get(cls, "momentum")
    with pytest.raises(NestlearnError, match=rf"^{name}: got .*allowed: a number in \[0, 1\)"):
        cls(params(), **{name: value})


@pytest.mark.parametrize("cls", ALL)
def test_non_leaf_parameter(cls):
    leaf = torch.zeros(3, 4, requires_grad=True)
    with pytest.raises(NestlearnError, match=r"params\[1\]: got a non-leaf tensor"):
        cls([torch.nn.Parameter(torch.zeros(2, 2)), leaf * 2])


@pytest.mark.parametrize("cls", ALL)
def test_empty_and_non_tensor_params(cls):
    with pytest.raises(NestlearnError, match="params"):
        cls([])
    with pytest.raises(NestlearnError, match=r"params\[0\]"):
        cls([3.0])


@pytest.mark.parametrize("cls", ALL)
def test_bad_group_added_later_is_rejected(cls):
    opt = cls(params())
    with pytest.raises(NestlearnError, match=r"^lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -1.0})
    with pytest.raises(NestlearnError, match=r"^fallback: got 'sgd'"):
        cls(params(), fallback="sgd")
    with pytest.raises(NestlearnError, match=r"^weight_decay"):
        cls(params(), weight_decay=-1e-3)


@pytest.mark.parametrize(("cls", "kwargs", "name"), [
    (DeltaMomentum, {"delta": 1.5}, "delta"),
    (DeltaMomentum, {"preconditioner": "kfac"}, "preconditioner"),
    (DeltaMomentum, {"delta_eps": 0.0}, "delta_eps"),
    (PreconditionedMomentum, {"beta2": 1.0}, "beta2"),
    (PreconditionedMomentum, {"eps": -1.0}, "eps"),
    (DeepMomentum, {"hidden": -1}, "hidden"),
    (DeepMomentum, {"inner_lr": math.nan}, "inner_lr"),
    (DeepMomentum, {"objective": "cosine"}, "objective"),
    (DeepMomentum, {"output": "sign"}, "output"),
    (DeepMomentum, {"activation": "relu6"}, "activation"),
    (Muon, {"ns_steps": 0}, "ns_steps"),
    (Muon, {"nesterov": 1}, "nesterov"),
    (Muon, {"ns_coefficients": "septic"}, "ns_coefficients"),
    (M3, {"frequency": 0}, "frequency"),
    (M3, {"frequency": 2.5}, "frequency"),
    (M3, {"alpha": -1.0}, "alpha"),
    (M3, {"beta3": 1.0}, "beta3"),
    (M3, {"normalize": "yes"}, "normalize"),
    (Muon, {"fallback_betas": (0.9, 1.0)}, r"fallback_betas\[1\]"),
    (Muon, {"fallback_lr": -1.0}, "fallback_lr"),
])
def test_bad_specific_options(cls, kwargs, name):
    with pytest.raises(NestlearnError, match=f"^{name}: got"):
        cls(params(), **kwargs)


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        Muon(params(), lr=-1)
