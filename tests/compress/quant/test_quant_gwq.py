"""GWQ: exactly ceil(fraction * numel) outliers chosen by |gradient| are kept exactly, the scales are fitted
without them (and shrink), GPTQ can replace RTN for the rest, gradients are collected from calibration data,
and bad arguments are rejected by name."""

import math

import pytest
import torch
from torch import nn

from trainlab.compress.quant.grids import quantize_rtn
from trainlab.compress.quant.gwq import OutlierQuantizedWeight, collect_gradients, quantize_gwq, select_outliers
from trainlab.compress.quant.nupes import reconstruction_loss

torch.set_num_threads(1)


def _weight(rows=64, cols=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g, dtype=torch.float64) ** 3).half().double()  # float16-exact


@pytest.mark.parametrize(("rows", "cols", "fraction"), [(64, 100, 0.01), (37, 173, 0.01), (16, 16, 0.05)])
def test_keeps_exactly_ceil_fraction_outliers_exactly(rows, cols, fraction):
    w = _weight(rows, cols)
    grad = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = quantize_gwq(w, 2, grad, fraction=fraction)
    k = math.ceil(fraction * rows * cols)
    assert isinstance(q, OutlierQuantizedWeight) and q.indices.dtype == torch.int32 and q.indices.numel() == k
    top = set(grad.abs().flatten().topk(k).indices.tolist())
    assert set(q.indices.tolist()) == top and torch.equal(q.indices, q.indices.sort().values)
    deq = q.dequantize(torch.float64).flatten()
    assert torch.equal(deq[q.indices.long()], w.flatten()[q.indices.long()])
    assert torch.equal(q.values, w.flatten()[q.indices.long()])


def test_scale_recomputed_without_outliers_shrinks():
    w = _weight()
    q = quantize_gwq(w, 3, w)  # saliency = |w|: the largest weights are the outliers
    rtn = quantize_rtn(w, 3)
    assert (q.base.scale <= rtn.scale).all() and q.base.scale.sum() < 0.8 * rtn.scale.sum()
    keep = torch.ones(w.numel(), dtype=torch.bool)
    keep[q.indices.long()] = False
    err_gwq = (w.flatten() - q.dequantize(torch.float64).flatten())[keep].square().sum()
    err_rtn = (w.flatten() - rtn.dequantize(torch.float64).flatten())[keep].square().sum()
    assert err_gwq < 0.7 * err_rtn


def test_no_outliers_is_rtn():
    w = _weight()
    q = quantize_gwq(w, 4, torch.ones_like(w), fraction=0.0)
    assert q.indices.numel() == 0
    assert torch.equal(q.dequantize(torch.float64), quantize_rtn(w, 4).dequantize(torch.float64))


def test_select_outliers_ties_are_deterministic():
    assert select_outliers(torch.tensor([[1.0, -3.0, 3.0, 2.0]]), 0.5).tolist() == [1, 2]
    assert select_outliers(torch.ones(2, 3), 0.1).tolist() == [0]
    assert select_outliers(torch.ones(10, 10), 0.07).numel() == 7  # not ceil(7.000000000000001)


def test_hessian_uses_gptq_and_lowers_layer_loss():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 96, generator=g, dtype=torch.float64)
    x = torch.randn(384, 96, generator=g, dtype=torch.float64)
    x = x @ (torch.eye(96, dtype=torch.float64) + torch.randn(96, 96, generator=g, dtype=torch.float64))
    h = 2 * x.T @ x / 384
    grad = w.abs()
    rtn = quantize_gwq(w, 3, grad)
    comp = quantize_gwq(w, 3, grad, hessian=h, block_size=32)
    assert torch.equal(comp.indices, rtn.indices)
    assert torch.equal(comp.values.half().double(), comp.values)  # compensated values, float16-exact
    assert (comp.base.scale <= quantize_rtn(w, 3).scale).all()  # fitted without the outliers
    assert (comp.base.codes.flatten()[comp.indices.long()] == 4).all()  # outliers enter the grid as 0
    assert reconstruction_loss(w, comp.dequantize(torch.float64), h) < 0.8 * reconstruction_loss(
        w, rtn.dequantize(torch.float64), h
    )


def test_collect_gradients_matches_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    batches = [(torch.randn(8, 6), torch.randn(8, 2)) for _ in range(3)]

    def loss_fn(m, batch):
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    model.train()
    grads = collect_gradients(model, batches, loss_fn)
    assert set(grads) == {"0", "2"} and model.training and model[0].weight.grad is None
    total = sum(loss_fn(model, b) for b in batches) / 3
    expected = torch.autograd.grad(total, [model[0].weight, model[2].weight])
    assert torch.allclose(grads["0"], expected[0].double(), atol=1e-6)
    assert torch.allclose(grads["2"], expected[1].double(), atol=1e-6)
    with pytest.raises(ValueError, match="batches"):
        collect_gradients(model, [], loss_fn)
    with pytest.raises(ValueError, match="layers"):
        collect_gradients(model, batches, loss_fn, layers={"t": model[1]})


def test_bad_arguments():
    w = _weight(8, 16)
    with pytest.raises(ValueError, match="gradient"):
        quantize_gwq(w, 3, w[:4])
    with pytest.raises(ValueError, match="fraction"):
        quantize_gwq(w, 3, w, fraction=1.5)
    with pytest.raises(ValueError, match="bits"):
        quantize_gwq(w, 1, w)
    with pytest.raises(ValueError, match="value_dtype"):
        quantize_gwq(w, 3, w, value_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="hessian"):
        quantize_gwq(w, 3, w, hessian=torch.eye(8))
