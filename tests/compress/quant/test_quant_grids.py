"""Uniform RTN grids: hand-computed codes, error within half a step, 0 held exactly, float16 scales that are
the grid actually used, per-group scales, strict argument checks."""

import pytest
import torch

from trainlab.compress.quant.grids import (
    GridParams,
    UniformGrid,
    expand_groups,
    quantize_rtn,
    sqnr_db,
)


def _weight(rows=12, cols=37, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=dtype)
    w[:, ::5] *= 4  # outliers so that groups get different scales
    return w


def test_hand_computed_symmetric_and_asymmetric():
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0]], dtype=torch.float64)
    q = quantize_rtn(w, 2, scale_dtype=None)
    assert q.scale.item() == pytest.approx(2 / 3) and q.zero.item() == 2
    assert q.codes.tolist() == [[0, 2, 3, 3]]
    assert torch.allclose(q.dequantize(), torch.tensor([[-4 / 3, 0, 2 / 3, 2 / 3]], dtype=torch.float64))

    w = torch.tensor([[-0.5, 0.25, 1.0]], dtype=torch.float64)
    q = quantize_rtn(w, 2, symmetric=False, scale_dtype=None)
    assert q.scale.item() == 0.5 and q.zero.item() == 1
    assert q.codes.tolist() == [[0, 1, 3]]
    assert q.dequantize().tolist() == [[-0.5, 0.0, 1.0]]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 8, 10])  # 10 leaves a short last group of 7
@pytest.mark.parametrize("scale_dtype", [None, torch.float16])
def test_error_at_most_half_a_step(bits, symmetric, group_size, scale_dtype):
    w = _weight()
    q = quantize_rtn(w, bits, symmetric=symmetric, group_size=group_size, scale_dtype=scale_dtype)
    step = expand_groups(q.scale, w.shape[1], group_size)
    err = (w - q.dequantize(torch.float64)).abs()
    assert (err <= step / 2 * (1 + 1e-12)).all()
    assert (err / step).max() > 0.4  # the bound is tight: some value sits near the middle of two levels
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    # the grid spans the range: each row's extreme value is within one level of the top or bottom code
    # (symmetric: -max|w| is half a level inside the grid; float16 rounds scales up)
    assert q.scale.shape == (w.shape[0], 1 if group_size is None else -(-w.shape[1] // group_size))
    extreme = w.abs().argmax(dim=1)
    ends = q.codes[torch.arange(w.shape[0]), extreme]
    assert bool((torch.minimum(ends, 2**bits - 1 - ends) <= 1).all())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 4])
def test_zero_maps_to_zero(symmetric, bits, group_size):
    w = _weight(seed=1) + 0.3  # shifted, so asymmetric zero points are not at the middle
    w[:, ::3] = 0
    w[2] = 0  # an all-zero row
    q = quantize_rtn(w, bits, symmetric=symmetric, group_size=group_size)
    deq = q.dequantize(torch.float64)
    assert (deq[w == 0] == 0).all()
    assert (q.scale[2] == 1).all()


def test_float16_scales_are_rounded_up_and_exact():
    w = _weight(seed=2) * 1e-3
    exact = UniformGrid(3, scale_dtype=None).fit(w).scale
    stored = UniformGrid(3).fit(w).scale
    assert torch.equal(stored.half().double(), stored)
    assert (stored >= exact).all() and (stored <= exact * (1 + 2**-10)).all()
    assert not torch.equal(stored, exact)


def test_more_bits_about_six_db_each():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    snr = [sqnr_db(w, quantize_rtn(w, b).dequantize(torch.float64)) for b in range(3, 9)]
    gains = torch.tensor(snr).diff()
    assert (gains > 4.5).all() and (gains < 7.5).all()


def test_groups_are_independent():
    w = _weight(seed=4)
    q = quantize_rtn(w, 4, group_size=8)
    for g in range(q.scale.shape[1]):
        part = quantize_rtn(w[:, 8 * g : 8 * g + 8], 4)
        assert torch.equal(part.codes, q.codes[:, 8 * g : 8 * g + 8])
        assert torch.equal(part.scale[:, 0], q.scale[:, g])


def test_float32_weights():
    w = _weight(dtype=torch.float32)
    q = quantize_rtn(w, 4, symmetric=False, group_size=16)
    assert q.dequantize().dtype == torch.float32
    step = expand_groups(q.scale, w.shape[1], 16)
    assert ((w - q.dequantize()).abs() <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 3.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"bits": 4, "group_size": 0}, "group_size"),
        ({"bits": 4, "group_size": 2.5}, "group_size"),
        ({"bits": 4, "symmetric": "yes"}, "symmetric"),
        ({"bits": 4, "scale_dtype": torch.bfloat16}, "scale_dtype"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        UniformGrid(**kwargs)


def test_bad_weight_and_params():
    grid = UniformGrid(4)
    with pytest.raises(ValueError, match="weight"):
        grid.quantize(torch.randn(5))
    with pytest.raises(ValueError, match="weight"):
        grid.quantize(torch.ones(2, 3, dtype=torch.int64))
    w = torch.randn(3, 8)
    with pytest.raises(ValueError, match="params"):
        UniformGrid(4, group_size=4).encode(w, GridParams(torch.ones(3, 1), torch.ones(3, 1)))
    with pytest.raises(ValueError, match="scale_dtype=None"):
        grid.quantize(torch.full((2, 2), 1e6))
