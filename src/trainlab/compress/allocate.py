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

import numpy as np
import torch

from trainlab.compress.prune import check_sparsity

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
