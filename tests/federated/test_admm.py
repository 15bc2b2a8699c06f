"""Noisy consensus ADMM for weighted least squares: the dual-free form is standard ADMM without noise."""

from __future__ import annotations

import pytest
import torch

from trainlab.federated.admm import NoisyConsensusADMM

F64 = torch.float64


def _problem(k: int = 6, d: int = 4, n: int = 12):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(k, n, d, generator=gen, dtype=F64)
    S = torch.rand(k, n, generator=gen, dtype=F64) + 0.5  # diagonal weights
    w_true = torch.randn(d, generator=gen, dtype=F64)
    y = X @ w_true + 0.1 * torch.randn(k, n, generator=gen, dtype=F64)
    A = X.transpose(1, 2) @ (S[..., None] * X)
    b = (X.transpose(1, 2) @ (S * y)[..., None]).squeeze(-1)
    return A, b, torch.linalg.solve(A.sum(0), b.sum(0))


def test_dual_free_is_standard_admm_without_noise():
    A, b, optimum = _problem()
    standard = NoisyConsensusADMM(A, b, rho=1.0, variant="standard")
    dual_free = NoisyConsensusADMM(A, b, rho=1.0, variant="dual-free")
    everyone = torch.ones(6, dtype=torch.bool)
    for _ in range(300):
        torch.testing.assert_close(dual_free.step(everyone), standard.step(everyone), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(standard.state["z"], optimum, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["standard", "dual-free"])
def test_random_scheduling_still_reaches_the_wls_optimum_without_noise(variant):
    A, b, optimum = _problem()
    admm = NoisyConsensusADMM(A, b, rho=1.0, variant=variant)
    gen = torch.Generator().manual_seed(1)
    for _ in range(400):
        admm.step(torch.rand(6, generator=gen) < 0.5)
    torch.testing.assert_close(admm.state["z"], optimum, rtol=1e-5, atol=1e-5)


def test_bad_input():
    A, b, _ = _problem()
    with pytest.raises(ValueError, match="variant"):
        NoisyConsensusADMM(A, b, variant="fast")
    with pytest.raises(ValueError, match="scheduled"):
        NoisyConsensusADMM(A, b).step(torch.ones(3, dtype=torch.bool))
