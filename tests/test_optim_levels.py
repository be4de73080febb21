"""Multi-frequency levels: period 1 is plain stepping, period C applies the gathered gradient."""

import copy

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.optim import DeltaMomentum, MultiFrequency, level_param_groups


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 2)).double()


def batches(count: int):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(9, 4, generator=generator, dtype=torch.float64),
             torch.randn(9, 2, generator=generator, dtype=torch.float64)) for _ in range(count)]


def train_step(model, opt, x, y):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("make_inner", [
    lambda p: torch.optim.AdamW(p, lr=0.01),
    lambda p: DeltaMomentum(p, lr=0.05, delta=0.3),
])
def test_period_one_equals_plain_stepping(make_inner):
    plain, leveled = make_model(), make_model()
    opt_plain = make_inner(plain.parameters())
    opt_leveled = MultiFrequency(make_inner(leveled.parameters()), periods=[1])
    for x, y in batches(5):
        train_step(plain, opt_plain, x, y)
        train_step(leveled, opt_leveled, x, y)
    for a, b in zip(plain.parameters(), leveled.parameters(), strict=True):
        assert torch.equal(a, b)


def test_slow_level_moves_only_at_boundaries_by_the_summed_gradient():
    model = make_model()
    fast, slow = model[0], model[2]
    groups = level_param_groups([(fast.parameters(), 1), (slow.parameters(), 3)])
    opt = MultiFrequency(torch.optim.SGD(groups, lr=0.1))
    reference = copy.deepcopy(model)
    ref_fast = torch.optim.SGD(reference[0].parameters(), lr=0.1)
    gathered = [torch.zeros_like(p) for p in reference[2].parameters()]
    for step, (x, y) in enumerate(batches(7), start=1):
        slow_before = [p.detach().clone() for p in slow.parameters()]
        train_step(model, opt, x, y)
        # Reference: fast layer by plain SGD, slow layer by hand from gathered gradients.
        ref_fast.zero_grad()
        for p in reference[2].parameters():
            p.grad = None
        torch.nn.functional.mse_loss(reference(x), y).backward()
        ref_fast.step()
        with torch.no_grad():
            for total, p in zip(gathered, reference[2].parameters(), strict=True):
                total += p.grad
                if step % 3 == 0:
                    p -= 0.1 * total
                    total.zero_()
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
        moved = any(not torch.equal(a, b)
                    for a, b in zip(slow.parameters(), slow_before, strict=True))
        assert moved == (step % 3 == 0)


def test_mean_reduction_divides_by_the_period():
    model_sum, model_mean = make_model(), make_model()
    opt_sum = MultiFrequency(torch.optim.SGD(model_sum.parameters(), lr=0.1), [2])
    opt_mean = MultiFrequency(torch.optim.SGD(model_mean.parameters(), lr=0.2), [2],
                              reduction="mean")
    for x, y in batches(4):
        train_step(model_sum, opt_sum, x, y)
        train_step(model_mean, opt_mean, x, y)
    for a, b in zip(model_sum.parameters(), model_mean.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_user_gradients_are_restored_after_a_hidden_step():
    model = make_model()
    opt = MultiFrequency(torch.optim.SGD(model.parameters(), lr=0.1), [4])
    x, y = batches(1)[0]
    train_step(model, opt, x, y)
    assert all(p.grad is not None for p in model.parameters())


def test_state_dict_round_trip_continues_identically():
    model = make_model()
    groups = level_param_groups([(model[0].parameters(), 2), (model[2].parameters(), 3)])
    opt = MultiFrequency(torch.optim.Adam(groups, lr=0.01))
    data = batches(8)
    for x, y in data[:4]:
        train_step(model, opt, x, y)
    clone = copy.deepcopy(model)
    groups = level_param_groups([(clone[0].parameters(), 1), (clone[2].parameters(), 1)])
    opt_clone = MultiFrequency(torch.optim.Adam(groups, lr=0.5))
    opt_clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert [g["period"] for g in opt_clone.param_groups] == [2, 3]
    for x, y in data[4:]:
        train_step(model, opt, x, y)
        train_step(clone, opt_clone, x, y)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lr_scheduler_sees_the_shared_groups():
    model = make_model()
    opt = MultiFrequency(torch.optim.SGD(model.parameters(), lr=1.0), [2])
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batches(1)[0]
    train_step(model, opt, x, y)
    scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"periods": [0]}, "periods"),
    ({"periods": [1.5]}, "periods"),
    ({"periods": [1, 2]}, "periods"),
    ({"reduction": "max"}, "reduction"),
])
def test_bad_levels_are_rejected(kwargs, name):
    model = make_model()
    with pytest.raises(NestlearnError, match=name):
        MultiFrequency(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_bad_period_in_groups_and_wrapped_twice_are_rejected():
    model = make_model()
    with pytest.raises(NestlearnError, match="period"):
        level_param_groups([(model.parameters(), 0)])
    with pytest.raises(NestlearnError, match="period"):
        MultiFrequency(torch.optim.SGD([{"params": model.parameters(), "period": -2}], lr=0.1))
    wrapped = MultiFrequency(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(NestlearnError, match="optimizer"):
        MultiFrequency(wrapped)
    with pytest.raises(NestlearnError, match="optimizer"):
        MultiFrequency(model)


def test_gathered_gradient_is_applied_even_without_a_gradient_at_the_boundary():
    weight = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = MultiFrequency(torch.optim.SGD([weight], lr=1.0), [2])
    weight.grad = torch.ones(2, 2, dtype=torch.float64)
    opt.step()
    assert torch.equal(weight, torch.zeros(2, 2, dtype=torch.float64))
    weight.grad = None
    opt.step()
    assert torch.equal(weight, -torch.ones(2, 2, dtype=torch.float64))
    assert weight.grad is None
