"""Degenerate settings where a nestlearn optimizer must equal a classical one, step for step."""

import copy

import pytest
import torch

from nestlearn.optim import M3, DeepMomentum, DeltaMomentum, Muon, PreconditionedMomentum
from nestlearn.optim.delta_momentum import erase_along_gradient
from nestlearn.optim.muon import newton_schulz

STEPS = 6


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3)).double()


def trajectories(build_a, build_b, steps: int = STEPS):
    """Train two copies of one model on the same batches; yield their parameters each step."""
    model_a = make_model()
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = build_a(model_a.parameters()), build_b(model_b.parameters())
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(11, 5, generator=generator, dtype=torch.float64)
        y = torch.randn(11, 3, generator=generator, dtype=torch.float64)
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        yield ([p.detach().clone() for p in model_a.parameters()],
               [p.detach().clone() for p in model_b.parameters()])


def assert_same_trajectory(build_a, build_b, atol: float = 1e-12):
    moved = False
    start = [p.detach().clone() for p in make_model().parameters()]
    for params_a, params_b in trajectories(build_a, build_b):
        for a, b in zip(params_a, params_b, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=atol)
    moved = any(not torch.equal(a, s) for a, s in zip(params_a, start, strict=True))
    assert moved, "the optimizers did not move the parameters"


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.8)


def test_delta_momentum_without_delta_term_is_sgd_momentum():
    assert_same_trajectory(
        lambda p: DeltaMomentum(p, lr=0.05, momentum=0.8, delta=0.0, fallback="none"), sgd)


def test_preconditioned_momentum_with_identity_is_sgd_momentum():
    assert_same_trajectory(
        lambda p: PreconditionedMomentum(p, lr=0.05, momentum=0.8, preconditioner="identity"),
        sgd)


def test_deep_momentum_without_hidden_memory_is_sgd_momentum():
    assert_same_trajectory(
        lambda p: DeepMomentum(p, lr=0.05, momentum=0.8, hidden=0, fallback="none"), sgd)


def test_deep_momentum_with_frozen_memory_is_sgd_momentum():
    # W2 starts at zero and inner_lr=0 keeps it there: only the classical part b remains.
    assert_same_trajectory(
        lambda p: DeepMomentum(p, lr=0.05, momentum=0.8, hidden=8, inner_lr=0.0,
                               fallback="none"), sgd)


def test_deep_momentum_memory_changes_the_steps():
    steps = list(trajectories(lambda p: DeepMomentum(p, lr=0.05, momentum=0.8, hidden=8,
                                                     fallback="none"), sgd, steps=3))
    for params_a, params_b in steps:
        assert any((a - b).abs().max() > 1e-6 for a, b in zip(params_a, params_b, strict=True))


def test_diag_preconditioner_without_momentum_is_adam_with_beta1_zero():
    assert_same_trajectory(
        lambda p: PreconditionedMomentum(p, lr=0.01, momentum=0.0, preconditioner="diag",
                                         beta2=0.99, eps=1e-8),
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.0, 0.99), eps=1e-8))


def test_fallback_is_adamw_step_for_step():
    options = dict(lr=0.02, betas=(0.85, 0.99), eps=1e-8, weight_decay=0.1)
    mine = dict(fallback="adamw", fallback_lr=0.02, fallback_betas=(0.85, 0.99),
                fallback_eps=1e-8, weight_decay=0.1)
    for cls in (DeltaMomentum, DeepMomentum, Muon, M3):
        assert_same_trajectory(lambda p, cls=cls: cls(p, **mine),
                               lambda p: torch.optim.AdamW(p, **options))


def test_m3_without_slow_level_or_second_moment_is_plain_muon():
    assert_same_trajectory(
        lambda p: M3(p, lr=0.03, beta1=0.9, alpha=0.0, normalize="none", fallback="none"),
        lambda p: Muon(p, lr=0.03, momentum=0.9, nesterov=False, scale_by_shape=False,
                       fallback="none"))


class SingleLevelM3(torch.optim.Optimizer):
    """The single-level form, written out independently: W -= lr NS(M1) / (sqrt(V_hat) + eps)
    ("after") or W -= lr NS(M1 / (sqrt(V_hat) + eps)) ("before")."""

    def __init__(self, params, lr, beta1, beta2, eps, normalize):
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps))
        self.normalize = normalize

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                s = self.state[p]
                s.setdefault("t", 0)
                s.setdefault("m", torch.zeros_like(p))
                s.setdefault("v", torch.zeros_like(p))
                s["t"] += 1
                s["m"] = group["beta1"] * s["m"] + p.grad
                s["v"] = group["beta2"] * s["v"] + (1 - group["beta2"]) * p.grad**2
                denom = (s["v"] / (1 - group["beta2"] ** s["t"])).sqrt() + group["eps"]
                m = s["m"] / denom if self.normalize == "before" else s["m"]
                o = newton_schulz(m if p.dim() == 2 else m.reshape(1, -1)).reshape(p.shape)
                p -= group["lr"] * (o / denom if self.normalize == "after" else o)


@pytest.mark.parametrize("normalize", ["before", "after"])
def test_m3_with_slow_level_off_is_its_single_level_form(normalize):
    assert_same_trajectory(
        lambda p: M3(p, lr=1e-3, beta1=0.9, beta2=0.99, alpha=0.0, frequency=3,
                     normalize=normalize, fallback="none"),
        lambda p: SingleLevelM3(p, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                                normalize=normalize))


def test_m3_slow_level_changes_the_steps_after_the_first_block():
    pairs = list(trajectories(
        lambda p: M3(p, lr=1e-3, alpha=1.0, frequency=2, fallback="none"),
        lambda p: M3(p, lr=1e-3, alpha=0.0, frequency=2, fallback="none"), steps=3))
    # Steps 1-2 happen before the slow level's first write: identical; step 3 uses O2.
    for a, b in zip(*pairs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(*pairs[2], strict=True))


@pytest.mark.parametrize("shape", [(3, 8), (8, 3), (2, 3, 4), (6,)])
def test_delta_erase_matches_explicit_projection(shape):
    generator = torch.Generator().manual_seed(2)
    buffer = torch.randn(shape, generator=generator, dtype=torch.float64)
    grad = torch.randn(shape, generator=generator, dtype=torch.float64)
    matrix = buffer.reshape(shape[0], -1) if len(shape) > 1 else buffer.reshape(1, -1)
    keys = grad.reshape(matrix.shape)
    projection = keys.T @ keys / keys.pow(2).sum()
    expected = matrix @ (0.9 * torch.eye(matrix.shape[1], dtype=torch.float64) - 0.4 * projection)
    got = erase_along_gradient(buffer, grad, momentum=0.9, delta=0.4, eps=1e-30)
    torch.testing.assert_close(got, expected.reshape(shape), rtol=1e-12, atol=1e-12)


def test_delta_erase_is_scale_free_and_safe_for_zero_gradient():
    generator = torch.Generator().manual_seed(3)
    buffer = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    grad = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    small = erase_along_gradient(buffer, 1e-9 * grad, 0.9, 0.5, 1e-30)
    large = erase_along_gradient(buffer, 1e9 * grad, 0.9, 0.5, 1e-30)
    torch.testing.assert_close(small, large, rtol=1e-9, atol=1e-12)
    # The factor's eigenvalues lie in [a - delta, a]: the buffer never grows.
    assert torch.linalg.matrix_norm(large, ord=2) <= 0.9 * torch.linalg.matrix_norm(buffer, ord=2)
    zero = erase_along_gradient(buffer, torch.zeros_like(grad), 0.9, 0.5, 1e-30)
    torch.testing.assert_close(zero, 0.9 * buffer)
