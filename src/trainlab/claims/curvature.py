"""Claims of the curvature toolkit and the second-order optimizers (AdaHessian, M-FAC, MKOR)."""

from __future__ import annotations

import functools
import statistics
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainlab.claims.registry import ClaimResult, register_claim
from trainlab.curvature import hutchinson_diagonal, hvp
from trainlab.lab.bench import resolve_hyperparameters
from trainlab.lab.runner import train
from trainlab.lab.workloads import get_workload
from trainlab.optim import create
from trainlab.optim.accounting import state_bytes
from trainlab.optim.recipes.second_order import ADAHESSIAN_PAPER, MFAC_PAPER, MKOR_PAPER

HUTCHINSON_PAPER = (
    "A stochastic estimator of the trace of the influence matrix for Laplacian smoothing splines "
    "(Hutchinson, 1990); diagonal form of Bekas, Kokiopoulou & Saad (2007), used by AdaHessian"
)

SEEDS = (0, 1, 2)


def known_hessian(d: int = 100) -> Tensor:
    """A fixed symmetric matrix: diagonal in [1, 5], off-diagonal noise with a positive mean (0.02)."""
    gen = torch.Generator().manual_seed(0)
    noise = 0.05 * torch.randn(d, d, generator=gen, dtype=torch.float64) + 0.02
    off = (noise + noise.T) / 2
    off.fill_diagonal_(0)
    return torch.diag(torch.linspace(1, 5, d, dtype=torch.float64)) + off


@register_claim(
    "curvature/hutchinson-diagonal",
    method="curvature",
    paper=HUTCHINSON_PAPER,
    promise="Rademacher probes z give E[z ⊙ Hz] = diag(H): within 5% of a known Hessian's diagonal after "
    "1,000 probes, while the all −1 probe of a buggy AdaHessian port measures H·1 instead",
    fast=True,
)
def hutchinson_diagonal_of_known_hessian() -> ClaimResult:
    a = known_hessian()
    x = torch.zeros(a.shape[0], dtype=torch.float64, requires_grad=True)

    def loss_fn() -> Tensor:
        return 0.5 * x @ a @ x

    exact = a.diagonal()

    def max_rel_error(estimate: Tensor) -> float:
        return ((estimate - exact).abs() / exact).max().item()

    ours = hutchinson_diagonal(loss_fn, [x], samples=1000, generator=torch.Generator().manual_seed(0))[0]
    minus_one = -torch.ones_like(x)
    biased = minus_one * hvp(loss_fn, [x], [minus_one])[0]  # every all −1 probe gives this same estimate
    measured = {"max relative error, 1000 Rademacher probes": round(max_rel_error(ours), 4)}
    baseline = {"max relative error, all −1 probes": round(max_rel_error(biased), 4)}
    return ClaimResult(
        measured=measured,
        baseline=baseline,
        passed=measured["max relative error, 1000 Rademacher probes"] < 0.05
        and baseline["max relative error, all −1 probes"] > 0.05,
        note="H = 100×100 quadratic, diagonal 1..5, off-diagonal mean 0.02; the all −1 estimate is the row "
        "sums of H whatever the number of probes",
    )


@functools.cache
def _steps_runs(workload_name: str = "digits-mlp") -> dict[str, dict[str, Any]]:
    """One run of the five algorithms on ``workload_name`` per seed: median and range of the steps to the target,
    median wall time to it, median step time, and optimizer state in multiples of the (float32) parameter bytes."""
    workload = get_workload(workload_name)
    out: dict[str, dict[str, Any]] = {}
    for algorithm in ("adamw", "sgd", "adahessian", "mfac", "mkor"):
        hp = resolve_hyperparameters(algorithm, workload)
        runs = [
            train(
                workload, lambda m, a=algorithm, h=hp: create(a, m.named_parameters(), **h), seed=s, stop_at_target=True
            )
            for s in SEEDS
        ]
        reached = [r for r in runs if r.steps_to_target is not None]
        out[algorithm] = {
            "reached": len(reached),
            "steps": statistics.median(r.steps_to_target for r in reached) if reached else None,
            "per seed": [r.steps_to_target for r in runs],
            "time_s": round(statistics.median(r.time_to_target_s for r in reached), 2) if reached else None,
            "step_ms": round(1e3 * statistics.median(t for r in runs for t in r.step_times_s), 3),
            "hyperparameters": {k: hp[k] for k in workload.hyperparameters.get(algorithm, {})},
            "state": round(state_bytes(runs[0].optimizer) / sum(p.numel() * 4 for p in runs[0].model.parameters()), 1),
        }
    return out


def _steps_claim(method: str, workload_name: str = "digits-mlp") -> ClaimResult:
    runs = _steps_runs(workload_name)
    ours = runs[method]
    workload = get_workload(workload_name)
    target = f"{workload.target:g}"

    def row(name: str) -> dict[str, Any]:
        r = runs[name]
        return {
            f"{name} median steps to {target}": r["steps"],
            f"{name} steps per seed": r["per seed"],
            f"{name} median time to {target} (s)": r["time_s"],
            f"{name} step (ms)": r["step_ms"],
            f"{name} state (x params)": r["state"],
        }

    fewer = ours["steps"] is not None and all(
        runs[b]["steps"] is None or ours["steps"] < runs[b]["steps"] for b in ("adamw", "sgd")
    )
    faster = ours["time_s"] is not None and all(
        runs[b]["time_s"] is None or ours["time_s"] < runs[b]["time_s"] for b in ("adamw", "sgd")
    )
    return ClaimResult(
        measured={**row(method), "seeds reaching target": f"{ours['reached']}/{len(SEEDS)}"},
        baseline={**row("adamw"), **row("sgd")},
        passed=ours["reached"] == len(SEEDS) and _fewer_steps(ours["steps"], runs["adamw"]["steps"]),
        note=f"{workload_name}; fewer steps than both AdamW and SGD: {'yes' if fewer else 'no'}; less wall time: "
        f"{'yes' if faster else 'no'}; the workload's tuned hyperparameters {ours['hyperparameters']}; "
        f"seeds 0-2, evaluation every {workload.eval_every} steps (a step count is a multiple of it), one thread",
    )


PROMISE = "trains digits-mlp to 0.95 validation accuracy (the paper promises fewer steps than first-order methods)"
RULE = "every seed reaches 0.95 and the median steps to it are fewer than AdamW's"
MNIST1D_PROMISE = (
    "fewer steps than first-order methods to a target: on mnist1d-mlp (the paper's residual MLP on MNIST-1D), "
    "0.60 validation accuracy in fewer steps than AdamW"
)
MNIST1D_RULE = "every seed (0-2) reaches 0.60 and the median steps to it are fewer than AdamW's (both tuned)"
MNIST1D_WEAKER = "the median over 3 seeds, evaluated every 50 steps: a one-evaluation lead is within seed noise"


def _fewer_steps(ours: float | None, adamw: float | None) -> bool:
    return ours is not None and (adamw is None or ours < adamw)


@register_claim(
    "adahessian/digits-mlp", method="adahessian", paper=ADAHESSIAN_PAPER, promise=PROMISE, fast=True, rule=RULE
)
def adahessian_digits_mlp() -> ClaimResult:
    return _steps_claim("adahessian")


@register_claim("mfac/digits-mlp", method="mfac", paper=MFAC_PAPER, promise=PROMISE, fast=True, rule=RULE)
def mfac_digits_mlp() -> ClaimResult:
    return _steps_claim("mfac")


@register_claim("mkor/digits-mlp", method="mkor", paper=MKOR_PAPER, promise=PROMISE, fast=True, rule=RULE)
def mkor_digits_mlp() -> ClaimResult:
    return _steps_claim("mkor")


@register_claim(
    "adahessian/mnist1d-mlp",
    method="adahessian",
    paper=ADAHESSIAN_PAPER,
    promise=MNIST1D_PROMISE,
    fast=False,
    rule=MNIST1D_RULE,
    weaker=MNIST1D_WEAKER,
    known_failing="measured 2026-12-07 (seeds 0-2, tuned lr 0.15): AdaHessian 550 / 550 / 300 steps to 0.60 "
    "(median 550) against AdamW's 400 / 550 / 450 (median 450), at 2.6x AdamW's step time",
)
def adahessian_mnist1d_mlp() -> ClaimResult:
    return _steps_claim("adahessian", "mnist1d-mlp")


@register_claim(
    "mfac/mnist1d-mlp",
    method="mfac",
    paper=MFAC_PAPER,
    promise=MNIST1D_PROMISE,
    fast=False,
    rule=MNIST1D_RULE,
    weaker=MNIST1D_WEAKER,
)
def mfac_mnist1d_mlp() -> ClaimResult:
    return _steps_claim("mfac", "mnist1d-mlp")


@register_claim(
    "mkor/mnist1d-mlp",
    method="mkor",
    paper=MKOR_PAPER,
    promise=MNIST1D_PROMISE,
    fast=False,
    rule=MNIST1D_RULE,
    weaker=MNIST1D_WEAKER,
)
def mkor_mnist1d_mlp() -> ClaimResult:
    return _steps_claim("mkor", "mnist1d-mlp")


def direct_inverse_factors(
    inputs: list[Tensor], output_grads: list[Tensor], gamma: float, zeta: float
) -> tuple[Tensor, Tensor]:
    """MKOR's factor inverses by explicit inversion: X ← inv(inv(γX + (1−γ)I) + vvᵀ), with mkor.py's
    reset rule (start reset; after an entry of either factor exceeds 2, blend both toward I once)."""
    eye_l, eye_r = (
        torch.eye(inputs[0].numel(), dtype=torch.float64),
        torch.eye(output_grads[0].numel(), dtype=torch.float64),
    )
    left, right, reset = eye_l.clone(), eye_r.clone(), True
    for a, g in zip(inputs, output_grads, strict=True):
        if reset:
            left, right, reset = (1 - zeta) * left + zeta * eye_l, (1 - zeta) * right + zeta * eye_r, False
            continue
        left = torch.linalg.inv(torch.linalg.inv(gamma * left + (1 - gamma) * eye_l) + torch.outer(a, a))
        right = torch.linalg.inv(torch.linalg.inv(gamma * right + (1 - gamma) * eye_r) + torch.outer(g, g))
        reset = bool(max(left.abs().max(), right.abs().max()) > 2)
    return left, right


@register_claim(
    "mkor/sherman-morrison",
    method="mkor",
    paper=MKOR_PAPER,
    promise="rank-1 Sherman-Morrison updates keep MKOR's factor inverses equal to the directly computed "
    "inverses (to 1e-10 in float64) over 50 updates, without ever inverting a matrix",
    fast=True,
)
def mkor_sherman_morrison_is_exact() -> ClaimResult:
    from trainlab.lab.workloads.digits import digits_data

    x_train, y_train, _, _ = digits_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()
    opt = create("mkor", model.parameters(), lr=0.05, inv_freq=1)
    observer = opt.chains["default"].transforms[0].observer
    layer = model[1]
    inputs, grads = [], []
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        idx = torch.randint(0, len(y_train), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x_train[idx].double()), y_train[idx]).backward()
        stats = observer.layers[id(layer.weight)]
        inputs.append(stats.inputs.clone())
        grads.append(stats.output_grads.clone())
        opt.step()
    left_ref, right_ref = direct_inverse_factors(inputs, grads, 0.95, 0.1)
    state = opt.state[layer.weight]
    errors = {
        "L⁻¹ (65×65) relative error": (state["precondition_mkor.left_inv"] - left_ref).norm().item()
        / left_ref.norm().item(),
        "R⁻¹ (32×32) relative error": (state["precondition_mkor.right_inv"] - right_ref).norm().item()
        / right_ref.norm().item(),
    }
    return ClaimResult(
        measured={k: f"{v:.1e}" for k, v in errors.items()},
        baseline={"tolerance": 1e-10},
        passed=all(v < 1e-10 for v in errors.values()),
        note="first layer of a 64-32-10 MLP on digits, float64, inv_freq 1 (a refresh every step), 50 steps",
    )
