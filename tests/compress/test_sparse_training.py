"""N:M sparse training: exact masks, SR-STE and PGF gradients, schedules, conversion and export."""

import math

import pytest
import torch
from torch import nn

from trainlab.compress.masks import get_mask, mask_pattern
from trainlab.compress.sparse_training import (
    NMSchedule,
    NMSparseLinear,
    NMStepper,
    finalize,
    set_step,
    sparsify_linears,
)


def _layer(schedule: NMSchedule, in_features: int = 16, out_features: int = 6) -> NMSparseLinear:
    torch.manual_seed(0)
    return NMSparseLinear(in_features, out_features, schedule).double()


def _grads(layer: NMSparseLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight.grad, dL/dW_eff, keep mask) for L = sum(r * layer(x)), in float64."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, layer.in_features, dtype=torch.float64, generator=gen)
    r = torch.randn(5, layer.out_features, dtype=torch.float64, generator=gen)
    (layer(x) * r).sum().backward()
    g = r.T @ x  # dL/dW_eff of a linear layer
    keep = torch.zeros_like(layer.weight, dtype=torch.bool)
    groups = layer.weight.detach().abs().reshape(-1, layer.schedule.m)
    keep.view(-1, layer.schedule.m).scatter_(1, groups.topk(layer.schedule.n, dim=1).indices, True)
    return layer.weight.grad, g, keep.double()


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 4), (1, 8), (3, 8), (1, 16)])
def test_every_group_keeps_exactly_n(n, m):
    layer = _layer(NMSchedule(n, m, "sr-ste"), in_features=32)
    w = layer.sparse_weight().detach()
    nonzeros = (w.reshape(-1, m) != 0).sum(dim=1)
    assert torch.equal(nonzeros, torch.full_like(nonzeros, n))
    kept = w.reshape(-1, m).abs().sort(dim=1).values[:, -n:]
    largest = layer.weight.detach().reshape(-1, m).abs().sort(dim=1).values[:, -n:]
    assert torch.equal(kept, largest)  # the kept ones are the largest of their group


def test_srste_gradient_is_g_plus_lambda_pruned_weight():
    layer = _layer(NMSchedule(1, 4, "sr-ste"))
    grad, g, keep = _grads(layer)
    torch.testing.assert_close(grad, g + 2e-4 * (1 - keep) * layer.weight.detach(), rtol=0, atol=1e-15)


def test_srste_sgd_update_equals_formula():
    """One SGD step: W <- W - lr (g + lambda (1 - m) W), g = dL/dW_eff; the kept weights move by -lr g only."""
    lam, lr = 0.3, 0.1  # a large lambda so a missing or mis-scaled decay term is far above rounding
    layer = _layer(NMSchedule(1, 8, "sr-ste", srste_lambda=lam))
    w0 = layer.weight.detach().clone()
    _, g, keep = _grads(layer)
    torch.optim.SGD([layer.weight], lr=lr).step()
    torch.testing.assert_close(layer.weight.detach(), w0 - lr * (g + lam * (1 - keep) * w0), rtol=0, atol=1e-15)
    pruned = keep == 0
    assert (layer.weight.detach() - (w0 - lr * g)).abs()[pruned].min() > 0  # the decay term acted on the pruned


def test_mdgf_decay_schedule_matches_formula():
    exp = NMSchedule(1, 8, "mdgf", total_steps=200, dense_steps=10, fine_tune_steps=50, decay="exp", decay_coef=0.01)
    assert exp.at(9) is None  # dense phase
    assert exp.at(10).alpha == 1.0
    assert exp.at(60).alpha == pytest.approx(math.exp(-0.5), abs=1e-15)
    assert exp.at(149).alpha == pytest.approx(math.exp(-1.39), abs=1e-15)
    assert exp.at(150).alpha == 0.0 and exp.at(199).alpha == 0.0  # fine-tune: hard mask
    lin = NMSchedule(1, 8, "mdgf", decay="linear", decay_coef=0.004)
    assert [lin.at(t).alpha for t in (0, 100, 200)] == pytest.approx([1.0, 0.6, 0.2], abs=1e-15)
    assert lin.at(250).alpha == 0.0 and lin.at(10_000).alpha == 0.0
    assert NMSchedule(2, 4).decay_coef == 2e-4 and NMSchedule(2, 4).srste_lambda == 2e-4  # official defaults


@pytest.mark.parametrize("pruned_grad", ["straight", "scaled"])
def test_mdgf_forward_and_pruned_gradient(pruned_grad):
    schedule = NMSchedule(2, 8, "mdgf", decay="exp", decay_coef=0.01, pruned_grad=pruned_grad)
    layer = _layer(schedule)
    set_step(layer, 30)
    alpha = math.exp(-0.3)
    grad, g, keep = _grads(layer)
    w = layer.weight.detach()
    torch.testing.assert_close(layer.sparse_weight().detach(), w * (keep + (1 - keep) * alpha), rtol=0, atol=0)
    # official code: straight-through (pruned weights get g unscaled); "scaled": chain rule, pruned × alpha
    expected = g if pruned_grad == "straight" else g * (keep + (1 - keep) * alpha)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-15)


def test_sdgf_patterns_tighten_in_equal_frames():
    s = NMSchedule(1, 8, "sdgf", total_steps=100, dense_steps=10, fine_tune_steps=30)
    assert s.patterns() == [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert s.at(9) is None
    got = {t: (s.at(t).n, s.at(t).m) for t in (10, 29, 30, 49, 50, 69, 70, 99)}
    assert got == {10: (7, 8), 29: (7, 8), 30: (4, 8), 49: (4, 8), 50: (2, 8), 69: (2, 8), 70: (1, 8), 99: (1, 8)}
    assert all(s.at(t).alpha == 0 and s.at(t).lam == 0 for t in range(10, 100))
    fine = NMSchedule(1, 8, "sdgf", total_steps=100, fine_tune_steps=10, structure="fine")
    assert fine.patterns() == [(8, 64), (4, 32), (2, 16), (1, 8)]


def test_convert_train_and_finalize_any_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # built before conversion: params are shared
    names = sparsify_linears(model, NMSchedule(1, 4, "sr-ste"))
    assert names == ["0", "2"] and type(model[4]) is nn.Linear  # output head stays dense
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    before = model[2].weight.detach().clone()
    for step in range(5):
        set_step(model, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert not torch.equal(before, model[2].weight)
    with torch.no_grad():
        hard = model(x)
    masks = finalize(model)
    assert set(masks) == {"0", "2"} and all(type(model[i]) is nn.Linear for i in (0, 2))
    for name, mask in masks.items():
        layer = model.get_submodule(name)
        assert torch.equal((layer.weight != 0), mask) and torch.equal(get_mask(layer), mask)
        assert mask_pattern(layer) == "1:4"
    torch.testing.assert_close(model(x), hard, rtol=0, atol=0)


def test_include_pattern_selects_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    assert sparsify_linears(model, NMSchedule(2, 4), include="1") == ["1"]
    with pytest.raises(ValueError, match="include"):
        sparsify_linears(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), NMSchedule(2, 4), include="nothing")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"n": 4, "m": 4}, "n and m"),
        ({"n": 5, "m": 4}, "n and m"),
        ({"n": 0, "m": 4}, "n and m"),
        ({"method": "srste"}, "method must be one of ste, sr-ste, mdgf, sdgf"),
        ({"decay": "cosine"}, "decay"),
        ({"method": "sdgf", "total_steps": 100}, "fine_tune_steps"),
        ({"method": "mdgf", "fine_tune_steps": 10}, "total_steps"),
        ({"pruned_grad": "none"}, "pruned_grad"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        NMSchedule(**kwargs)


def test_input_dimension_must_divide_m():
    with pytest.raises(ValueError, match="in_features"):
        NMSparseLinear(12, 4, NMSchedule(1, 8))


def test_stepper_drives_the_schedule_through_the_runner():
    from trainlab.lab.runner import train
    from trainlab.lab.workloads import get_workload

    torch.set_num_threads(1)
    schedule = NMSchedule(1, 8, "mdgf", total_steps=12, dense_steps=2, fine_tune_steps=4, decay_coef=0.5)
    seen: list[tuple[int, float]] = []
    box: list[nn.Module] = []

    def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        sparsify_linears(model, schedule)
        box.append(model)
        return torch.optim.SGD(model.parameters(), lr=0.05)

    def record(step: int, model: nn.Module) -> None:  # after backward: which phase did this step's forward use?
        layer = model[1]
        phase = layer.schedule.at(int(layer.step))
        seen.append((int(layer.step), -1.0 if phase is None else phase.alpha))

    result = train(
        get_workload("digits-mlp"),
        make_optimizer,
        steps=12,
        eval_every=12,
        on_gradients=record,
        make_scheduler=lambda opt: NMStepper(box[0]),
    )
    assert [s for s, _ in seen] == list(range(12))
    assert [a for _, a in seen] == [-1.0, -1.0] + [math.exp(-0.5 * t) for t in range(6)] + [0.0] * 4
    assert int(result.model[3].step) == 12 and NMStepper(box[0]).state_dict() == {}
    with pytest.raises(ValueError, match="NMSparseLinear"):
        NMStepper(nn.Sequential(nn.Linear(4, 4)))
