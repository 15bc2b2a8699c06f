"""NUPES power grid: a = 1 is exactly RTN, the search never loses to a = 1 on its objective, heavy tails pick
a < 1, the grid works inside GPTQ, and bad arguments are rejected by name."""

import pytest
import torch

from trainlab.compress.quant.grids import quantize_rtn, sqnr_db
from trainlab.compress.quant.nupes import (
    EXPONENTS,
    PowerGrid,
    PowerQuantizedWeight,
    quantize_nupes,
    reconstruction_loss,
    search_exponent,
)

torch.set_num_threads(1)


def _heavy(rows=64, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64) ** 3  # heavy-tailed


def _hessian(cols, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g, dtype=torch.float64)
    x = x @ (torch.eye(cols, dtype=torch.float64) + 0.5 * torch.randn(cols, cols, generator=g, dtype=torch.float64))
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize(("bits", "symmetric", "group_size"), [(2, True, None), (3, False, 32), (4, True, 48)])
def test_exponent_one_is_rtn_exactly(bits, symmetric, group_size):
    w = _heavy()
    q = PowerGrid(bits, 1.0, symmetric, group_size).quantize(w)
    r = quantize_rtn(w, bits, symmetric=symmetric, group_size=group_size)
    assert isinstance(q, PowerQuantizedWeight) and q.exponent == 1.0
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale) and torch.equal(q.zero, r.zero)
    assert torch.equal(q.dequantize(torch.float64), r.dequantize(torch.float64))
    assert torch.equal(quantize_nupes(w, bits, exponent=1, symmetric=symmetric, group_size=group_size).codes, r.codes)


def test_exponents_grid_holds_one_exactly():
    assert 1.0 in EXPONENTS and min(EXPONENTS) == 0.25 and max(EXPONENTS) == 1.5 and len(EXPONENTS) == 51


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("use_hessian", [False, True])
def test_search_never_worse_than_one(bits, use_hessian):
    w = _heavy(seed=bits)
    h = _hessian(w.shape[1]) if use_hessian else None
    best, losses = search_exponent(w, bits, hessian=h)
    assert losses[best] == min(losses.values()) and losses[best] <= losses[1.0]
    q = quantize_nupes(w, bits, hessian=h)
    assert q.exponent == best
    assert reconstruction_loss(w, q.dequantize(torch.float64), h) == pytest.approx(losses[best], rel=1e-12)


def test_heavy_tails_pick_a_below_one_and_beat_rtn():
    w = _heavy()
    q = quantize_nupes(w, 4)
    assert q.exponent < 1
    assert sqnr_db(w, q.dequantize(torch.float64)) > sqnr_db(w, quantize_rtn(w, 4).dequantize(torch.float64)) + 1


def test_power_grid_levels_and_inverse():
    # every level is phi^-1 of a uniform level; a value on a level is reproduced
    grid = PowerGrid(3, 0.5, group_size=None, scale_dtype=None)
    w = torch.tensor([[-4.0, -1.0, 0.0, 0.25, 1.0, 2.25, 4.0, 3.0]], dtype=torch.float64)
    q = grid.quantize(w)
    levels = (q.codes.double() - q.zero.double()) * q.scale.double()  # in the sqrt domain
    assert torch.allclose(q.dequantize(torch.float64), torch.sign(levels) * levels.square())
    assert q.dequantize(torch.float64)[0, 2] == 0.0
    # symmetric grid in the sqrt domain: s = 2 * 2 / 7; -2 rounds to the lowest level -4 s -> -(16 / 7)^2
    assert q.dequantize(torch.float64)[0, 0] == pytest.approx(-((4 * 4 / 7) ** 2), rel=1e-12)


def test_second_order_lowers_layer_loss():
    w = _heavy(32, 96, seed=3)
    h = _hessian(96)
    rtn = quantize_nupes(w, 3, exponent=0.75, hessian=h)
    comp = quantize_nupes(w, 3, exponent=0.75, hessian=h, second_order=True, block_size=32)
    assert comp.exponent == 0.75
    lr = reconstruction_loss(w, rtn.dequantize(torch.float64), h)
    lc = reconstruction_loss(w, comp.dequantize(torch.float64), h)
    assert lc < 0.8 * lr


def test_bad_arguments():
    w = _heavy(8, 16)
    with pytest.raises(ValueError, match="exponent"):
        PowerGrid(3, 0.0)
    with pytest.raises(ValueError, match="exponent"):
        quantize_nupes(w, 3, exponent=-1.0)
    with pytest.raises(ValueError, match="bits"):
        PowerGrid(9, 0.5)
    with pytest.raises(ValueError, match="group_size"):
        PowerGrid(3, 0.5, group_size=0)
    with pytest.raises(ValueError, match="hessian"):
        quantize_nupes(w, 3, second_order=True)
    with pytest.raises(ValueError, match="hessian"):
        quantize_nupes(w, 3, hessian=torch.eye(8))
    with pytest.raises(ValueError, match="exponents"):
        search_exponent(w, 3, exponents=(0.5, 0.0))
    with pytest.raises(ValueError, match="second_order"):
        quantize_nupes(w, 3, second_order=1)
    with pytest.raises(ValueError, match="weight"):
        quantize_nupes(w[0], 3)
