"""Newton-Schulz orthogonalization and Muon's update: singular values in a narrow band."""

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.optim import Muon, newton_schulz


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double())


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (32, 32)])
def test_quintic_newton_schulz_puts_singular_values_in_a_band(shape):
    generator = torch.Generator().manual_seed(0)
    # An ill-conditioned input: singular values spread over two orders of magnitude (5 quintic
    # steps raise a value by at most ~3.4^5, so much smaller ones would stay small).
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=generator))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=generator))
    rank = min(shape)
    spectrum = torch.logspace(0, -2, rank)
    matrix = u[:, :rank] @ torch.diag(spectrum) @ v[:, :rank].T
    values = singular_values(newton_schulz(matrix))
    assert values.min() > 0.6 and values.max() < 1.25, values
    # The singular vectors are kept: the output is U f(S) V^T with the input's U and V.
    recovered = u[:, :rank].T @ newton_schulz(matrix) @ v[:, :rank]
    off_diagonal = recovered - torch.diag(torch.diagonal(recovered))
    assert off_diagonal.abs().max() < 1e-4


def test_cubic_newton_schulz_converges_to_an_orthogonal_matrix():
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(12, 20, generator=generator, dtype=torch.float64)
    out = newton_schulz(matrix, steps=40, coefficients="cubic")
    torch.testing.assert_close(out @ out.T, torch.eye(12, dtype=torch.float64), atol=1e-9,
                               rtol=0)
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(out, u @ vh, atol=1e-9, rtol=0)


def test_newton_schulz_is_batched_and_keeps_zero_columns_zero():
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(3, 6, 9, generator=generator)
    matrix[:, :, 4] = 0
    out = newton_schulz(matrix)
    assert out.shape == matrix.shape
    assert out[:, :, 4].abs().max() == 0
    for index in range(3):
        torch.testing.assert_close(out[index], newton_schulz(matrix[index]))


def test_newton_schulz_rejects_vectors_and_bad_settings():
    with pytest.raises(NestlearnError, match="matrix"):
        newton_schulz(torch.ones(5))
    with pytest.raises(NestlearnError, match="coefficients"):
        newton_schulz(torch.ones(2, 2), coefficients="septic")
    with pytest.raises(NestlearnError, match="steps"):
        newton_schulz(torch.ones(2, 2), steps=-1)


@pytest.mark.parametrize("shape", [(24, 10), (10, 24)])
def test_muon_update_has_singular_values_in_a_band(shape):
    torch.manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(shape))
    bias = torch.nn.Parameter(torch.zeros(shape[0]))
    lr = 0.01
    opt = Muon([weight, bias], lr=lr, momentum=0.9)
    for _ in range(4):
        before = weight.detach().clone()
        opt.zero_grad()
        x = torch.randn(32, shape[1])
        ((x @ weight.T + bias).tanh() - 0.5).pow(2).mean().backward()
        opt.step()
        scale = max(1.0, shape[0] / shape[1]) ** 0.5
        values = singular_values((before - weight.detach()) / (lr * scale))
        assert values.min() > 0.6 and values.max() < 1.25, values
    # The bias (a vector) took AdamW fallback steps, not orthogonalized ones.
    assert "fallback_exp_avg" in opt.state[bias] and "momentum_buffer" not in opt.state[bias]


def test_muon_orthogonalizes_conv_kernels_as_matrices():
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(3, 8, 3)
    opt = Muon(conv.parameters(), lr=0.01, nesterov=False, momentum=0.0)
    before = conv.weight.detach().clone()
    conv(torch.randn(2, 3, 6, 6)).pow(2).mean().backward()
    opt.step()
    delta = (before - conv.weight.detach()).reshape(8, -1) / 0.01
    values = singular_values(delta)
    assert values.min() > 0.6 and values.max() < 1.25
