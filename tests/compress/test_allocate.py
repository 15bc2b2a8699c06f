"""Allocators: exact budgets, global ranking with the per-layer minimum, DP optimality against brute force,
EvoPress equal-cost moves, and reuse of the generic back-ends for bit-widths."""

import itertools
import random

import pytest
import torch

from trainlab.compress import allocate as alloc


def test_budget_and_uniform_are_exact():
    sizes = {"a": 1001, "b": 37, "c": 4096, "d": 3}
    for s in (0.0, 0.1, 0.5, 0.9, 0.97, 0.999):
        kept = alloc.uniform(sizes, s)
        assert sum(kept.values()) == alloc.budget_for(sizes, s) == 5137 - round(s * 5137)
        assert all(0 <= kept[k] <= n and abs(kept[k] - n * (1 - s)) < 1 for k, n in sizes.items())
    with pytest.raises(ValueError, match="sparsity must be a number in \\[0, 1\\)"):
        alloc.uniform(sizes, 1.0)


def test_global_magnitude_is_one_threshold_over_all_layers():
    torch.manual_seed(0)
    weights = {"a": torch.randn(30, 20), "b": 0.1 * torch.randn(50), "c": 3 * torch.randn(7, 7)}
    kept = alloc.global_magnitude(weights, 0.8, min_threshold=0.0)
    everything = torch.cat([w.flatten().abs() for w in weights.values()])
    threshold = everything.sort(descending=True).values[sum(kept.values()) - 1]
    assert sum(kept.values()) == 699 - round(0.8 * 699)
    for k, w in weights.items():  # each layer keeps exactly its weights above the one threshold
        assert kept[k] == int((w.abs() >= threshold).sum())


def test_global_minimum_threshold_floor_and_tiny_layers():
    # MT = 1% of all 10_000 + 50 weights -> T = 100: layer "small" (magnitudes ~1e-3) would collapse without it,
    # layer "tiny" (50 < T weights) stays dense.
    torch.manual_seed(0)
    weights = {"big": torch.randn(9900), "small": 1e-3 * torch.randn(100), "tiny": 1e-3 * torch.randn(50)}
    plain = alloc.global_magnitude(weights, 0.9, min_threshold=0.0)
    assert plain["small"] == 0 and plain["tiny"] == 0  # layer collapse
    kept = alloc.global_magnitude(weights, 0.9, min_threshold=1.0)
    assert kept == {"big": 1005 - 150, "small": 100, "tiny": 50}
    assert sum(kept.values()) == alloc.budget_for({k: w.numel() for k, w in weights.items()}, 0.9)
    with pytest.raises(ValueError, match="fewer than the per-layer minimum"):
        alloc.global_magnitude(weights, 0.99, min_threshold=1.0)
    with pytest.raises(ValueError, match="min_threshold must be >= 0"):
        alloc.global_magnitude(weights, 0.5, min_threshold=-1)


def _brute_force(costs, errors, budget):
    best = None
    for combo in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[j] for c, j in zip(costs, combo, strict=True))
        err = sum(e[j] for e, j in zip(errors, combo, strict=True))
        if cost <= budget and (best is None or err < best):
            best = err
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    costs = [sorted(rng.sample(range(0, 30), 5)) for _ in range(4)]
    errors = [[rng.random() for _ in c] for c in costs]
    budget = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
    picks = alloc.dp_allocate(costs, errors, budget)
    assert sum(c[j] for c, j in zip(costs, picks, strict=True)) <= budget
    found = sum(e[j] for e, j in zip(errors, picks, strict=True))
    assert found == pytest.approx(_brute_force(costs, errors, budget), abs=1e-12)


def test_dp_infeasible_budget_is_an_error():
    with pytest.raises(ValueError, match="no choice of levels fits the budget 3"):
        alloc.dp_allocate([[2, 5], [2, 4]], [[1.0, 0.0], [1.0, 0.0]], 3)


def test_dp_reused_for_bit_widths():
    # the quantization use: levels are bit-widths, cost = bits * numel, error falls with bits
    numel = [100, 400, 50]
    bits = [2, 3, 4, 8]
    costs = [[b * n for b in bits] for n in numel]
    sensitivity = [5.0, 0.1, 1.0]
    errors = [[s * 4.0**-b for b in bits] for s in sensitivity]
    budget = 4 * sum(numel)  # 4 bits on average
    picks = alloc.dp_allocate(costs, errors, budget)
    best = _brute_force(costs, errors, budget)
    assert sum(e[j] for e, j in zip(errors, picks, strict=True)) == pytest.approx(best)
    assert bits[picks[0]] > bits[picks[1]]  # the sensitive small layer gets more bits than the robust big one


def test_layer_adaptive_spends_the_budget_exactly_and_follows_the_curves():
    sizes = {"a": 200, "b": 200}
    levels = list(range(0, 201, 20))
    curves = {"a": (levels, [(200 - k) ** 2 * 1.0 for k in levels]), "b": (levels, [(200 - k) * 0.01 for k in levels])}
    kept = alloc.layer_adaptive(sizes, curves, 0.5)
    assert sum(kept.values()) == 200
    assert kept["a"] == 200 and kept["b"] == 0  # "a" is far more sensitive


def test_mutation_keeps_cost_exactly():
    rng = random.Random(0)
    costs = [[0, 3, 6, 9], [0, 3, 6, 9, 12], [1, 4, 7]]
    config = [1, 2, 1]
    for _ in range(500):
        child = alloc.mutate(config, costs, rng, max_step=2)
        assert sum(c[j] for c, j in zip(costs, child, strict=True)) == sum(
            c[j] for c, j in zip(costs, config, strict=True)
        )
        assert all(0 <= j < len(c) for c, j in zip(costs, child, strict=True))
        config = child


def test_mutation_only_trades_between_equal_cost_steps():
    # bit-width use: per-step costs differ (numel 10 vs 30), so only the two size-10 layers can trade
    costs = [[20, 30, 40], [20, 30, 40], [60, 90, 120]]
    rng = random.Random(1)
    for _ in range(200):
        child = alloc.mutate([1, 1, 1], costs, rng)
        assert child[2] == 1 and child[0] + child[1] == 2


def test_evolutionary_search_finds_the_optimum_of_a_separable_toy():
    costs = [list(range(0, 11)) for _ in range(4)]
    target = [8, 2, 6, 4]  # total 20 = start's total

    def fitness(config, stage, generation):
        return sum((c - t) ** 2 for c, t in zip(config, target, strict=True))

    best = alloc.evolutionary_search(costs, [5, 5, 5, 5], fitness, 60, 8, (3, 1), seed=0)
    assert best == target
    with pytest.raises(ValueError, match="survivors must end with 1"):
        alloc.evolutionary_search(costs, [5, 5, 5, 5], fitness, 1, 8, (3, 2))


@pytest.mark.parametrize("sparsity", [0.3, 0.7, 0.9])
def test_evopress_budget_is_exact_and_search_moves_weights(sparsity):
    sizes = {"a": 1000, "b": 313, "c": 4999, "d": 77}
    budget = alloc.budget_for(sizes, sparsity)
    seen = []

    def fitness(kept, stage, generation):  # prefers "a" dense: loss falls with its kept weights
        assert sum(kept.values()) == budget
        seen.append(stage)
        return -kept["a"] / sizes["a"] + 0.001 * kept["c"] / sizes["c"]

    kept = alloc.evopress(sizes, sparsity, fitness, generations=30, offspring=6, survivors=(2, 1))
    assert sum(kept.values()) == budget
    assert all(0 <= kept[k] <= n for k, n in sizes.items())
    assert kept["a"] > alloc.uniform(sizes, sparsity)["a"]
    assert set(seen) == {0, 1}
