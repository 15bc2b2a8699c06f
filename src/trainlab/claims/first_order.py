"""Claims of the first-order recipes: SPAM and Stable-SPAM shrug off gradient spikes; Lion-𝒦 solves a
constrained problem whose constraint is set by the weight decay."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

import torch
from torch import nn

from trainlab.claims.registry import ClaimResult, register_claim
from trainlab.lab.runner import train
from trainlab.lab.workloads import get_workload
from trainlab.optim import create
from trainlab.optim.recipes.first_order import LION_K_PAPER, SPAM_PAPER, STABLE_SPAM_PAPER

# The spike test of specs/optimizers.md §1 at digits scale: 600 steps of batch 64, lr 1e-3 for all three.
SPIKE_STEPS = 600
SPIKE_FACTOR = 1000.0
SPIKE_FRACTION = 0.01
# One run's final loss varies by ±20% with the seed and the spike placement, more than the 10% tolerance,
# so each loss is the mean over three seeds (model init, batch order and spike steps all follow the seed).
SEEDS = (0, 1, 2)
FINAL_WINDOW = 50  # a run's final loss: the mean training loss of its last 50 steps
TOLERANCE = 0.10
# Momentum resets scaled to the run (paper: ΔT=500, N_acc=20, warmup 150 over 10^4+ steps). With ΔT=100
# SPAM ends at 1.48x its clean loss on these seeds: a clipped spike is still up to sqrt(θ·v) and inflates v
# for the rest of the interval, so shorter intervals recover sooner.
SPIKE_HYPERPARAMETERS = {
    "adamw": {"lr": 1e-3, "weight_decay": 0.0},
    "spam": {"lr": 1e-3, "reset_interval": 50, "n_acc": 5, "warmup_steps": 15},
    "stable-spam": {"lr": 1e-3, "reset_interval": 50},
}


def spike_steps(seed: int, steps: int = SPIKE_STEPS) -> set[int]:
    """The steps whose gradient is multiplied by SPIKE_FACTOR in the run with ``seed``: a random 1%."""
    return set(random.Random(seed).sample(range(steps), max(1, round(SPIKE_FRACTION * steps))))


def _final_loss(algorithm: str, seed: int, spikes: frozenset[int]) -> float:
    def on_gradients(step: int, model: nn.Module) -> None:
        if step in spikes:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(SPIKE_FACTOR)

    hp = SPIKE_HYPERPARAMETERS[algorithm]
    result = train(
        get_workload("digits-mlp"),
        lambda m: create(algorithm, m.parameters(), **hp),
        seed=seed,
        steps=SPIKE_STEPS,
        eval_every=SPIKE_STEPS,
        on_gradients=on_gradients,
    )
    tail = result.train_losses[-FINAL_WINDOW:]
    return sum(tail) / len(tail)


@functools.cache  # both claims compare with the same AdamW runs
def _clean_and_spiked(algorithm: str) -> tuple[float, float]:
    clean = [_final_loss(algorithm, seed, frozenset()) for seed in SEEDS]
    spiked = [_final_loss(algorithm, seed, frozenset(spike_steps(seed))) for seed in SEEDS]
    return sum(clean) / len(clean), sum(spiked) / len(spiked)


def _spike_robustness(method: str) -> ClaimResult:
    losses = {name: _clean_and_spiked(name) for name in (method, "adamw")}
    ratios = {name: spiked / clean for name, (clean, spiked) in losses.items()}

    def report(name: str) -> dict[str, float]:
        clean, spiked = losses[name]
        return {f"{name} clean loss": clean, f"{name} spiked loss": spiked, f"{name} spiked/clean": ratios[name]}

    hp = ", ".join(f"{k}={v}" for k, v in SPIKE_HYPERPARAMETERS[method].items())
    spikes = "; ".join(f"seed {s}: {sorted(spike_steps(s))}" for s in SEEDS)
    return ClaimResult(
        measured=report(method),
        baseline=report("adamw"),
        passed=ratios[method] <= 1 + TOLERANCE and ratios["adamw"] > 1 + TOLERANCE,
        note=(
            f"digits-mlp, {SPIKE_STEPS} steps, gradients x{SPIKE_FACTOR:g} on 1% of steps ({spikes}); loss = mean "
            f"over seeds {SEEDS} of the last {FINAL_WINDOW} training losses; {method}: {hp}; AdamW lr 1e-3, wd 0"
        ),
    )


@register_claim(
    "spam/spike-robustness",
    method="spam",
    paper=SPAM_PAPER,
    promise="with x1000 gradient spikes on 1% of steps SPAM ends within 10% of its spike-free loss; Adam does not",
    fast=True,
)
def spam_spike_robustness() -> ClaimResult:
    return _spike_robustness("spam")


@register_claim(
    "stable-spam/spike-robustness",
    method="stable-spam",
    paper=STABLE_SPAM_PAPER,
    promise="with x1000 gradient spikes on 1% of steps Stable-SPAM ends within 10% of its spike-free loss; Adam not",
    fast=True,
)
def stable_spam_spike_robustness() -> ClaimResult:
    return _spike_robustness("stable-spam")


# Lion-𝒦 on f(x) = ½‖x − c‖² (specs/optimizers.md §7): with decoupled weight decay λ the iterates solve
# min f s.t. ‖x‖_* ≤ 1/λ, whose solution is the projection of c onto that ball.
LION_DIM, LION_WD, LION_LR, LION_STEPS = 50, 0.5, 1e-2, 3000


def _lion_k_iterate(k: str, c: torch.Tensor) -> torch.Tensor:
    x = torch.zeros_like(c, requires_grad=True)
    optimizer = create("lion-k", [x], k=k, lr=LION_LR, weight_decay=LION_WD)
    for _ in range(LION_STEPS):
        x.grad = x.detach() - c  # ∇f
        optimizer.step()
    return x.detach()


@register_claim(
    "lion-k/constraint",
    method="lion-k",
    paper=LION_K_PAPER,
    promise="Lion-K with weight decay λ converges to argmin f over the ball ‖x‖_* ≤ 1/λ (ℓ∞ for K=ℓ1, ℓ2 for K=ℓ2)",
    fast=True,
)
def lion_k_constraint() -> ClaimResult:
    c = 10 * torch.randn(LION_DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    radius = 1 / LION_WD
    targets: dict[str, tuple[Callable[[torch.Tensor], float], torch.Tensor]] = {
        "l1": (lambda x: x.abs().max().item(), c.clamp(-radius, radius)),
        "l2": (lambda x: x.norm().item(), c * min(1.0, radius / c.norm().item())),
    }
    measured: dict[str, float] = {}
    passed = True
    for k, (norm, target) in targets.items():
        x = _lion_k_iterate(k, c)
        dual = "‖x‖∞" if k == "l1" else "‖x‖₂"
        gap = (x - target).abs().max().item()
        measured[f"K={k}: {dual}"] = norm(x)
        measured[f"K={k}: max|x − projected optimum|"] = gap
        # O(lr) slack: a sign (ℓ1) or unit-norm (ℓ2) step of size lr around the fixed point.
        passed &= norm(x) <= radius + 2 * LION_LR and gap <= 2 * LION_LR
    return ClaimResult(
        measured=measured,
        baseline={"1/λ": radius, "‖c‖∞ (unconstrained optimum)": c.abs().max().item(), "‖c‖₂": c.norm().item()},
        passed=passed,
        note=f"f = ½‖x − c‖², c ~ 10·N(0, I), d={LION_DIM}, λ={LION_WD}, lr={LION_LR}, {LION_STEPS} steps from x=0; "
        f"tolerance 2·lr",
    )
