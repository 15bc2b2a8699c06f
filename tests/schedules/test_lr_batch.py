"""The lr-batch rule: the fit, the rule, and batch-Hessian outliers against exact eigenvalues (float64)."""

import math

import pytest
import torch
from torch import nn

from trainlab.schedules.lr_batch import CurvatureFit, batch_curvature, fit_curvature, lr_for_batch_size


def test_fit_recovers_a_plus_b_over_batch_exactly():
    fit = fit_curvature({b: 2.0 + 48.0 / b for b in (8, 16, 64, 512)})
    assert fit.a == pytest.approx(2.0, rel=1e-12) and fit.b == pytest.approx(48.0, rel=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12) and fit.saturation_batch_size == pytest.approx(24.0)


def test_rule_is_linear_then_saturates_for_sgd_and_square_root_for_adam():
    pure_noise = CurvatureFit(a=0.0, b=100.0, r2=1.0)
    assert lr_for_batch_size(0.1, 16, 64, pure_noise) == pytest.approx(0.4, rel=1e-12)  # linear scaling
    assert lr_for_batch_size(1e-3, 16, 64, pure_noise, rule="adam") == pytest.approx(2e-3, rel=1e-12)  # sqrt
    fit = CurvatureFit(a=1.0, b=32.0, r2=1.0)  # saturation at B = 32
    expected = 0.1 * (1 + 32 / 16) / (1 + 32 / 64)
    assert lr_for_batch_size(0.1, 16, 64, fit) == pytest.approx(expected, rel=1e-12)
    assert lr_for_batch_size(0.1, 16, 1 << 20, fit) < 0.1 * 3.0001  # never past λ(16)/a
    assert lr_for_batch_size(1e-3, 16, 64, fit, rule="adam") == pytest.approx(1e-3 * math.sqrt(expected / 0.1))


def test_batch_curvature_is_the_top_eigenvalue_of_each_batch_hessian():
    """Least squares ½·mean((Xw − y)²): the batch Hessian is X_BᵀX_B/B, known exactly."""
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randn(200, 6, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2, 6, dtype=torch.float64)
    y_all = torch.randn(200, generator=gen, dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()

    def make_batch(size, generator):
        idx = torch.randperm(200, generator=generator)[:size]
        return x_all[idx], y_all[idx]

    def loss(m, batch):
        return 0.5 * (m(batch[0]).squeeze(1) - batch[1]).pow(2).mean()

    got = batch_curvature(model, loss, make_batch, [4, 32], repeats=2, iters=500, seed=3)
    for size in (4, 32):
        exact = []
        for r in range(2):
            xb, _ = make_batch(size, torch.Generator().manual_seed(1_000_003 * 3 + 1009 * size + r))
            exact.append(torch.linalg.eigvalsh(xb.T @ xb / size)[-1].item())
        assert got[size] == pytest.approx(sum(exact) / 2, rel=1e-5)  # power iteration stops at 1e-6 change
    assert got[4] > got[32]  # small batches have the larger outlier


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda: fit_curvature({8: 1.0, 16: 0.5}), "at least 3"),
        (lambda: lr_for_batch_size(0.1, 16, 64, CurvatureFit(1, 1, 1), rule="lamb"), "rule"),
        (lambda: lr_for_batch_size(0.1, 0, 64, CurvatureFit(1, 1, 1)), "batch_size"),
        (lambda: lr_for_batch_size(0.1, 16, 64, CurvatureFit(-5.0, 1.0, 1.0)), "non-positive"),
    ],
)
def test_bad_arguments_say_what_is_wrong(call, word):
    with pytest.raises(ValueError, match=word):
        call()
