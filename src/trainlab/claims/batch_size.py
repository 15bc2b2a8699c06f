"""Claims of the batch-size methods: AdAdaGrad's adaptive batches, the lr-batch rule, ghost batch norm."""

from __future__ import annotations

import statistics

import torch
from torch import nn

from trainlab.claims.registry import ClaimResult, register_claim
from trainlab.lab.runner import train
from trainlab.lab.workloads import get_workload
from trainlab.schedules.batch_size import ADADAGRAD_PAPER, AdaptiveBatchSize

SEEDS = (0, 1, 2)

# ---- AdAdaGrad -------------------------------------------------------------------------------------------

# AdaGrad at lr 0.05 (the paper's ResNet-18 value; digits-mlp reaches 0.95 with it at every batch size).
ADAGRAD_LR = 0.05
SMALL, LARGE, TRAIN_ROWS = 8, 512, 1437  # digits-mlp has 1,437 training rows: the largest possible batch


def _adagrad(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(model.parameters(), lr=ADAGRAD_LR)


def _median(values: list[int | None]) -> float:
    return statistics.median(float("inf") if v is None else v for v in values)


@register_claim(
    "adadagrad/fewer-steps-no-more-samples",
    method="adadagrad",
    paper=ADADAGRAD_PAPER,
    promise="AdaGrad with batches grown by the augmented inner-product test (theta 0.5, nu 1, from b=8) reaches "
    "digits-mlp's target in fewer steps than fixed b=8 and with no more samples than fixed b=512",
    fast=False,
)
def adadagrad_fewer_steps() -> ClaimResult:
    w = get_workload("digits-mlp")
    runs: dict[str, list[tuple[int | None, int | None]]] = {"small": [], "large": [], "adaptive": []}
    final_sizes = []
    for seed in SEEDS:
        for name, b, steps in (("small", SMALL, 2000), ("large", LARGE, 400)):
            r = train(w, _adagrad, seed=seed, steps=steps, batch_size=b, eval_every=5, stop_at_target=True)
            runs[name].append((r.steps_to_target, r.samples_to_target))
        sizes = AdaptiveBatchSize(SMALL, TRAIN_ROWS, test="augmented", test_samples=64)
        r = train(w, _adagrad, seed=seed, steps=2000, eval_every=5, stop_at_target=True, batch_sizes=sizes)
        runs["adaptive"].append((r.steps_to_target, r.samples_to_target))
        final_sizes.append(sizes.batch_size)
    med = {k: (_median([s for s, _ in v]), _median([n for _, n in v])) for k, v in runs.items()}
    passed = med["adaptive"][0] < med["small"][0] and med["adaptive"][1] <= med["large"][1]
    return ClaimResult(
        measured={
            "adaptive median steps to 0.95": med["adaptive"][0],
            "adaptive median samples to 0.95": med["adaptive"][1],
            "final batch sizes": final_sizes,
            "per seed (steps, samples)": runs["adaptive"],
        },
        baseline={
            f"b={SMALL} median steps": med["small"][0],
            f"b={SMALL} median samples": med["small"][1],
            f"b={LARGE} median steps": med["large"][0],
            f"b={LARGE} median samples": med["large"][1],
        },
        passed=passed,
        note=f"seeds {list(SEEDS)}, evaluated every 5 steps; per-sample gradients of 64 samples per test",
    )
