"""Claims of the backprop-free methods (trainlab.localtrain), each against backprop on a built-in workload.

Every method runs through the lab's runner on the workload's own model, batches and step budget, over five
seeds; accuracies are the final validation accuracy (no early stopping), reported as mean ± standard deviation.
Activation bytes are measured (SavedTensorMeter: the peak of tensors autograd holds during one step).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.claims.registry import ClaimResult, register_claim
from trainlab.lab import local
from trainlab.lab.bench import resolve_hyperparameters
from trainlab.lab.runner import train
from trainlab.lab.workloads import Workload, get_workload
from trainlab.lab.workloads.sbm import GCN, SBM
from trainlab.localtrain import eggroll, forward_forward, forward_gnn, gbnn, mono_forward, noprop
from trainlab.memory.allocations import PeakTensorMeter
from trainlab.runtime import batch_generator

SEEDS = range(5)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return round(statistics.fmean(values), 4), round(statistics.stdev(values), 4)


def _runs(
    workload_name: str | Workload,
    algorithm: str,
    steps: int | None = None,
    batch_size: int | None = None,
    seeds: Sequence[int] = SEEDS,
    **overrides: Any,
) -> dict[str, Any]:
    """Final accuracy, training wall time and measured activation bytes of ``algorithm`` over five seeds."""
    workload = get_workload(workload_name) if isinstance(workload_name, str) else workload_name
    hp = resolve_hyperparameters(algorithm, workload, {algorithm: overrides})
    steps = steps or local.default_steps(workload, algorithm, hp)
    batch_size = batch_size or local.batch_size(workload, algorithm)
    accuracy, wall, activations = [], [], []
    for seed in seeds:
        result = train(
            workload, local.make_trainer(workload, algorithm, hp, seed), seed=seed, steps=steps, batch_size=batch_size
        )
        batch = workload.make_batch(batch_size, batch_generator(seed, steps))
        activations.append(local.activation_peak_bytes(workload, algorithm, hp, seed, batch))
        accuracy.append(result.final_metric)
        wall.append(result.wall_time_s)
    return {
        "accuracy (mean, std)": _mean_std(accuracy) if len(accuracy) > 1 else (accuracy[0], 0.0),
        "wall time s (mean)": round(statistics.fmean(wall), 2),
        "activation peak bytes": max(activations),
        "steps": steps,
        "batch size": batch_size,
        "hyperparameters": hp,
    }


@register_claim(
    "mono-forward/mnist1d-mlp-near-backprop",
    method="mono-forward",
    paper=mono_forward.PAPER,
    promise="Mono-Forward is within 3 points of backprop on the MNIST-1D MLP, holding fewer activation bytes",
    fast=False,
)
def mono_forward_mnist1d() -> ClaimResult:
    mf = _runs("mnist1d-mlp", "mono-forward")  # at the workload's tuned lr, backprop's (MF's own 1e-3 ends at 0.60)
    bp = _runs("mnist1d-mlp", "backprop")
    gap = bp["accuracy (mean, std)"][0] - mf["accuracy (mean, std)"][0]
    return ClaimResult(
        measured={**mf, "gap to backprop (points)": round(100 * gap, 2)},
        baseline=bp,
        passed=gap <= 0.03 and mf["activation peak bytes"] < bp["activation peak bytes"],
        note="the workload's residual MLP, cut into blocks by its as_sequential(); lr 1e-2 (Adam) for both",
    )


@register_claim(
    "forward-forward/digits-mlp-local-goodness",
    method="forward-forward",
    paper=forward_forward.PAPER,
    promise="Forward-Forward's per-layer goodness losses learn digits to over 85% (below backprop, not near chance)",
    fast=False,
)
def forward_forward_digits() -> ClaimResult:
    # The spec's CPU check: FF well above chance (> 85%) but below backprop (~97%); digits-mlp's hidden layers,
    # its tuned lr 3e-3 (the 0.03 of full-batch re-creations is unstable at batch 64).
    ff = _runs("digits-mlp", "forward-forward")
    bp = _runs("digits-mlp", "backprop")
    return ClaimResult(
        measured={
            **ff,
            "gap to backprop (points)": round(100 * (bp["accuracy (mean, std)"][0] - ff["accuracy (mean, std)"][0]), 2),
        },
        baseline=bp,
        passed=ff["accuracy (mean, std)"][0] > 0.85,
        note="two forward passes per step (positive and negative data), C = 10 label passes per prediction",
    )


GNN_STEPS = (100, 200, 400, 800)


@register_claim(
    "forward-gnn/sbm-near-backprop-gcn",
    method="forward-gnn",
    paper=forward_gnn.PAPER,
    promise="ForwardGNN (single-forward) is within 3 points of a backprop-trained GCN on sbm-gnn",
    fast=False,
    rule="backprop mean accuracy minus single-forward mean accuracy <= 3 points (5 seeds)",
    weaker="validation accuracy, on the split that also picked each method's step budget (the paper early-stops "
    "on validation and reports test accuracy); the top-down variant is measured, not part of the rule",
)
def forward_gnn_sbm() -> ClaimResult:
    # The paper's setting (official scripts): ForwardGNN's layers all have the hidden width (its predictions come
    # from the similarity to the virtual nodes), backprop's GCN ends in a C-wide layer; both are early-stopped
    # on validation. Here: the workload's two graph convolutions, 32 -> 64 -> 64 for ForwardGNN and
    # 32 -> 64 -> 5 for backprop, and each method's step budget (in place of early stopping) picked by the same
    # rule: the best final validation accuracy on seed 0 among GNN_STEPS, then five seeds at that budget.
    workload = get_workload("sbm-gnn")
    embedding = dataclasses.replace(workload, make_model=functools.partial(GCN, SBM.features, 64, 64))
    runs = {
        "single-forward": lambda **kw: _runs(embedding, "forward-gnn", **kw),
        "top-down": lambda **kw: _runs(embedding, "forward-gnn", variant="top-down", **kw),
        "backprop": lambda **kw: _runs(workload, "backprop", **kw),
    }
    results = {}
    for name, run in runs.items():
        by_steps = {steps: run(steps=steps, seeds=[0])["accuracy (mean, std)"][0] for steps in GNN_STEPS}
        best = max(by_steps, key=by_steps.get)
        results[name] = {**run(steps=best), "seed-0 accuracy by steps": by_steps}
    sf, top_down, bp = results["single-forward"], results["top-down"], results["backprop"]
    gap = bp["accuracy (mean, std)"][0] - sf["accuracy (mean, std)"][0]
    gap_td = bp["accuracy (mean, std)"][0] - top_down["accuracy (mean, std)"][0]
    return ClaimResult(
        measured={
            **sf,
            "gap to backprop (points)": round(100 * gap, 2),
            "top-down variant": {**top_down, "gap to backprop (points)": round(100 * gap_td, 2)},
        },
        baseline=bp,
        passed=gap <= 0.03,
        note="ForwardGNN on 32-64-64 graph convolutions (the paper's hidden-width layers), backprop on 32-64-5",
    )


def _teacher_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(64, 64, generator=g) / 8
    x = torch.randn(128, 64, generator=g)
    return x, x @ teacher.T


def _row_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean(-1)


def _es_run(rank: int, lr: float, seed: int, generations: int = 200) -> tuple[float, dict[str, int]]:
    """Final MSE of ES on the linear teacher, and the bytes one generation draws as noise and at its peak."""
    x, y = _teacher_problem(seed)
    torch.manual_seed(seed)
    model = nn.Linear(64, 64, bias=False)
    trainer = eggroll.Eggroll(
        model,
        num_classes=2,
        sigma=0.05,
        lr=lr,
        population=256,
        rank=rank,
        chunk=64,
        optimizer="sgd",
        seed=seed,
        loss=_row_mse,
    )
    trainer.step(x, y)
    with PeakTensorMeter() as meter:
        trainer.step(x, y)
    for _ in range(generations - 2):
        trainer.step(x, y)
    with torch.no_grad():
        loss = _row_mse(model(x), y).mean().item()
    noise = sum(v for k, v in meter.bytes_by_op.items() if k.startswith("randn"))
    return loss, {"noise bytes per generation": noise, "peak tensor bytes per generation": meter.peak_bytes}


ES_LRS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6)


@register_claim(
    "eggroll/rank16-near-full-rank-es",
    method="eggroll",
    paper=eggroll.PAPER,
    promise="rank-16 EGGROLL reaches within 10% of full-rank ES loss while drawing a fraction of its noise",
    fast=False,
    rule="rank-16 mean final MSE <= 1.10x full-rank ES mean final MSE (5 seeds) and fewer noise bytes",
)
def eggroll_rank16() -> ClaimResult:
    # The spec's check: W (64x64) to a linear teacher, 256 antithetic members for both, σ 0.05, SGD, 200
    # generations, each method's lr picked on seed 0 from one grid, then five seeds at that lr. The spec's grid
    # {0.05, 0.1, 0.2} stopped at the best value of both methods (2026-12-07: rank 16 1.81x); the grid now reaches
    # past both optima (seed 0: rank 16 best at 0.4, full rank at 0.2 and 0.086 at 0.3).
    results = {}
    for rank in (16, 0):
        losses = {lr: _es_run(rank, lr, seed=0)[0] for lr in ES_LRS}
        lr = min(losses, key=losses.get)
        runs = [_es_run(rank, lr, seed) for seed in SEEDS]
        results[rank] = {
            "lr": lr,
            "final MSE (mean, std)": _mean_std([r[0] for r in runs]),
            "seed-0 MSE by lr": {k: round(v, 4) for k, v in losses.items()},
            **runs[0][1],
        }
    low, full = results[16], results[0]
    ratio = low["final MSE (mean, std)"][0] / full["final MSE (mean, std)"][0]
    noise = low["noise bytes per generation"] / full["noise bytes per generation"]
    return ClaimResult(
        measured={**low, "loss ratio to full rank": round(ratio, 3), "noise bytes ratio": round(noise, 3)},
        baseline=full,
        passed=ratio <= 1.10 and noise < 1,
        note="memory: bytes of every random draw and the peak of all tensors a generation creates (PeakTensorMeter)",
    )


@register_claim(
    "noprop/digits-near-backprop",
    method="noprop",
    paper=noprop.PAPER,
    promise="NoProp-DT is within 3 points of backprop on digits",
    fast=False,
)
def noprop_digits() -> ClaimResult:
    # The paper's batch 128; 800 steps are about 70 epochs of the 1,437 training images (the paper: 100-150).
    bp = _runs("digits-mlp", "backprop")
    np_runs = _runs("digits-mlp", "noprop", steps=800, batch_size=128)
    gap = bp["accuracy (mean, std)"][0] - np_runs["accuracy (mean, std)"][0]
    return ClaimResult(
        measured={**np_runs, "gap to backprop (points)": round(100 * gap, 2)},
        baseline=bp,
        passed=gap <= 0.03,
    )


def _mlp_truncation(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, seed: int) -> tuple:
    """A one-hidden-layer logistic MLP of 80 units by L-BFGS (the spec's MLPClassifier): accuracy, and with its
    last 16 hidden units switched off."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 80), nn.Sigmoid(), nn.Linear(80, 10))
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        penalty = model[0].weight.pow(2).sum() + model[2].weight.pow(2).sum()
        loss = F.cross_entropy(model(x), y) + 0.5 * 1e-4 * penalty / len(y)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        full = (model(xv).argmax(1) == yv).float().mean().item()
        model[2].weight[:, 64:] = 0
        cut = (model(xv).argmax(1) == yv).float().mean().item()
    return full, cut


@register_claim(
    "gbnn/drop-last-20pct-units",
    method="gbnn",
    paper=gbnn.PAPER,
    promise="switching off the last-trained 20% of GBNN's hidden units costs at most 0.5 points of accuracy",
    fast=False,
)
def gbnn_truncation() -> ClaimResult:
    # The spec's check: digits, 40 stages x 2 logistic units = 80 units, the official defaults otherwise.
    from trainlab.lab.workloads.digits import digits_data

    x, y, xv, yv = (t.flatten(1) if t.dim() > 2 else t for t in digits_data())
    full, cut, mlp_full, mlp_cut = [], [], [], []
    for seed in SEEDS:
        trainer = gbnn.GBNN(
            nn.Flatten(),
            num_classes=10,
            total_units=80,
            units_per_stage=2,
            eta=1.0,
            subsample=0.5,
            max_iter=200,
            alpha=1e-4,
            seed=seed,
        )
        for _ in range(40):
            trainer.step(x, y)
        with torch.no_grad():
            full.append((trainer.network(xv).argmax(1) == yv).float().mean().item())
            cut.append((trainer.network.truncated(64)(xv).argmax(1) == yv).float().mean().item())
        a, b = _mlp_truncation(x, y, xv, yv, seed)
        mlp_full.append(a)
        mlp_cut.append(b)
    drop = statistics.fmean(full) - statistics.fmean(cut)
    return ClaimResult(
        measured={
            "accuracy (mean, std)": _mean_std(full),
            "first 80% of units": _mean_std(cut),
            "drop (points)": round(100 * drop, 2),
        },
        baseline={
            "MLP accuracy (mean, std)": _mean_std(mlp_full),
            "MLP without its last 16 units": _mean_std(mlp_cut),
            "drop (points)": round(100 * (statistics.fmean(mlp_full) - statistics.fmean(mlp_cut)), 2),
        },
        passed=drop <= 0.005,
    )
