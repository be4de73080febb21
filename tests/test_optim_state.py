"""State dict round trips, closures and param groups for every optimizer."""

import copy
import io

import pytest
import torch

from nestlearn.optim import M3, DeepMomentum, DeltaMomentum, Muon, PreconditionedMomentum

OPTIMIZERS = {
    "delta": lambda p: DeltaMomentum(p, lr=0.05, delta=0.4, preconditioner="diag"),
    "preconditioned": lambda p: PreconditionedMomentum(p, lr=0.01),
    "preconditioned-adagrad": lambda p: PreconditionedMomentum(p, lr=0.01,
                                                               preconditioner="adagrad"),
    "deep": lambda p: DeepMomentum(p, lr=0.05, hidden=4),
    "deep-l2-ns": lambda p: DeepMomentum(p, lr=0.01, hidden=4, objective="l2",
                                         output="newton_schulz"),
    "muon": lambda p: Muon(p, lr=0.02),
    "m3": lambda p: M3(p, lr=1e-3, frequency=2),
    "m3-after": lambda p: M3(p, lr=1e-4, frequency=2, normalize="after"),
}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def batches(count: int):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(9, 4, generator=generator), torch.randn(9, 2, generator=generator))
            for _ in range(count)]


def train_step(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return opt.step(closure)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_continues_identically(name):
    build = OPTIMIZERS[name]
    model = make_model()
    opt = build(model.parameters())
    data = batches(7)
    for x, y in data[:3]:
        train_step(model, opt, x, y)
    # Save and load through bytes, as a checkpoint would, into a fresh optimizer.
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clone = copy.deepcopy(model)
    opt_clone = build(clone.parameters())
    opt_clone.load_state_dict(torch.load(buffer, weights_only=True))
    for x, y in data[3:]:
        loss_a = train_step(model, opt, x, y)
        loss_b = train_step(clone, opt_clone, x, y)
        assert loss_a.item() == loss_b.item()
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)
    # A fresh optimizer without the loaded state takes different steps: the state matters.
    fresh = copy.deepcopy(model)
    opt_fresh = build(fresh.parameters())
    train_step(fresh, opt_fresh, *data[0])
    train_step(model, opt, *data[0])
    pairs = zip(model.parameters(), fresh.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_closure_loss_is_returned_and_groups_keep_their_options(name):
    model = make_model()
    opt = OPTIMIZERS[name]([{"params": model[0].parameters()},
                            {"params": model[2].parameters(), "lr": 0.0,
                             "fallback_lr": 0.0}])
    frozen = [p.detach().clone() for p in model[2].parameters()]
    x, y = batches(1)[0]
    loss = train_step(model, opt, x, y)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    for a, b in zip(model[2].parameters(), frozen, strict=True):
        assert torch.equal(a, b)
    assert opt.param_groups[1]["lr"] == 0.0


def test_parameters_without_gradients_are_left_alone():
    model = make_model()
    for name, build in OPTIMIZERS.items():
        opt = build(model.parameters())
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        opt.step()
        pairs = zip(model.parameters(), before, strict=True)
        assert all(torch.equal(a, b) for a, b in pairs), name


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("fallback", ["auto", "none"])
def test_every_parameter_shape_is_handled(name, fallback):
    shapes = [(5,), (3, 4), (4, 3), (2, 3, 3, 3), (1, 1)]
    params = [torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(i)))
              for i, shape in enumerate(shapes)]
    start = [p.detach().clone() for p in params]
    opt = OPTIMIZERS[name]([{"params": params, "fallback": fallback}])
    for _ in range(3):
        opt.zero_grad()
        sum((p**3).sum() for p in params).backward()
        opt.step()
    for param, before in zip(params, start, strict=True):
        assert param.shape == before.shape
        assert torch.isfinite(param).all()
        assert not torch.equal(param, before)
    if fallback == "none":
        assert not any(key.startswith("fallback") for key in opt.state[params[0]])
