"""Mixed precision: exact average-bit budgets, HAWQ's sensitivity ordering and DP optimality, BAQ's bit law
and its gain over uniform GPTQ, EvoPress over bit-widths on a small MLP."""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from trainlab.compress import allocate_plan, compress
from trainlab.compress.calibrate import kl_to_dense, model_outputs
from trainlab.compress.quant.gptq import gptq
from trainlab.compress.quant.grids import UniformGrid
from trainlab.compress.quant.mixed import (
    ColumnBitsGrid,
    baq_bits,
    baq_law,
    baq_quantize,
    evopress_bits,
    exact_allocate,
    hawq_allocate,
    hawq_sensitivities,
    mean_bits,
)

F64 = torch.float64
torch.set_num_threads(1)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 16))  # fmt: skip


def _calibration(seed=1, batches=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 16, generator=g) for _ in range(batches)]


def _rtn_error(w, bits):
    return float((UniformGrid(bits).quantize(w).dequantize() - w).square().sum())


def _mixed(model, allocator, bits, calib, second_order=False, **hyperparameters):
    """The front door: the allocator's plan, then compress (second order in both)."""
    plan = allocate_plan(allocator, model, bits=bits, calibration=calib, second_order=second_order, **hyperparameters)
    return compress(model, plan, calibration=calib, second_order=second_order)


def _kl(model, result, calib):
    pairs = zip(model_outputs(model, calib), model_outputs(result.model, calib), strict=True)
    return sum(kl_to_dense(d, o).item() for d, o in pairs)


def test_hawq_gives_more_bits_to_the_sharper_layer_with_known_hessians():
    """Loss = a/2 ||W1||^2 + b/2 ||W2||^2 with a >> b: the Hessian restricted to W1 is a*I, so both the top
    eigenvalue and tr/n are a; the same weights get more bits where the curvature is larger."""
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(model[0].weight)  # identical weights: only the curvature differs
    a, b = 50.0, 0.5
    loss = lambda m: a / 2 * m[0].weight.square().sum() + b / 2 * m[1].weight.square().sum()  # noqa: E731
    layers = {"0": model[0], "1": model[1]}
    for method in ("eigenvalue", "trace"):
        sens = hawq_sensitivities(model, loss, layers, method=method, samples=4)
        assert sens["0"] == pytest.approx(a, rel=1e-4) and sens["1"] == pytest.approx(b, rel=1e-4)
        pert = {n: {k: _rtn_error(m.weight.detach(), k) for k in (2, 3, 4)} for n, m in layers.items()}
        bits = hawq_allocate(sens, pert, {"0": 64, "1": 64}, 3)
        assert bits == {"0": 4, "1": 2}
        swapped = hawq_allocate({"0": b, "1": a}, pert, {"0": 64, "1": 64}, 3)
        assert swapped == {"0": 2, "1": 4}


def test_exact_dp_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(3)
    sizes = {"a": 6, "b": 4, "c": 10, "d": 2}
    choices = (2, 3, 4, 8)
    sens = {n: float(torch.rand((), generator=g)) * 10 for n in sizes}
    pert = {n: {b: float(torch.rand((), generator=g) + 0.1) * sizes[n] * 4.0**-b for b in choices} for n in sizes}
    total = sum(sizes.values())
    for avg in (3, 68 / total, 80 / total, 106 / total):
        bits = hawq_allocate(sens, pert, sizes, avg)
        assert mean_bits(bits, sizes) == avg
        obj = sum(sens[n] * pert[n][bits[n]] for n in sizes)
        best = min(
            sum(sens[n] * pert[n][b] for n, b in zip(sizes, combo, strict=True))
            for combo in itertools.product(choices, repeat=len(sizes))
            if sum(b * sizes[n] for n, b in zip(sizes, combo, strict=True)) == avg * total
        )
        assert obj == pytest.approx(best, rel=1e-12)
    with pytest.raises(ValueError, match="avg_bits 3.5"):  # 77 bits: odd, but every layer size is even
        hawq_allocate(sens, pert, sizes, 3.5)


def test_exact_allocate_spends_the_budget_even_when_cheaper_is_better_and_rejects_infeasible():
    # spending more raises the error here, yet the budget must be met exactly
    assert exact_allocate([[1, 2], [1, 2]], [[0.0, 5.0], [0.0, 9.0]], 3) == [1, 0]
    with pytest.raises(ValueError, match="exactly the budget 5"):
        exact_allocate([[2, 4], [2, 4]], [[0.0, 1.0], [0.0, 1.0]], 5)


def test_budget_errors_name_the_argument():
    sizes = {"a": 4, "b": 4}
    pert = {n: {2: 1.0, 4: 0.5} for n in sizes}
    with pytest.raises(ValueError, match="avg_bits"):
        hawq_allocate({"a": 1.0, "b": 1.0}, pert, sizes, 3.1)
    with pytest.raises(ValueError, match="avg_bits"):
        hawq_allocate({"a": 1.0, "b": 1.0}, pert, sizes, 9)
    with pytest.raises(ValueError, match="sensitivity lacks"):
        hawq_allocate({"a": 1.0}, pert, sizes, 3)
    with pytest.raises(ValueError, match="method"):
        hawq_sensitivities(nn.Linear(2, 2), lambda m: m.weight.sum(), method="hessian")
    with pytest.raises(ValueError, match="unknown allocator"):
        allocate_plan("greedy", _mlp(), bits=3)
    with pytest.raises(ValueError, match="calibration"):
        allocate_plan("hawq", _mlp(), bits=3)
    with pytest.raises(ValueError, match="choices"):
        allocate_plan("hawq", _mlp(), bits=3, calibration=_calibration(), choices=(1, 3))
    with pytest.raises(ValueError, match="min_bits"):
        baq_bits(torch.ones(4), 3, min_bits=5, max_bits=4)
    with pytest.raises(ValueError, match="bits"):
        ColumnBitsGrid(torch.tensor([2.5, 3.0]))


def test_baq_law_matches_the_formula_and_the_rounded_bits_keep_the_mean():
    g = torch.Generator().manual_seed(0)
    loss = torch.exp(3 * torch.randn(96, generator=g, dtype=F64))
    law = baq_law(loss, 3)
    gm = math.exp(float(loss.log().mean()))
    expected = torch.tensor([3 + 0.5 * math.log2(float(x) / gm) for x in loss], dtype=F64)
    assert torch.allclose(law, expected, atol=1e-12)
    assert float(law.mean()) == pytest.approx(3, abs=1e-12)
    assert torch.allclose(2**law, (loss / gm).sqrt() * 2**3, rtol=1e-10)  # 2^R_j ~ (L_j / GM)^(1/2)
    for avg in (2, 3, 3.5, 5):
        bits = baq_bits(loss, avg)
        assert bits.sum().item() == avg * len(loss) and bits.dtype == torch.int64
        assert 1 <= bits.min() and bits.max() <= 8
        # rounding moves the (clipped, re-centred) law by less than one bit, and keeps its order
        order = torch.argsort(loss)
        assert (bits[order].diff() >= -1).all()
    # law 4 + (log2 L - 7/3) / 2 = 2.83, 3.33, 5.83: floors sum to 10, the two largest remainders get +1
    assert baq_bits(torch.tensor([1.0, 2.0, 64.0]), 4).tolist() == [3, 3, 6]
    # clipping at max_bits re-centres the others so the mean holds
    clipped = baq_bits(torch.tensor([1.0, 1.0, 1.0, 1e12]), 3, max_bits=4)
    assert sorted(clipped.tolist()) == [2, 3, 3, 4] and clipped[3] == 4


def test_column_bits_grid_with_equal_bits_is_the_asymmetric_uniform_grid_under_gptq():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 20, generator=g, dtype=F64)
    x = torch.randn(200, 20, generator=g, dtype=F64)
    h = 2 * x.T @ x / len(x)
    for group in (None, 5):
        ours = gptq(w, h, ColumnBitsGrid(torch.full((20,), 3), group), block_size=8).weight
        ref = gptq(w, h, UniformGrid(3, symmetric=False, group_size=group, scale_dtype=None), block_size=8).weight
        assert torch.equal(ours, ref)
        rtn = ColumnBitsGrid(torch.full((20,), 3), group).quantize(w)
        grid = UniformGrid(3, symmetric=False, group_size=group, scale_dtype=None)
        assert torch.equal(rtn, grid.quantize(w).dequantize(F64))
    bits = torch.tensor([2, 8] * 10)
    q = ColumnBitsGrid(bits).quantize(w)
    assert all(len(torch.unique(q[r, ::2])) <= 4 for r in range(12))  # 2-bit columns: at most 4 levels per row
    assert (q[:, 1::2] - w[:, 1::2]).abs().max() < (q[:, ::2] - w[:, ::2]).abs().max()


def _heterogeneous_layer(seed=0):
    """Calibration inputs whose columns differ in scale by orders of magnitude (log-normal)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(1.5 * torch.randn(64, generator=g, dtype=F64))
    x = torch.randn(1024, 64, generator=g, dtype=F64) * scales
    w = torch.randn(48, 64, generator=g, dtype=F64)
    return w, x, 2 * x.T @ x / len(x)


@pytest.mark.parametrize("avg", [2, 3])
def test_baq_beats_uniform_gptq_at_the_same_mean_bits(avg):
    w, x, h = _heterogeneous_layer()
    res = baq_quantize(w, h, avg)
    assert res.mean_bits == avg and res.bits.float().mean().item() == avg
    assert res.bits.max() > res.bits.min()
    uniform = gptq(w, h, UniformGrid(avg, symmetric=False, scale_dtype=None)).weight
    loss = lambda q: float((x @ (w - q).T).square().sum())  # noqa: E731
    assert loss(res.weight) < 0.5 * loss(uniform)  # measured: 0.017 (2 bits), 0.019 (3 bits)
    # and the per-column bits follow the pass-1 losses: the most sensitive columns get the most bits
    top, bottom = torch.argmax(res.column_loss), torch.argmin(res.column_loss)
    assert res.bits[top] > res.bits[bottom]
    # the codes round-trip exactly and take rows * sum(bits) = mean bits * numel
    assert torch.equal(res.codes.dequantize(), res.weight)
    assert res.codes.payload_bits == avg * w.numel()
    assert int(res.codes.codes.max()) <= 2 ** int(res.bits.max()) - 1
    grouped = baq_quantize(w, h, avg, group_size=16)
    assert torch.equal(grouped.codes.dequantize(), grouped.weight) and grouped.codes.low.shape == (48, 4)


def test_mixed_allocations_meet_the_budget_exactly_on_an_mlp():
    model, calib = _mlp(), _calibration()
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for allocator, kw in [
        ("uniform", {}),
        ("hawq", {}),
        ("hawq", {"sensitivity": "trace", "second_order": True}),
        ("baq", {}),
        ("evopress", {"generations": 3, "offspring": 4}),
    ]:
        res = _mixed(model, allocator, 3, calib, **kw)
        assert res.report.mean_bits == 3, allocator
        assert mean_bits(res.bits, sizes) == 3
        assert set(res.weights) == set(sizes)
    res = _mixed(model, "hawq", 3.5, calib)  # not a choice: the DP still meets it exactly
    assert res.report.mean_bits == 3.5 and len(set(res.bits.values())) > 1
    before = copy.deepcopy(model.state_dict())
    res = _mixed(model, "uniform", 4, calib)
    assert res.report.mean_bits == 4 and _kl(model, res, calib) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not modified


def test_evopress_bits_keeps_the_budget_and_is_not_worse_than_uniform():
    """Layer 4's weights are scaled down (its rounding noise barely reaches the output), so moving one of its
    bits to the same-size layer 2 lowers the KL: the search must find such a trade, at the same budget."""
    model, calib = _mlp(), _calibration(batches=2)
    with torch.no_grad():
        model[4].weight.mul_(0.05)
    uniform = _mixed(model, "uniform", 3, calib)
    evo = _mixed(model, "evopress", 3, calib, generations=12, offspring=6, survivors=(3, 1), max_step=2)
    assert evo.report.mean_bits == 3
    assert _kl(model, evo, calib) < _kl(model, uniform, calib)
    assert evo.bits != uniform.bits  # it found a better configuration than its start


def test_evopress_bits_pure_search_on_a_known_fitness():
    sizes = {"a": 10, "b": 10, "c": 10, "d": 20}
    target = {"a": 4, "b": 2, "c": 3, "d": 3}  # same 150 bits as uniform 3; d (size 20) cannot trade

    def fitness(bits, stage, generation):
        return sum(abs(bits[n] - target[n]) for n in sizes)

    found = evopress_bits(sizes, 3, fitness, choices=(2, 3, 4, 8), generations=60, offspring=8, survivors=(1,))
    assert mean_bits(found, sizes) == 3
    assert found == target
    with pytest.raises(ValueError, match="start"):
        evopress_bits(sizes, 3, fitness, start={"a": 8, "b": 8, "c": 8, "d": 8})
    with pytest.raises(ValueError, match="choices"):
        evopress_bits(sizes, 5, fitness)
