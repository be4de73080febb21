"""Every optimizer drives the paper's toy objective and a small regression to low loss."""

import pytest
import torch

from nestlearn.optim import M3, DeepMomentum, DeltaMomentum, Muon, PreconditionedMomentum

# psi(r, theta) = r^2 + k (r - theta + alpha sin(omega r))^2: a curved valley theta = r +
# alpha sin(omega r) with its only minimum psi = 0 at (0, 0); psi(1.5, -1) is about 58.
K, ALPHA, OMEGA = 10.0, 0.5, 4.0

TOY = {
    "delta": lambda p: DeltaMomentum(p, lr=0.03, fallback="none"),
    "preconditioned": lambda p: PreconditionedMomentum(p, lr=0.03),
    "deep": lambda p: DeepMomentum(p, lr=0.003, fallback="none"),
    "muon": lambda p: Muon(p, lr=0.03, fallback="none"),
    "m3": lambda p: M3(p, lr=0.01, fallback="none"),
}


def psi(x: torch.Tensor) -> torch.Tensor:
    r, theta = x[0, 0], x[0, 1]
    return r**2 + K * (r - theta + ALPHA * torch.sin(OMEGA * r)) ** 2


def train(params, build, loss_fn, steps):
    opt = build(params)
    # Linear decay to zero: sign-like rules (Muon, M3) need a shrinking step to settle.
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        return loss_fn().item()


@pytest.mark.parametrize("name", list(TOY))
def test_toy_objective_reaches_low_loss(name):
    # One (1, 2) matrix [r, theta] so that matrix rules apply to it.
    x = torch.nn.Parameter(torch.tensor([[1.5, -1.0]], dtype=torch.float64))
    start = psi(x).item()
    final = train([x], TOY[name], lambda: psi(x), steps=600)
    assert start > 50 and final < 0.05, final


REGRESSION = {
    "delta": lambda p: DeltaMomentum(p, lr=0.05, fallback_lr=0.03),
    "preconditioned": lambda p: PreconditionedMomentum(p, lr=0.01),
    "deep": lambda p: DeepMomentum(p, lr=0.05, fallback_lr=0.03),
    "muon": lambda p: Muon(p, lr=0.05, fallback_lr=0.03),
    "m3": lambda p: M3(p, lr=0.03, fallback_lr=0.03),
}


@pytest.mark.parametrize("name", list(REGRESSION))
def test_small_regression_reaches_low_loss(name):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 12, generator=generator)
    true_weight = torch.randn(4, 12, generator=generator) / 12**0.5
    targets = inputs @ true_weight.T + 0.3
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 4)

    def loss():
        return torch.nn.functional.mse_loss(model(inputs), targets)

    start = loss().item()
    final = train(model.parameters(), REGRESSION[name], loss, steps=300)
    assert final < 1e-3 * start, (start, final)
