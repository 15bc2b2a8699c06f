"""Compressors: exact kept counts for magnitude pruning, the N:M pattern on Linear and Conv layers, the cubic
schedule and the gradual pruner, the nested magnitude level database."""

import pytest
import torch
from torch import nn

from trainlab.compress.masks import get_mask, mask_pattern
from trainlab.compress.prune import (
    GradualMagnitudePruner,
    MagnitudeLevels,
    cubic_sparsity,
    is_nm,
    kept_count,
    magnitude_mask,
    nm_mask,
    parse_pattern,
    prune_magnitude,
    prune_nm,
)


@pytest.mark.parametrize("shape", [(7, 13), (8, 3, 3, 3), (5, 4, 3)])
@pytest.mark.parametrize("s", [0.0, 0.25, 0.5, 0.9, 0.99, 1.0])
def test_magnitude_keeps_exactly_the_largest(shape, s):
    torch.manual_seed(0)
    w = torch.randn(shape)
    mask = magnitude_mask(w, kept_count(w.numel(), s))
    n = w.numel()
    assert int(mask.sum()) == n - round(s * n)
    if 0 < mask.sum() < n:
        assert w[mask].abs().min() > w[~mask].abs().max()


def test_magnitude_ties_still_give_exact_counts():
    w = torch.ones(10, 10)
    assert int(magnitude_mask(w, 37).sum()) == 37


def test_prune_magnitude_zeroes_the_layer_in_place():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 8, 3)
    prune_magnitude(layer, 0.7)
    assert int((layer.weight != 0).sum()) == 216 - round(0.7 * 216) == int(get_mask(layer).sum())
    with pytest.raises(ValueError, match="a layer's sparsity must be a number in \\[0, 1\\]"):
        prune_magnitude(layer, 1.5)


@pytest.mark.parametrize("pattern", ["1:2", "2:4", "1:4", "3:8", "1:8", "1:16"])
def test_nm_linear_keeps_n_largest_of_every_m_consecutive_inputs(pattern):
    n, m = parse_pattern(pattern)
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    mask = nm_mask(w, n, m)
    assert is_nm(mask, n, m) and int(mask.sum()) == 6 * 32 * n // m
    groups, gmask = w.abs().reshape(-1, m), mask.reshape(-1, m)
    kept_min = torch.where(gmask, groups, torch.inf).min(dim=1).values
    dropped_max = torch.where(gmask, -torch.inf, groups).max(dim=1).values
    assert bool((kept_min > dropped_max).all())


def test_nm_conv_groups_run_over_input_channels():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 4, 3)
    prune_nm(layer, "2:4")
    mask = get_mask(layer)
    assert mask_pattern(layer) == "2:4"
    # for every (out, kh, kw), each block of 4 consecutive input channels keeps exactly 2
    assert bool((mask.reshape(4, 2, 4, 3, 3).sum(dim=2) == 2).all())
    assert is_nm(mask, 2, 4) and not is_nm(mask.transpose(0, 1), 2, 4)


def test_nm_bad_patterns_are_errors():
    for bad in ("4:2", "2:2", "0:4", "2-4", "a:b"):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)
    with pytest.raises(ValueError, match="divisible by M=4"):
        nm_mask(torch.randn(3, 6), 2, 4)


def test_cubic_schedule_values():
    assert cubic_sparsity(0, 0.9, 10, 110) == 0.0
    assert cubic_sparsity(10, 0.9, 10, 110) == 0.0
    assert cubic_sparsity(60, 0.9, 10, 110) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert cubic_sparsity(35, 0.8, 10, 110, initial=0.2) == pytest.approx(0.8 - 0.6 * 0.75**3)
    assert cubic_sparsity(110, 0.9, 10, 110) == cubic_sparsity(500, 0.9, 10, 110) == 0.9
    with pytest.raises(ValueError, match="end \\(5\\) must be after begin \\(5\\)"):
        cubic_sparsity(0, 0.9, 5, 5)


def test_gradual_pruner_follows_the_schedule_during_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = GradualMagnitudePruner(model, 0.8, begin=4, end=20, frequency=4)
    observed = {}
    for t in range(1, 26):
        opt.zero_grad()
        model(torch.randn(16, 10)).pow(2).mean().backward()
        opt.step()
        pruner.step()
        observed[t] = int((model[0].weight == 0).sum())
    for t in (4, 8, 12, 16, 20):
        assert observed[t] == round(cubic_sparsity(t, 0.8, 4, 20) * 400), t
    assert observed[7] == observed[4] and observed[25] == 320  # constant between pruning steps, final 80%
    with pytest.raises(ValueError, match="unknown layers"):
        GradualMagnitudePruner(model, 0.5, 0, 10, layers=["9"])
    with pytest.raises(ValueError, match="final_sparsity must be a number"):
        GradualMagnitudePruner(model, 1.0, 0, 10)


def test_magnitude_levels_are_nested():
    torch.manual_seed(0)
    db = MagnitudeLevels({"a": torch.randn(6, 6)})
    masks = [db.weight("a", k) != 0 for k in range(37)]
    assert [int(m.sum()) for m in masks] == list(range(37))
    assert all(bool((masks[k] <= masks[k + 1]).all()) for k in range(36))
    assert torch.equal(masks[10], magnitude_mask(db.dense["a"], 10))
