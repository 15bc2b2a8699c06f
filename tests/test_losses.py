"""StableMax and its cross-entropy: exact values, and the Softmax Collapse it avoids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainlab.losses import stablemax, stablemax_cross_entropy


def s_ref(x: float) -> float:
    return x + 1 if x >= 0 else 1 / (1 - x)


def test_stablemax_values_sum_to_one_and_match_the_definition():
    x = torch.tensor([[-3.0, -0.5, 0.0, 2.0], [10.0, -10.0, 1.0, 0.25]], dtype=torch.float64)
    p = stablemax(x)
    assert torch.allclose(p.sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-15)
    for row, prow in zip(x.tolist(), p, strict=True):
        s = [s_ref(v) for v in row]
        assert torch.allclose(prow, torch.tensor([v / sum(s) for v in s], dtype=torch.float64), atol=1e-15)
    q = stablemax(x.T, dim=0)
    assert torch.allclose(q, p.T)


def test_stablemax_is_monotone_in_each_logit():
    x = torch.linspace(-20, 20, 401, dtype=torch.float64)
    logits = torch.stack([x, torch.zeros_like(x), torch.full_like(x, -1.0)], dim=1)
    p = stablemax(logits)
    assert (p[1:, 0] > p[:-1, 0]).all()  # own probability rises with its logit
    assert (p[1:, 1] < p[:-1, 1]).all()  # the others fall


def test_cross_entropy_equals_minus_log_stablemax_in_float64_and_keeps_dtype():
    torch.manual_seed(0)
    logits = torch.randn(6, 5) * 4
    targets = torch.randint(0, 5, (6,))
    loss = stablemax_cross_entropy(logits, targets)
    assert loss.dtype == torch.float32
    ref = -stablemax(logits.double()).gather(1, targets[:, None]).log().mean()
    assert abs(loss.item() - ref.item()) < 1e-6
    per = stablemax_cross_entropy(logits.double(), targets, reduction="none")
    assert per.shape == (6,) and abs(per.mean().item() - ref.item()) < 1e-14
    summed = stablemax_cross_entropy(logits.double(), targets, reduction="sum")
    assert abs(summed.item() - per.sum().item()) < 1e-13
    seq = stablemax_cross_entropy(logits.double().view(2, 3, 5), targets.view(2, 3))
    assert abs(seq.item() - ref.item()) < 1e-14


def test_softmax_collapses_at_large_margin_but_stablemax_does_not():
    y = torch.tensor([2])
    logits = torch.zeros(1, 10)
    logits[0, 2] = 1e4
    soft = logits.clone().requires_grad_(True)
    F.cross_entropy(soft, y).backward()
    assert F.cross_entropy(logits, y).item() == 0.0 and torch.count_nonzero(soft.grad) == 0  # collapse
    stable = logits.clone().requires_grad_(True)
    loss = stablemax_cross_entropy(stable, y)
    loss.backward()
    assert 0 < loss.item() and torch.isfinite(stable.grad).all() and torch.count_nonzero(stable.grad) == 10
    # -log((1e4+1)/(1e4+10)) ≈ 9/1e4
    assert abs(loss.item() - 9 / 1e4) < 1e-6


def test_gradient_is_finite_around_zero_and_for_large_negative_logits():
    x = torch.tensor([[-1e6, -1.0, 0.0, 1.0, 1e6]], dtype=torch.float64, requires_grad=True)
    stablemax_cross_entropy(x, torch.tensor([2])).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "logits,targets,kwargs,match",
    [
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), {}, "floating-point"),
        (torch.zeros(2, 3), torch.zeros(2), {}, "integer"),
        (torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), {}, "shape"),
        (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), {"reduction": "avg"}, "reduction"),
    ],
)
def test_bad_arguments_raise(logits, targets, kwargs, match):
    with pytest.raises(ValueError, match=match):
        stablemax_cross_entropy(logits, targets, **kwargs)


def test_stablemax_bad_dim_raises():
    with pytest.raises(ValueError, match="dim"):
        stablemax(torch.zeros(2, 3), dim=2)
