"""Claims of the WSD and refinement learning-rate schedules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.claims.registry import ClaimResult, register_claim
from trainlab.lab.runner import train
from trainlab.lab.workloads import get_workload
from trainlab.lab.workloads.digits import digits_data
from trainlab.optim import create
from trainlab.schedules import create_scheduler, refined_schedule, smooth_grad_norms

WSD_PAPER = (
    "Understanding Warmup-Stable-Decay Learning Rates: A River Valley Loss Landscape Perspective (Wen et al., 2024)"
)
REFINED_PAPER = "When, Why and How Much? Adaptive Learning Rate Scheduling by Refinement (Defazio et al., 2023)"

# SGD at a high lr on digits-mlp, where the constant-lr phase hovers above the valley floor.
STEPS, SEEDS = 600, (0, 1, 2)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return create("sgd", model.parameters(), lr=0.3, momentum=0.9, nesterov=True)


def _train_loss(model: nn.Module) -> float:
    x, y = digits_data()[:2]
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


@register_claim(
    "wsd/decay-drop",
    method="schedule/wsd",
    paper=WSD_PAPER,
    promise="the training loss drops >= 3x more during WSD's 10% decay window than over the equal-length "
    "stable window before it",
    fast=True,
)
def wsd_decay_drop() -> ClaimResult:
    w = get_workload("digits-mlp")
    d = STEPS // 10
    k = d // 2  # full-train-set loss averaged over the k steps up to each mark: the stable phase is noisy
    marks = (STEPS - 2 * d, STEPS - d, STEPS)
    mean_loss = [0.0, 0.0, 0.0]
    per_seed: list[list[float]] = []
    for seed in SEEDS:
        log: dict[int, float] = {}

        def record(step: int, model: nn.Module, log: dict[int, float] = log) -> None:
            if step > marks[0] - k:
                log[step] = _train_loss(model)  # the model after `step` updates

        r = train(
            w,
            _sgd,
            seed=seed,
            steps=STEPS,
            eval_every=STEPS,
            on_gradients=record,
            make_scheduler=lambda o: create_scheduler("wsd", o, STEPS, decay_fraction=0.1, min_lr_ratio=0.0),
        )
        log[STEPS] = _train_loss(r.model)
        at = [sum(log[s] for s in range(m - k + 1, m + 1)) / k for m in marks]
        per_seed.append([round(at[0] - at[1], 4), round(at[1] - at[2], 4)])
        mean_loss = [a + b / len(SEEDS) for a, b in zip(mean_loss, at, strict=True)]
    stable_drop, decay_drop = mean_loss[0] - mean_loss[1], mean_loss[1] - mean_loss[2]
    return ClaimResult(
        measured={"decay-window loss drop": round(decay_drop, 5), "per seed [stable, decay]": per_seed},
        baseline={"stable-window loss drop": round(stable_drop, 5)},
        passed=decay_drop > 0 and decay_drop >= 3 * stable_drop,
        note=f"SGD lr 0.3 Nesterov 0.9, {STEPS} steps, WSD to 0 over the last 10%, losses averaged over seeds "
        f"0-2; single seeds are noisy: {sum(dd > 0 and dd >= 3 * sd for sd, dd in per_seed)} of {len(SEEDS)} "
        "meet the 3x criterion on their own",
    )


@register_claim(
    "refined/linear",
    method="schedule/refined",
    paper=REFINED_PAPER,
    promise="with constant gradient norms the refined schedule is exactly linear decay",
    fast=True,
)
def refined_is_linear() -> ClaimResult:
    n = 1000
    refined = refined_schedule([2.5] * n)
    deviation = max(abs(r - (1 - t / (n - 1))) for t, r in enumerate(refined))
    return ClaimResult(
        measured={"max |refined - linear|": deviation},
        baseline={"tolerance": 1e-12},
        passed=deviation < 1e-12,
    )


@register_claim(
    "refined/digits",
    method="schedule/refined",
    paper=REFINED_PAPER,
    promise="on digits-mlp with SGD, the schedule refined from a linear-decay pilot run's gradient norms ends "
    "with a training loss <= linear decay's",
    fast=False,
)
def refined_beats_linear() -> ClaimResult:
    w = get_workload("digits-mlp")
    linear, refined, peaks, falls = [], [], [], []
    for seed in SEEDS:
        norms: list[float] = []

        def log_norm(step: int, model: nn.Module, norms: list[float] = norms) -> None:
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())

        pilot = train(
            w,
            _sgd,
            seed=seed,
            steps=STEPS,
            eval_every=STEPS,
            on_gradients=log_norm,
            make_scheduler=lambda o: create_scheduler("linear", o, STEPS),
        )
        rerun = train(
            w,
            _sgd,
            seed=seed,
            steps=STEPS,
            eval_every=STEPS,
            make_scheduler=lambda o, norms=norms: create_scheduler("refined", o, STEPS, grad_norms=norms),
        )
        linear.append(round(_train_loss(pilot.model), 5))
        refined.append(round(_train_loss(rerun.model), 5))
        peaks.append(round(refined_schedule(norms).index(1.0) / STEPS, 3))
        smoothed = smooth_grad_norms(norms)
        falls.append(round(float(smoothed[0] / smoothed[-1]), 1))
    return ClaimResult(
        measured={
            "refined final train loss (seeds 0-2)": refined,
            "peak at fraction of run": peaks,
            "smoothed grad norm first/last": falls,
        },
        baseline={"linear final train loss (seeds 0-2)": linear},
        passed=sum(refined) <= sum(linear),
        note="SGD lr 0.3 Nesterov 0.9, 600 steps, peak lr reused (not retuned). The gradient norm falls steeply "
        "as this MLP interpolates its training set, so refinement yields a long warmup and spends most steps at "
        "a small lr; the promise does not hold here",
    )


def _refined_vs_linear(workload_name: str, seeds: tuple[int, ...], algorithm: str = "sgd") -> dict[str, list[float]]:
    """Per seed: a linear-decay pilot with the workload's tuned ``algorithm`` (its gradient norms logged: ℓ2 for
    SGD, ℓ1 for AdamW, the paper's weights for each), then a rerun on the refined schedule at the same peak lr;
    each run's final validation metric, and for MNIST-1D / digits its final full-training-set loss."""
    from trainlab.lab.bench import resolve_hyperparameters

    w = get_workload(workload_name)
    hp = resolve_hyperparameters(algorithm, w, None)
    kind, order = ("adam", 1) if algorithm == "adamw" else ("sgd", 2)
    train_set = None if workload_name.startswith("pylm") else _train_set(workload_name)
    out: dict[str, list[float]] = {k: [] for k in ("linear loss", "refined loss", "linear val", "refined val", "peak")}
    for seed in seeds:
        norms: list[float] = []

        def log_norm(step: int, model: nn.Module, norms: list[float] = norms) -> None:
            grads = [p.grad.norm(order) for p in model.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack(grads), order).item())

        def make(model: nn.Module) -> torch.optim.Optimizer:
            return create(algorithm, model.parameters(), **hp)

        pilot = train(
            w,
            make,
            seed=seed,
            eval_every=w.steps,
            on_gradients=log_norm,
            make_scheduler=lambda o: create_scheduler("linear", o, w.steps),
        )
        rerun = train(
            w,
            make,
            seed=seed,
            eval_every=w.steps,
            make_scheduler=lambda o, norms=norms: create_scheduler("refined", o, w.steps, grad_norms=norms, kind=kind),
        )
        for name, run in (("linear", pilot), ("refined", rerun)):
            if train_set is not None:
                with torch.no_grad():
                    out[f"{name} loss"].append(round(F.cross_entropy(run.model(train_set[0]), train_set[1]).item(), 5))
            out[f"{name} val"].append(round(run.final_metric, 4))
        out["peak"].append(round(refined_schedule(norms, kind).index(1.0) / w.steps, 3))
    return out


def _train_set(workload_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if workload_name.startswith("mnist1d"):
        from trainlab.lab.workloads.mnist1d import mnist1d_data

        return mnist1d_data()[:2]
    return digits_data()[:2]


@register_claim(
    "refined/mnist1d-mlp",
    method="schedule/refined",
    paper=REFINED_PAPER,
    promise="on the MNIST-1D MLP with SGD, the schedule refined from a linear-decay pilot run's gradient norms ends "
    "with a training loss <= linear decay's",
    rule="mean final full-training-set loss over seeds 0-2 of the refined rerun <= the linear-decay pilot's",
    fast=False,
    known_failing="measured 2026-12-07 (SGD lr 0.1 Nesterov, 2,000 steps, seeds 0-2): final training loss refined "
    "0.152 / 0.131 / 0.131 vs linear 0.0086 / 0.0089 / 0.0099; validation accuracy 0.648 / 0.653 / 0.641 vs "
    "0.663 / 0.659 / 0.657. The MLP interpolates its training set and its gradient norm falls, so the refined "
    "schedule peaks at 77-80% of the run (a long warmup)",
)
def refined_beats_linear_mnist1d() -> ClaimResult:
    r = _refined_vs_linear("mnist1d-mlp", SEEDS)
    mean = {k: sum(v) / len(v) for k, v in r.items()}
    return ClaimResult(
        measured={
            "refined final train loss (seeds 0-2)": r["refined loss"],
            "refined val accuracy": r["refined val"],
            "peak at fraction of run": r["peak"],
        },  # fmt: skip
        baseline={"linear final train loss (seeds 0-2)": r["linear loss"], "linear val accuracy": r["linear val"]},
        passed=mean["refined loss"] <= mean["linear loss"],
        note="mnist1d-mlp, the workload's SGD (lr 0.1, Nesterov 0.9), its 2,000-step budget, peak lr reused (not "
        "retuned); loss on all 4,000 training signals after the last step",
    )


@register_claim(
    "refined/pylm",
    method="schedule/refined",
    paper=REFINED_PAPER,
    promise="on the byte LM pylm with AdamW (the paper's language-model setting: the gradient norm does not "
    "collapse), the schedule refined from a linear-decay pilot run's ℓ1 gradient norms ends with validation "
    "bits/byte <= linear decay's",
    rule="mean final validation bits/byte over seeds 0-2 of the refined rerun <= the linear-decay pilot's",
    weaker="a mean over three seeds, not a significant gain: the paired difference and its standard error are "
    "reported (measured 2026-12-07: -0.010 ± 0.011 bits/byte)",
    fast=False,
)
def refined_beats_linear_pylm() -> ClaimResult:
    import statistics

    r = _refined_vs_linear("pylm", SEEDS, "adamw")
    diff = [a - b for a, b in zip(r["refined val"], r["linear val"], strict=True)]
    return ClaimResult(
        measured={
            "refined val bits/byte (seeds 0-2)": r["refined val"],
            "refined - linear (paired mean ± s.e.)": f"{statistics.fmean(diff):+.4f} ± "
            f"{statistics.stdev(diff) / len(diff) ** 0.5:.4f}",
            "peak at fraction of run": r["peak"],
        },
        baseline={"linear val bits/byte (seeds 0-2)": r["linear val"]},
        passed=statistics.fmean(r["refined val"]) <= statistics.fmean(r["linear val"]),
        note="pylm, the workload's tuned AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1), its 500-step budget, "
        "pilot with linear decay to 0, refined weights w_t = 1/‖g_t‖₁ (the paper's Adam form) after its median "
        "filter, peak lr reused (not retuned)",
    )
