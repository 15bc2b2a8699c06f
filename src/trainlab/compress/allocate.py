"""Allocators: pure functions that choose a level per layer under one global budget.

The search back-ends (:func:`dp_allocate`, :func:`evolutionary_search`, :func:`mutate`) are generic: a layer
offers a list of levels, each with an integer cost (kept weights for pruning; bits for quantization) and,
for the DP, an error. The pruning front-ends (:func:`uniform`, :func:`global_magnitude`,
:func:`layer_adaptive`, :func:`evopress`) return the number of weights each layer keeps, and always spend
the budget ``K = N - round(s * N)`` exactly, to the weight.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from trainlab.compress.calibrate import distortion_curves, staged_kl_fitness
from trainlab.compress.plan import Plan
from trainlab.compress.prune import MagnitudeLevels, check_sparsity, kept_count
from trainlab.compress.registry import Allocation, Hyperparameter, register_allocator

Fitness = Callable[[list[int], int, int], float]  # (level indices, selection stage, generation) -> loss


def budget_for(sizes: Mapping[str, int], sparsity: float) -> int:
    """Total kept weights at global ``sparsity``: ``N - round(s * N)``."""
    total = sum(sizes.values())
    return total - round(check_sparsity(sparsity) * total)


def _largest_remainder(shares: Mapping[str, float], caps: Mapping[str, int], total: int) -> dict[str, int]:
    """Integers proportional to ``shares``, each at most its cap, summing exactly to ``total``."""
    floors = {k: min(int(v), caps[k]) for k, v in shares.items()}
    order = sorted(shares, key=lambda k: shares[k] - int(shares[k]), reverse=True)
    left = total - sum(floors.values())
    while left > 0:
        grew = False
        for k in order:
            if left and floors[k] < caps[k]:
                floors[k] += 1
                left -= 1
                grew = True
        if not grew:
            raise ValueError(f"budget {total} exceeds the total size {sum(caps.values())}")
    return floors


def uniform(sizes: Mapping[str, int], sparsity: float) -> dict[str, int]:
    """Every layer at the same sparsity (rounding spread by largest remainder so the total is exact)."""
    budget = budget_for(sizes, sparsity)
    total = sum(sizes.values())
    return _largest_remainder({k: n * budget / total for k, n in sizes.items()}, sizes, budget)


def global_magnitude(
    weights: Mapping[str, torch.Tensor], sparsity: float, min_threshold: float = 0.05
) -> dict[str, int]:
    """Global MP with the Minimum Threshold (MT) of Gupta et al.: one magnitude threshold over all layers,
    but every layer keeps at least ``T = int(N * min_threshold / 100)`` weights (``min_threshold`` is a
    percentage of ALL weights, official default 0.05; layers smaller than T stay dense).

    The weights above the per-layer floor compete in one global ranking. The official code instead rescales
    the other layers' sparsities proportionally after flooring; ranking the rest globally keeps "one
    threshold" literally true and makes the budget exact.
    """
    if min_threshold < 0:
        raise ValueError(f"min_threshold must be >= 0 (percent of all weights), got {min_threshold}")
    sizes = {k: w.numel() for k, w in weights.items()}
    budget = budget_for(sizes, sparsity)
    floor = int(sum(sizes.values()) * min_threshold / 100)
    forced = {k: min(floor, n) for k, n in sizes.items()}
    rest = budget - sum(forced.values())
    if rest < 0:
        raise ValueError(
            f"sparsity {sparsity} leaves {budget} weights, fewer than the per-layer minimum needs "
            f"({sum(forced.values())}); lower min_threshold"
        )
    pools = {k: w.detach().abs().flatten().sort(descending=True).values[forced[k] :] for k, w in weights.items()}
    owner = torch.cat([torch.full((len(p),), i) for i, p in enumerate(pools.values())])
    chosen = owner[torch.topk(torch.cat(list(pools.values())), rest, sorted=False).indices]
    counts = torch.bincount(chosen, minlength=len(pools))
    return {k: forced[k] + int(counts[i]) for i, k in enumerate(pools)}


def dp_allocate(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int) -> list[int]:
    """Multiple-choice knapsack by dynamic programming: one level index per layer minimising the summed
    error subject to summed cost <= ``budget`` (integer costs). Exact; O(layers x levels x budget)."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    best = np.zeros(budget + 1)  # best[c]: least error of the layers so far with total cost <= c
    choices = []
    for layer_costs, layer_errors in zip(costs, errors, strict=True):
        new = np.full(budget + 1, np.inf)
        pick = np.full(budget + 1, -1, dtype=np.int32)
        for j, (c, e) in enumerate(zip(layer_costs, layer_errors, strict=True)):
            if c < 0:
                raise ValueError(f"costs must be >= 0, got {c}")
            if c > budget:
                continue
            cand = np.full(budget + 1, np.inf)
            cand[c:] = best[: budget + 1 - c] + e
            better = cand < new
            new[better], pick[better] = cand[better], j
        if not np.isfinite(new[budget]):
            raise ValueError(f"no choice of levels fits the budget {budget}")
        best = new
        choices.append(pick)
    out, c = [], budget
    for layer_costs, pick in zip(reversed(costs), reversed(choices), strict=True):
        j = int(pick[c])
        out.append(j)
        c -= layer_costs[j]
    return out[::-1]


def layer_adaptive(
    sizes: Mapping[str, int], curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], sparsity: float
) -> dict[str, int]:
    """Rate-distortion allocation (Xu et al., ICCV 2023): ``curves[layer] = (kept counts, distortion)``
    measured by compressing that layer alone; under additivity the DP picks the levels minimising summed
    distortion within the budget. Weights the grid leaves unspent go to the layers with the largest
    chosen distortion (capped at their size), so the budget is met exactly."""
    budget = budget_for(sizes, sparsity)
    names = list(sizes)
    picks = dp_allocate([curves[n][0] for n in names], [curves[n][1] for n in names], budget)
    kept = {n: int(curves[n][0][j]) for n, j in zip(names, picks, strict=True)}
    left = budget - sum(kept.values())
    for n in sorted(names, key=lambda n: curves[n][1][picks[names.index(n)]], reverse=True):
        add = min(left, sizes[n] - kept[n])
        kept[n] += add
        left -= add
    return kept


def mutate(
    config: Sequence[int],
    costs: Sequence[Sequence[int]],
    rng: random.Random,
    max_step: int = 1,
    max_attempts: int = 100,
) -> list[int]:
    """EvoPress mutation: ``min(randint(1,3), randint(1,3))`` level switches, each lowering one layer and
    raising another by the same cost, so the total cost never changes. Switches that would leave a layer's
    level range or change the cost are rejected; attempts are bounded (a full repair loop can spin forever
    when every other layer sits at its extreme level)."""
    child = list(config)
    flips = min(rng.randint(1, 3), rng.randint(1, 3))
    for _ in range(flips):
        for _ in range(max_attempts):
            a, b = rng.sample(range(len(child)), 2)
            d = rng.randint(1, max_step)
            ja, jb = child[a] - d, child[b] + d
            if ja < 0 or jb >= len(costs[b]):
                continue
            if costs[a][ja] - costs[a][child[a]] + costs[b][jb] - costs[b][child[b]] == 0:
                child[a], child[b] = ja, jb
                break
    return child


def evolutionary_search(
    costs: Sequence[Sequence[int]],
    start: Sequence[int],
    fitness: Fitness,
    generations: int,
    offspring: int,
    survivors: Sequence[int],
    seed: int = 0,
    max_step: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[int]:
    """EvoPress search (Sieberling et al., ICML 2025): a (1 + lambda) loop from ``start``; each generation
    mutates the parent ``offspring`` times (equal-cost switches) and keeps the best ``survivors[i]`` at stage
    ``i`` of a multi-stage selection (``fitness(config, i, generation)``; the caller gives later stages more
    calibration data, the same data for all candidates of a stage). The parent re-enters at the last stage
    (elitism). Returns the final parent; its cost equals the start's."""
    if not survivors or survivors[-1] != 1:
        raise ValueError(f"survivors must end with 1, got {list(survivors)}")
    rng = random.Random(seed)
    parent = list(start)
    for generation in range(generations):
        children: list[list[int]] = []
        for _ in range(offspring * 10):
            if len(children) == offspring:
                break
            child = mutate(parent, costs, rng, max_step)
            if child != parent and child not in children:
                children.append(child)
        pool = children
        for stage, keep in enumerate(survivors):
            if stage == len(survivors) - 1:
                pool = pool + [parent]
            scores = [fitness(c, stage, generation) for c in pool]
            pool = [pool[i] for i in np.argsort(scores, kind="stable")[:keep]]
        parent = pool[0]
        if progress is not None:
            progress(1)
    return parent


def evopress(
    sizes: Mapping[str, int],
    sparsity: float,
    fitness: Callable[[dict[str, int], int, int], float],
    generations: int = 50,
    offspring: int = 16,
    survivors: Sequence[int] = (4, 1),
    quantum: int | None = None,
    max_step: int = 4,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """EvoPress for unstructured sparsity: starts from :func:`uniform`; a level step moves ``quantum`` kept
    weights (default 5% of the smallest layer, like the official 5% sparsity grid) between two layers, so
    layers of any size can trade and the budget stays exact. ``fitness(kept per layer, stage, generation)``
    is the end-to-end loss (KL to the dense model on calibration data).

    Defaults are the official pruning script's scaled down for CPU: 400 generations -> 50, 64 offspring ->
    16, survivors 8 -> 2 -> 1 -> 4 -> 1, and each switch moves 1..``max_step`` levels (official: 1) so the
    large layers can move in few generations."""
    start = uniform(sizes, sparsity)
    names = list(sizes)
    q = quantum or max(1, min(sizes.values()) // 20)
    base = {n: start[n] % q for n in names}
    costs = [list(range(base[n], sizes[n] + 1, q)) for n in names]
    start_idx = [(start[n] - base[n]) // q for n in names]

    def indexed(config: list[int], stage: int, generation: int) -> float:
        return fitness({n: costs[i][j] for i, (n, j) in enumerate(zip(names, config, strict=True))}, stage, generation)

    best = evolutionary_search(costs, start_idx, indexed, generations, offspring, survivors, seed, max_step, progress)
    return {n: costs[i][j] for i, (n, j) in enumerate(zip(names, best, strict=True))}


# ---------------------------------------------------------------------------------------------------------
# registered sparsity allocators: a model and a global sparsity in, a magnitude Plan out

GLOBAL_MP = "Is Complexity Required for Neural Network Pruning? A Case Study on Global Magnitude Pruning"
RD_PRUNE = "Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks"
EVOPRESS = "EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary Search"
LAYER_ADAPTIVE_GRID = tuple(i / 50 for i in range(50))  # sparsity 0, 0.02, ..., 0.98 (spec P17)


def _weights(allocation: Allocation) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach() for name, m in allocation.layers.items()}


def magnitude_plan(sizes: Mapping[str, int], kept: Mapping[str, int], compressor: str = "magnitude") -> Plan:
    """Per-layer rules at the sparsity ``1 - kept / n`` (replays to exactly ``kept`` weights)."""
    return Plan.from_levels(compressor, {k: 1.0 - kept[k] / sizes[k] for k in kept})


def _sizes(allocation: Allocation) -> dict[str, int]:
    return {k: w.numel() for k, w in _weights(allocation).items()}


@register_allocator(
    "uniform", paper="(baseline)", summary="every layer at the same sparsity (exact total)", budget="sparsity"
)
def uniform_sparsity(allocation: Allocation, sparsity: float) -> Plan:
    sizes = _sizes(allocation)
    return magnitude_plan(sizes, uniform(sizes, sparsity), allocation.compressor)


@register_allocator(
    "global",
    paper=GLOBAL_MP,
    summary="one magnitude threshold over all layers, every layer keeping a minimum (MT)",
    budget="sparsity",
    hyperparameters={"min_threshold": Hyperparameter(0.05, low=0.0, high=100.0)},
)
def global_sparsity(allocation: Allocation, sparsity: float, min_threshold: float = 0.05) -> Plan:
    kept = global_magnitude(_weights(allocation), sparsity, min_threshold)
    return magnitude_plan(_sizes(allocation), kept, allocation.compressor)


@register_allocator(
    "layer-adaptive",
    paper=RD_PRUNE,
    summary="per-layer output-distortion curves, summed-distortion minimum by dynamic programming",
    budget="sparsity",
    needs=("calibration",),
)
def layer_adaptive_sparsity(allocation: Allocation, sparsity: float) -> Plan:
    allocation.require_calibration("layer-adaptive")
    weights = _weights(allocation)
    sizes = {k: w.numel() for k, w in weights.items()}
    db = MagnitudeLevels(weights)
    levels = {k: sorted({kept_count(n, s) for s in LAYER_ADAPTIVE_GRID}) for k, n in sizes.items()}
    bar = tqdm(total=len(sizes), desc="distortion curves", disable=not allocation.progress, leave=False)
    curves = distortion_curves(
        allocation.model, allocation.layers, levels, db.weight, allocation.calibration, bar.update, allocation.output_fn
    )
    bar.close()
    kept = layer_adaptive(sizes, {k: (levels[k], curves[k]) for k in sizes}, sparsity)
    return magnitude_plan(sizes, kept, allocation.compressor)


@register_allocator(
    "evopress",
    paper=EVOPRESS,
    summary="evolutionary search over per-layer levels, KL to the dense model on calibration data",
    budget="sparsity",
    needs=("calibration",),
    hyperparameters={
        "generations": Hyperparameter(50, low=0, high=100_000),
        "offspring": Hyperparameter(16, low=1, high=10_000),
        "survivors": Hyperparameter((4, 1), low=1, high=10_000, sequence=True),
        "max_step": Hyperparameter(4, low=1, high=10_000),
        "quantum": Hyperparameter(None, low=1, high=2**63 - 1),
        "seed": Hyperparameter(0, low=0, high=2**63 - 1),
    },
)
def evopress_sparsity(allocation: Allocation, sparsity: float, **options: Any) -> Plan:
    """EvoPress over kept-weight counts with :func:`..calibrate.staged_kl_fitness` (KL to the dense model)."""
    allocation.require_calibration("evopress")
    weights = _weights(allocation)
    sizes = {k: w.numel() for k, w in weights.items()}
    fitness = staged_kl_fitness(
        allocation.model, allocation.calibration, MagnitudeLevels(weights).weight, allocation.output_fn
    )
    bar = tqdm(total=int(options.get("generations", 50)), desc="evopress", disable=not allocation.progress)
    kept = evopress(sizes, sparsity, fitness, progress=bar.update, **options)
    bar.close()
    return magnitude_plan(sizes, kept, allocation.compressor)
