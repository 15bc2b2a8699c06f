"""Claims about the lab itself: the built-in workloads are trainable to their targets."""

from __future__ import annotations

from trainlab.claims.registry import ClaimResult, register_claim
from trainlab.lab.bench import resolve_hyperparameters
from trainlab.lab.runner import train
from trainlab.lab.workloads import get_workload
from trainlab.optim import create

ADAMW_PAPER = "Decoupled Weight Decay Regularization (Loshchilov & Hutter, 2019)"


def _steps_to_target(workload_name: str, algorithm: str) -> int | None:
    w = get_workload(workload_name)
    hp = resolve_hyperparameters(algorithm, w, None)
    return train(w, lambda m: create(algorithm, m.parameters(), **hp), seed=0, stop_at_target=True).steps_to_target


@register_claim(
    "lab/digits-adamw",
    method="adamw",
    paper=ADAMW_PAPER,
    promise="AdamW trains digits-mlp and digits-cnn to their validation-accuracy targets within the default budget",
    fast=True,
)
def digits_reach_target_with_adamw() -> ClaimResult:
    names = ("digits-mlp", "digits-cnn")
    ours = {f"{n} steps": _steps_to_target(n, "adamw") for n in names}
    sgd = {f"{n} steps (sgd)": _steps_to_target(n, "sgd") for n in names}
    return ClaimResult(
        measured=ours,
        baseline=sgd,
        passed=all(v is not None for v in ours.values()),
        note="steps to the target accuracy, evaluated every eval_every steps; SGD with momentum as reference",
    )


@register_claim(
    "lab/pylm-large-adamw",
    method="adamw",
    paper=ADAMW_PAPER,
    promise="AdamW trains pylm-large (4 layers, d 256, context 256) to its bits-per-byte target within the default "
    "budget",
    fast=False,
)
def pylm_large_reaches_target_with_adamw() -> ClaimResult:
    workload = get_workload("pylm-large")
    steps = _steps_to_target("pylm-large", "adamw")
    return ClaimResult(
        measured={"pylm-large steps to target": steps},
        baseline={"budget (steps)": workload.steps, "target (bits/byte)": workload.target},
        passed=steps is not None,
        note="seed 0, the workload's tuned AdamW, evaluation every eval_every steps; several CPU minutes on one core, "
        "so it is a claim rather than a suite test. Seeds 0-2 evaluated every 25 steps pass the target at steps "
        "150 / 175 / 225 and end at 3.34 / 3.41 / 3.51 bits/byte (pylm.py docstring)",
    )
