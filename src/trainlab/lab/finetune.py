"""Fine-tune a workload's model with an adapter method (or fully) through the lab's runner, with the bench's
accounting: trainable parameters, optimizer-state bytes, peak memory, wall time and quality.

The adapter is attached in place to the runner's fresh model (``attach_``), data-dependent inits run on
``prepare_batches`` drawn from the workload's own batch stream (seed offset so they are not the first training
batches), and the method's training callback runs where a learning-rate scheduler would, right after each
optimizer step; its regularizer is added to the workload's loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import trainlab.adapters as adapters
from trainlab.lab.memory import peak_rss_bytes, reset_peak_rss
from trainlab.lab.runner import TrainResult, train
from trainlab.lab.workloads.base import Workload
from trainlab.optim import create, state_bytes
from trainlab.runtime import batch_generator

PREPARE_SEED_OFFSET = 7919  # prepare batches come from their own stream
# Layers adapted when the caller names none: the digits MLP's hidden layers (its 10-way head is narrower than
# LoRA-GA's 2r at r = 8), MiniLM's attention query and value (the LoRA paper's); elsewhere every nn.Linear.
DEFAULT_TARGETS: dict[str, list[str | type]] = {"digits-shifted": ["1", "3"], "minilm-docstrings": ["query", "value"]}


@dataclass
class FinetuneResult:
    method: str  # "full" for full fine-tuning
    trainable: int
    total: int
    optimizer_state_bytes: int
    peak_rss_bytes: int
    run: TrainResult

    @property
    def final_metric(self) -> float:
        return self.run.final_metric


class _CallbackAsScheduler:
    """Runs the adapter callback after every optimizer step (the runner's scheduler slot)."""

    def __init__(self, callback: adapters.TrainingCallback) -> None:
        self.callback, self.count = callback, 0

    def step(self) -> None:
        self.count += 1
        self.callback.step(self.count)

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.count = int(state["count"])


def finetune(
    workload: Workload,
    method: str | None,
    *,
    targets: Sequence[str | type] | None = None,
    config: Mapping[str, Any] | None = None,
    optimizer: str = "adamw",
    hyperparameters: Mapping[str, Any] | None = None,
    callback: Mapping[str, Any] | None = None,
    prepare_batches: int = 64,
    prepare_batch_size: int = 2,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int | None = None,
    eval_every: int | None = None,
) -> FinetuneResult:
    """Train ``method`` adapters (None: every parameter) on ``workload``; defaults are the method's paper's.

    ``callback`` holds the training-callback options (``total_steps`` defaults to the run's steps);
    LoRA-GA's gradient estimate uses ``prepare_batches`` batches of ``prepare_batch_size`` (official: 64 x 2).
    """
    steps = workload.steps if steps is None else steps
    targets = DEFAULT_TARGETS.get(workload.name, [nn.Linear]) if targets is None else targets
    hp = {**workload.hyperparameters.get(optimizer, {}), **(hyperparameters or {})}
    state: dict[str, Any] = {}

    def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        if method is not None:
            adapters.attach_(model, method, targets=targets, **(config or {}))
            batches = [
                workload.make_batch(prepare_batch_size, batch_generator(seed + PREPARE_SEED_OFFSET, i))
                for i in range(prepare_batches)
            ]
            adapters.prepare(model, batches, loss=workload.loss)
            spec = adapters.get_spec(method)
            options = dict(callback or {})
            if spec.callback is not None and "total_steps" in spec.callback_fields:
                options.setdefault("total_steps", steps)
            state["callback"] = adapters.training_callback(model, **options)
        params = [p for p in model.parameters() if p.requires_grad]
        state["model"] = model
        state["optimizer"] = create(optimizer, params, **hp)
        return state["optimizer"]

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        loss = workload.loss(model, batch)
        cb = state.get("callback")
        return loss + cb.regularizer() if cb is not None else loss

    def make_scheduler(_: torch.optim.Optimizer) -> _CallbackAsScheduler | None:
        cb = state.get("callback")
        return _CallbackAsScheduler(cb) if cb is not None else None

    reset_peak_rss()
    run = train(
        workload,
        make_optimizer,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        eval_every=eval_every,
        loss_fn=loss_fn,
        make_scheduler=make_scheduler if method is not None else None,
    )
    model = state["model"]
    return FinetuneResult(
        method=method or "full",
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total=sum(p.numel() for p in model.parameters()),
        optimizer_state_bytes=state_bytes(state["optimizer"]),
        peak_rss_bytes=peak_rss_bytes(),
        run=run,
    )


def finetune_report(workload: Workload, results: Sequence[FinetuneResult]) -> str:
    """A markdown table: one row per method (mean over its seeds)."""
    rows = [
        f"# Fine-tuning on {workload.name}",
        "",
        f"{workload.description}; metric {workload.metric} (target {workload.target}).",
        "",
        "| method | trainable | share | optimizer state | peak RSS | wall time | final "
        f"{workload.metric} | steps to target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        first = runs[0]
        metric = sum(r.final_metric for r in runs) / len(runs)
        wall = sum(r.run.wall_time_s for r in runs) / len(runs)
        reached = [r.run.steps_to_target for r in runs if r.run.steps_to_target is not None]
        to_target = f"{sum(reached) / len(reached):.0f} ({len(reached)}/{len(runs)})" if reached else "-"
        rows.append(
            f"| {method} | {first.trainable:,} | {first.trainable / first.total:.2%} | "
            f"{first.optimizer_state_bytes / 2**10:.1f} KiB | {max(r.peak_rss_bytes for r in runs) / 2**20:.0f} MiB | "
            f"{wall:.2f} s | {metric:.4f} | {to_target} |"
        )
    return "\n".join(rows) + "\n"
