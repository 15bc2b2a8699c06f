"""PTQTP trit-planes: ternary planes, a never-increasing objective, scales that solve the ridge normal
equations, exact recovery of a two-plane weight, better than 2-bit (and 3-bit) RTN on Gaussian weights."""

import pytest
import torch

from trainlab.compress.quant.grids import quantize_rtn
from trainlab.compress.quant.ptqtp import quantize_ptqtp

F64 = torch.float64


def _weight(rows=48, cols=100, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rel(w, approx):
    return float((w - approx).square().sum() / w.square().sum())


@pytest.mark.parametrize("group_size", [None, 32])  # 32 leaves a short last group of 4
def test_planes_scales_and_monotone_objective(group_size):
    w = _weight()
    p = quantize_ptqtp(w, group_size=group_size, scale_dtype=None)
    assert p.t1.dtype == torch.int8 and p.t1.shape == w.shape
    assert set(p.t1.unique().tolist()) <= {-1, 0, 1} and set(p.t2.unique().tolist()) <= {-1, 0, 1}
    assert p.alpha1.shape == (48, 1 if group_size is None else 4)
    assert 1 <= p.iterations <= 50
    assert all(b <= a * (1 + 1e-12) for a, b in zip(p.objective, p.objective[1:], strict=False))
    assert p.objective[-1] < 0.8 * p.objective[0]  # the alternation improves on the TWN initialization
    # final scales solve the ridge normal equations of the final planes, per row and group
    size = group_size or w.shape[1]
    for g in range(p.alpha1.shape[1]):
        sl = slice(g * size, (g + 1) * size)
        t = torch.stack([p.t1[:, sl], p.t2[:, sl]], -1).to(F64)  # (rows, k, 2)
        gram = t.transpose(1, 2) @ t + 1e-6 * torch.eye(2, dtype=F64)
        a = torch.stack([p.alpha1[:, g], p.alpha2[:, g]], -1).unsqueeze(-1)
        assert torch.allclose(gram @ a, t.transpose(1, 2) @ w[:, sl].unsqueeze(-1), atol=1e-9)


def test_recovers_a_two_plane_weight_exactly():
    g = torch.Generator().manual_seed(1)
    t1 = torch.randint(-1, 2, (32, 64), generator=g).to(F64)
    t2 = torch.randint(-1, 2, (32, 64), generator=g).to(F64)
    a1 = 1 + torch.rand(32, 1, generator=g, dtype=F64)
    a2 = 0.05 + 0.3 * a1 * torch.rand(32, 1, generator=g, dtype=F64)
    w = a1 * t1 + a2 * t2
    p = quantize_ptqtp(w, ridge=0, tol=0, max_iter=100, scale_dtype=None)
    assert torch.allclose(p.dequantize(), w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("group_size", [None, 64])
def test_beats_low_bit_rtn(group_size):
    w = _weight(rows=64, cols=256, seed=2)
    err = _rel(w, quantize_ptqtp(w, group_size=group_size).dequantize())
    assert err < 0.5 * _rel(w, quantize_rtn(w, 2, group_size=group_size).dequantize(F64))
    assert err < _rel(w, quantize_rtn(w, 3, group_size=group_size).dequantize(F64))


def test_default_scales_are_float16_values():
    w = _weight(seed=4)
    exact, stored = quantize_ptqtp(w, scale_dtype=None), quantize_ptqtp(w)
    assert torch.equal(stored.t1, exact.t1) and torch.equal(stored.t2, exact.t2)
    for a in (stored.alpha1, stored.alpha2):
        assert a.dtype == F64 and torch.equal(a.half().double(), a)
    assert torch.allclose(stored.alpha1, exact.alpha1, rtol=2**-11, atol=0)


def test_groups_are_independent_and_float32_works():
    w = _weight(seed=3).float()
    p = quantize_ptqtp(w, group_size=25, tol=0, max_iter=200)  # every group runs to its fixed point
    assert p.dequantize().dtype == torch.float32
    part = quantize_ptqtp(w[:, 25:50], tol=0, max_iter=200)
    assert torch.equal(part.t1, p.t1[:, 25:50]) and torch.allclose(part.alpha1[:, 0], p.alpha1[:, 1])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"group_size": 0}, "group_size"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": -1.0}, "tol"),
        ({"ridge": -1e-3}, "ridge"),
        ({"scale_dtype": torch.bfloat16}, "scale_dtype"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        quantize_ptqtp(_weight(), **kwargs)
    with pytest.raises(ValueError, match="weight"):
        quantize_ptqtp(torch.randn(3))
