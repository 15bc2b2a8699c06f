"""WSD, WSD-S, refinement and the schedule registry: exact factors at chosen steps."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from trainlab.schedules import (
    RefinedLR,
    WarmupStableDecay,
    WarmupStableDecaySimplified,
    create_scheduler,
    refined_schedule,
    scheduler_names,
    smooth_grad_norms,
    wsd_lambda,
)


def make_optimizer(lr: float = 2.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def lrs(scheduler, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


# ---- WSD ----


def test_wsd_linear_shape_at_chosen_steps():
    f = wsd_lambda(1000, warmup_steps=10, decay_fraction=0.1, min_lr_ratio=0.1)
    assert [f(t) for t in (0, 4, 9)] == [0.1, 0.5, 1.0]  # warmup (t+1)/w
    assert f(10) == f(500) == f(899) == 1.0  # stable
    assert math.isclose(f(900), 1 - 0.9 * 1 / 100)  # first decay step
    assert math.isclose(f(949), 1 - 0.9 * 50 / 100)
    assert math.isclose(f(999), 0.1) and f(1000) == f(5000) == 0.1  # ends at min, then holds


@pytest.mark.parametrize(
    "shape,mid",
    [
        ("linear", 1 - 0.9 * 0.5),
        ("cosine", 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))),
        ("inv", 1 / (1 + 9 * 0.5)),
    ],
)
def test_wsd_decay_shapes(shape, mid):
    f = wsd_lambda(200, warmup_steps=0, decay_fraction=0.5, min_lr_ratio=0.1, decay_shape=shape)
    assert math.isclose(f(149), mid)  # τ = 50/100
    assert math.isclose(f(199), 0.1)
    decay = [f(t) for t in range(100, 200)]
    assert all(b < a for a, b in zip(decay, decay[1:], strict=False))


def test_wsd_default_warmup_is_one_percent_and_min_ratio_zero_reaches_zero():
    f = wsd_lambda(1000, min_lr_ratio=0.0)
    assert f(0) == 0.1 and f(9) == 1.0 and f(999) == 0.0


def test_wsd_scheduler_drives_the_optimizer_lr():
    opt = make_optimizer(2.0)
    got = lrs(WarmupStableDecay(opt, 20, warmup_steps=2, decay_fraction=0.25, min_lr_ratio=0.0), opt, 20)
    expected = [1.0, 2.0] + [2.0] * 13 + [2.0 * (1 - k / 5) for k in range(1, 6)]
    assert np.allclose(got, expected, atol=1e-12)


# ---- WSD-S ----


def test_wsd_s_decays_before_each_checkpoint_and_jumps_back_without_warmup():
    opt = make_optimizer(1.0)
    sched = WarmupStableDecaySimplified(opt, 300, warmup_steps=10, decay_fraction=0.1, min_lr_ratio=0.1)
    assert sched.checkpoints == [100, 200, 300]
    got = lrs(sched, opt, 300)
    for end in sched.checkpoints:
        assert math.isclose(got[end - 1], 0.1)  # decayed model at the pit stop
        assert math.isclose(got[end - 11], 1.0) and got[end - 10] < 1.0  # 10-step decay
    assert got[100] == 1.0 and got[200] == 1.0  # straight back to peak: no re-warmup
    assert got[0] == 0.1  # warmup only in the first cycle


def test_wsd_s_uneven_checkpoints_decay_a_fraction_of_each_cycle():
    f = wsd_lambda(400, warmup_steps=0, decay_fraction=0.2, checkpoints=[100, 400], min_lr_ratio=0.0)
    assert f(79) == 1.0 and f(80) < 1.0 and f(99) == 0.0  # 20 of 100
    assert f(100) == 1.0 and f(339) == 1.0 and f(340) < 1.0 and f(399) == 0.0  # 60 of 300


def test_wsd_with_one_checkpoint_is_wsd():
    a = wsd_lambda(500, warmup_steps=5)
    b = wsd_lambda(500, warmup_steps=5, checkpoints=[500])
    assert [a(t) for t in range(501)] == [b(t) for t in range(501)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"total_steps": 0}, "total_steps"),
        ({"decay_shape": "step"}, "decay_shape"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"decay_shape": "inv", "min_lr_ratio": 0.0}, "min_lr_ratio > 0"),
        ({"decay_fraction": 0.0}, "decay_fraction"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 95}, "warmup_steps=95"),
        ({"checkpoints": [50, 40, 100]}, "checkpoints"),
        ({"checkpoints": [50, 90]}, "checkpoints"),
    ],
)
def test_wsd_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        wsd_lambda(**{"total_steps": 100, **kwargs})


# ---- refinement ----


def test_refined_constant_norms_give_exactly_linear_decay():
    n = 1000
    sched = np.array(refined_schedule([3.7] * n))
    linear = 1 - np.arange(n) / (n - 1)
    assert np.abs(sched - linear).max() < 1e-12
    adam = np.array(refined_schedule([3.7] * n, kind="adam"))
    assert np.abs(adam - linear).max() < 1e-12


def test_refined_decreasing_norms_give_a_warmup_like_peak():
    sched = np.array(refined_schedule(np.linspace(1.0, 0.2, 1000)))
    peak = int(sched.argmax())
    assert sched.max() == 1.0 and sched[-1] == 0.0
    assert 0.8 < peak / 1000 < 0.92  # the spec's 87% of T
    assert np.all(np.diff(sched[: peak + 1]) > 0)  # rises all the way to the peak: a warmup
    assert sched[0] < 0.3


def test_refined_weights_follow_the_closed_form():
    norms = [2.0, 1.0, 4.0, 1.0, 2.0]
    w = np.array(norms) ** -2.0  # N=5: median width 1, no smoothing
    eta = np.array([w[t] * w[t + 1 :].sum() for t in range(5)])
    assert np.allclose(refined_schedule(norms), eta / eta.max(), atol=1e-15)
    w1 = np.array(norms) ** -1.0
    eta1 = np.array([w1[t] * w1[t + 1 :].sum() for t in range(5)])
    assert np.allclose(refined_schedule(norms, kind="adam"), eta1 / eta1.max(), atol=1e-15)


def test_median_smoothing_removes_spikes():
    norms = np.ones(200)
    norms[[50, 120, 199]] = 100.0  # width 21
    assert np.array_equal(smooth_grad_norms(norms), np.ones(200))
    assert len(smooth_grad_norms(norms)) == 200


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ([1.0], {}, "at least 2"),
        ([1.0, 0.0, 1.0], {}, "positive"),
        ([1.0, float("nan")], {}, "finite"),
        ([1.0, 1.0], {"kind": "lion"}, "kind"),
        ([1.0, 1.0], {"smoothing_fraction": 1.0}, "smoothing_fraction"),
    ],
)
def test_refined_bad_arguments_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        refined_schedule(args, **kwargs)


def test_refined_lr_follows_the_schedule_and_stays_at_zero():
    opt = make_optimizer(0.5)
    norms = np.linspace(1.0, 0.5, 50)
    got = lrs(RefinedLR(opt, norms), opt, 55)
    assert np.allclose(got[:50], 0.5 * np.array(refined_schedule(norms)), atol=1e-15)
    assert got[50:] == [0.0] * 5


# ---- registry and state dicts ----


def test_registry_names_and_errors():
    assert scheduler_names() == ["constant", "cosine", "linear", "refined", "wsd", "wsd-s"]
    with pytest.raises(ValueError, match="unknown schedule"):
        create_scheduler("step", make_optimizer(), 10)
    with pytest.raises(ValueError, match="needs grad_norms"):
        create_scheduler("refined", make_optimizer(), 10)
    with pytest.raises(ValueError, match="needs 10"):
        create_scheduler("refined", make_optimizer(), 10, grad_norms=[1.0] * 9)
    with pytest.raises(ValueError, match="unknown option.*decay_fraction"):
        create_scheduler("cosine", make_optimizer(), 10, decay_fraction=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        create_scheduler("wsd", make_optimizer(), 0)


def test_registry_shapes():
    n = 10
    curves = {}
    for name in ("constant", "linear", "cosine"):
        opt = make_optimizer(1.0)
        curves[name] = lrs(create_scheduler(name, opt, n), opt, n)
    assert curves["constant"] == [1.0] * n
    assert np.allclose(curves["linear"], [1 - t / n for t in range(n)], atol=1e-12)
    assert np.allclose(curves["cosine"], [0.5 * (1 + math.cos(math.pi * t / n)) for t in range(n)], atol=1e-12)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("wsd", {"warmup_steps": 3}),
        ("wsd-s", {"checkpoints": [10, 30], "warmup_steps": 0}),
        ("refined", {"grad_norms": list(np.linspace(2.0, 1.0, 30))}),
        ("linear", {}),
        ("cosine", {}),
    ],
)
def test_state_dict_round_trips_mid_run(name, kwargs):
    opt = make_optimizer(1.0)
    sched = create_scheduler(name, opt, 30, **kwargs)
    reference = lrs(sched, opt, 30)
    opt1 = make_optimizer(1.0)
    s1 = create_scheduler(name, opt1, 30, **kwargs)
    first = lrs(s1, opt1, 12)
    buffer = io.BytesIO()
    torch.save({"opt": opt1.state_dict(), "sched": s1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    opt2 = make_optimizer(1.0)
    s2 = create_scheduler(name, opt2, 30, **kwargs)
    opt2.load_state_dict(saved["opt"])
    s2.load_state_dict(saved["sched"])
    assert np.allclose(first + lrs(s2, opt2, 18), reference, atol=1e-15)
