"""The closed-form fits of ``tzk extend`` on residuals with known answers (no flow needed)."""

from __future__ import annotations

import pytest
import torch

from tzkcli.extension import VAR_FLOOR, ppca


def test_ppca_keeps_the_top_eigenvalues_and_averages_the_rest() -> None:
    generator = torch.Generator().manual_seed(0)
    top = torch.randn(500, 6, generator=generator, dtype=torch.float64) @ torch.diag(
        torch.tensor([3.0, 2.0, 1.0, 0.5, 0.4, 0.3], dtype=torch.float64)) + 0.7
    mean, factor, log_noise = ppca(top, rank=2)

    centred = top - top.mean(dim=0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / len(top)).flip(0)
    noise = eigenvalues[2:].mean()
    model = factor @ factor.T + torch.exp(2 * log_noise) * torch.eye(6, dtype=torch.float64)
    expected = torch.cat([eigenvalues[:2], noise.repeat(4)])
    assert torch.allclose(mean, top.mean(dim=0))
    assert torch.allclose(torch.linalg.eigvalsh(model).flip(0), expected, atol=1e-10)
    assert torch.allclose(torch.exp(2 * log_noise), noise)


def test_ppca_floors_the_noise_of_degenerate_data() -> None:
    top = torch.zeros(4, 5, dtype=torch.float64)
    top[:, 0] = torch.tensor([1.0, -1.0, 2.0, -2.0], dtype=torch.float64)
    _, factor, log_noise = ppca(top, rank=1)
    assert float(torch.exp(2 * log_noise)) == pytest.approx(VAR_FLOOR)
    assert torch.allclose(factor.square().sum(), torch.tensor(2.5 - VAR_FLOOR,
                                                              dtype=torch.float64))
