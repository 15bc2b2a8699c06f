"""GPTQ error compensation: equals RTN when H = I, beats RTN on the calibration loss with correlated inputs,
its per-column losses add up to the damped quadratic loss exactly, lazy blocks change nothing, and the
calibration Hessians are 2 X^T X / n of each Linear's real inputs."""

import pytest
import torch
from torch import nn

from trainlab.compress.quant.gptq import (
    collect_hessians,
    damped_inverse_cholesky,
    gptq,
    quantize_gptq,
)
from trainlab.compress.quant.grids import UniformGrid

F64 = torch.float64


def _problem(rows=40, cols=48, n=400, seed=0):
    """A weight and correlated calibration inputs (rank-6 signal plus a little isotropic noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=F64) @ torch.randn(6, cols, generator=g, dtype=F64)
    x = x + 0.3 * torch.randn(n, cols, generator=g, dtype=F64)
    return torch.randn(rows, cols, generator=g, dtype=F64), x


def _calib_loss(x, w, q):
    return float((x @ w.T - x @ q.T).square().sum())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 8, 12])
def test_identity_hessian_equals_rtn_exactly(dtype, symmetric, group_size):
    w, _ = _problem()
    w = w.to(dtype)
    grid = UniformGrid(3, symmetric=symmetric, group_size=group_size)
    result = gptq(w, torch.eye(w.shape[1], dtype=F64), grid, block_size=16)
    assert result.weight.dtype == dtype
    assert torch.equal(result.weight, grid.quantize(w).dequantize(dtype))
    q = quantize_gptq(w, torch.eye(w.shape[1]), grid, block_size=16)
    assert torch.equal(q.codes, grid.quantize(w).codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 16])
def test_beats_rtn_on_calibration_loss(bits, group_size):
    w, x = _problem()
    grid = UniformGrid(bits, group_size=group_size)
    h = 2 * x.T @ x / x.shape[0]
    loss_gptq = _calib_loss(x, w, gptq(w, h, grid).weight)
    loss_rtn = _calib_loss(x, w, grid.quantize(w).dequantize(F64))
    assert loss_gptq < 0.5 * loss_rtn


@pytest.mark.parametrize("group_size", [None, 8])
def test_column_losses_sum_to_damped_quadratic_loss(group_size):
    w, x = _problem(seed=1)
    h = 2 * x.T @ x / x.shape[0]
    damp = 0.05
    result = gptq(w, h, UniformGrid(3, symmetric=False, group_size=group_size), damp=damp, block_size=10)
    hd = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=F64)
    e = w - result.weight
    assert float(result.column_loss.sum()) == pytest.approx(float(0.5 * torch.trace(e @ hd @ e.T)), rel=1e-9)


@pytest.mark.parametrize(("group_size", "block_sizes"), [(None, (5, 16, 200)), (8, (8,))])
def test_lazy_blocks_do_not_change_the_result(group_size, block_sizes):
    # With groups, a block that starts every group fits each group on exactly updated weights, as block_size=1
    w, x = _problem(seed=2)
    h = 2 * x.T @ x / x.shape[0]
    grid = UniformGrid(4, group_size=group_size)
    ref = gptq(w, h, grid, block_size=1).weight
    for block_size in block_sizes:
        assert torch.allclose(gptq(w, h, grid, block_size=block_size).weight, ref, rtol=0, atol=1e-12)


def test_quantize_gptq_codes_dequantize_to_the_gptq_weight():
    w, x = _problem(seed=3)
    h = 2 * x.T @ x / x.shape[0]
    grid = UniformGrid(3, symmetric=False, group_size=12)
    q = quantize_gptq(w, h, grid, block_size=24)
    assert q.scale.shape == (w.shape[0], 4) and q.codes.dtype == torch.uint8
    assert torch.equal(q.dequantize(F64), gptq(w, h, grid, block_size=24).weight)


def test_dead_inputs_are_zeroed():
    w, x = _problem(seed=4)
    x[:, [3, 17]] = 0
    result = gptq(w, 2 * x.T @ x, UniformGrid(4))
    assert (result.weight[:, [3, 17]] == 0).all()
    assert torch.isfinite(result.weight).all()


def test_damped_inverse_cholesky():
    _, x = _problem(cols=10, seed=5)
    h = x.T @ x
    u = damped_inverse_cholesky(h, 0.1)
    hd = h + 0.1 * torch.diag(h).mean() * torch.eye(10, dtype=F64)
    assert torch.allclose(u.T @ u, torch.linalg.inv(hd), atol=1e-12)
    assert torch.equal(u, u.triu())
    with pytest.raises(ValueError, match="damp"):
        damped_inverse_cholesky(-torch.eye(3), 0.01)


def test_bad_arguments():
    w = torch.randn(4, 6)
    grid = UniformGrid(4)
    with pytest.raises(ValueError, match="hessian"):
        gptq(w, torch.eye(5), grid)
    with pytest.raises(ValueError, match="damp"):
        gptq(w, torch.eye(6), grid, damp=0)
    with pytest.raises(ValueError, match="block_size"):
        gptq(w, torch.eye(6), grid, block_size=0)
    with pytest.raises(ValueError, match="weight"):
        gptq(torch.randn(6), torch.eye(6), grid)


def test_collect_hessians_matches_the_layer_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    inputs = [torch.randn(4, 2, 5, dtype=F64), torch.randn(3, 2, 5, dtype=F64)]  # leading dims are samples
    hessians = collect_hessians(model, inputs)
    assert set(hessians) == {"0", "2"}
    x0 = torch.cat([x.reshape(-1, 5) for x in inputs])
    x2 = torch.relu(model[0](x0)).detach()
    assert torch.allclose(hessians["0"], 2 * x0.T @ x0 / 14, atol=1e-12)
    assert torch.allclose(hessians["2"], 2 * x2.T @ x2 / 14, atol=1e-12)
    assert not model[0]._forward_pre_hooks  # hooks removed
    assert model.training  # mode restored


def test_collect_hessians_rejects_bad_layers():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    with pytest.raises(ValueError, match="layers"):
        collect_hessians(model, [torch.randn(2, 5)], layers={"1": model[1]})
    with pytest.raises(ValueError, match="no calibration input"):
        collect_hessians(model, [torch.randn(2, 5)], layers={"extra": nn.Linear(5, 5)})


def test_groups_are_fitted_on_w_as_the_reference_does():
    # reference (IST-DASLab/gptq fasterquant, static_groups=False): find_params(W[:, j:j + groupsize]) when column j
    # starts a group; W carries the lazy updates of earlier blocks, not those made inside the current block
    w, x = _problem(seed=6)
    h = 2 * x.T @ x / x.shape[0]
    grid = UniformGrid(3, group_size=8)
    result = gptq(w, h, grid, block_size=16)
    assert len(result.params) == 6
    for g in (0, 1):  # block 0: W is untouched until the block ends, so both groups fit the original columns
        assert torch.equal(result.params[g].scale, grid.fit(w[:, 8 * g : 8 * g + 8]).scale)
    for g in range(2, 6):  # later blocks see the compensation of the earlier blocks' rounding errors
        assert not torch.equal(result.params[g].scale, grid.fit(w[:, 8 * g : 8 * g + 8]).scale)
    exact = gptq(w, h, grid, block_size=8)  # every group starts a block: fitted on exactly updated columns
    assert not torch.equal(exact.params[1].scale, result.params[1].scale)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1, stride=2, dilation=1),
        nn.Conv2d(2, 3, (2, 3), dilation=2),
        nn.Conv1d(3, 5, 3, padding=2),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        nn.Conv2d(3, 4, 3, padding=(2, 1), stride=2, padding_mode="reflect"),
        nn.Conv2d(2, 3, (3, 2), padding="same", dilation=2, padding_mode="replicate"),
        nn.Conv2d(2, 3, (2, 4), padding="same"),
        nn.Conv1d(3, 5, 3, padding=2, padding_mode="circular"),
        nn.Conv1d(3, 5, 5, padding=2, padding_mode="reflect"),
    ],
    ids=[
        "conv2d-strided",
        "conv2d-dilated",
        "conv1d",
        "conv2d-circular",
        "conv2d-reflect",
        "conv2d-replicate-same",
        "conv2d-same-asymmetric",
        "conv1d-circular",
        "conv1d-reflect",
    ],
)
def test_conv_hessian_gives_the_output_error_of_a_weight_perturbation(conv):
    # With H = 2 X^T X / n over the unfolded patches, ½ tr(E H E^T) is the mean over output positions of
    # |conv(x, E)|², computed here by the convolution itself (its own padding mode), not by unfold.
    torch.manual_seed(0)
    conv = conv.double()
    shape = (4, conv.in_channels, 9, 8) if isinstance(conv, nn.Conv2d) else (4, conv.in_channels, 11)
    inputs = [torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)]
    hessian = collect_hessians(conv, inputs, layers={"conv": conv})["conv"]
    e = torch.randn_like(conv.weight)
    outs = [conv._conv_forward(x, e, None) for x in inputs]
    positions = sum(o[:, 0].numel() for o in outs)
    expected = sum(o.square().sum() for o in outs) / positions
    flat = e.reshape(e.shape[0], -1)
    assert torch.allclose(0.5 * ((flat @ hessian) * flat).sum(), expected, rtol=1e-10)


def test_grouped_conv_hessian_is_refused_naming_the_groups():
    conv = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups=1 .* got 2"):
        collect_hessians(conv, [torch.randn(1, 4, 6, 6)], layers={"conv": conv})
