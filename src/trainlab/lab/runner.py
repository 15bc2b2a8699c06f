"""Train one algorithm on one workload: the loop behind `trainlab bench` and the claim checks.

A run is a pure function of (workload, optimizer, seed): the model's initial weights come from
``torch.manual_seed(seed)`` and the batch of step ``t`` from a generator seeded by ``(seed, t)``, so a
run resumed from a checkpoint draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from trainlab.lab.workloads.base import Batch, Workload
from trainlab.runtime import atomic_path, batch_generator


class BatchTrainer(Protocol):
    """A training method other than backprop + optimizer (e.g. a trainlab.localtrain method): one call per
    batch. ``predictor`` is the module evaluated in place of the workload's model."""

    predictor: nn.Module

    def train_step(self, batch: Batch) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BatchSizeController(Protocol):
    """A growing batch size (e.g. trainlab.schedules.AdaptiveBatchSize): the runner draws ``batch_size``
    samples, and ``backward`` fills the gradients (and may change ``batch_size`` for the next step)."""

    batch_size: int

    def backward(
        self, model: nn.Module, loss_fn: Callable[[nn.Module, Batch], torch.Tensor], batch: Batch
    ) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# Returns an optimizer (backprop) or a BatchTrainer (the method trains the model its own way).
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer | BatchTrainer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class TrainResult:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    final_metric: float
    best_metric: float
    steps_to_target: int | None
    time_to_target_s: float | None
    wall_time_s: float
    diverged_at: int | None
    # One point per evaluation: step, samples, wall_time_s, train_loss (mean since the last point), metric.
    curve: list[dict[str, float]] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    step_times_s: list[float] = field(default_factory=list)
    samples: int = 0  # training samples consumed (steps x batch size when it is fixed)
    samples_to_target: int | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None


def train(
    workload: Workload,
    make_optimizer: OptimizerFactory,
    *,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int | None = None,
    eval_every: int | None = None,
    loss_fn: LossFn | None = None,
    on_gradients: Callable[[int, nn.Module], None] | None = None,
    make_scheduler: SchedulerFactory | None = None,
    stop_at_target: bool = False,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    progress: Callable[[int], None] | None = None,
    batch_sizes: BatchSizeController | None = None,
    config: Mapping[str, Any] | None = None,
    on_evaluation: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``make_optimizer(model)`` on ``workload`` and evaluate every ``eval_every`` steps.

    ``on_gradients(step, model)`` runs after backward and before the optimizer step (e.g. to inject
    gradient spikes); ``loss_fn`` replaces the workload's loss. A non-finite training loss ends the
    run, recorded as diverged at that step; it is looked for at the points that sync with the host anyway
    (evaluations and checkpoints), never per step. With ``checkpoint`` set, the full state is saved atomically
    every ``checkpoint_every`` steps and at the last step, only while the loss and weights are finite, so after a
    divergence the file keeps the last finite state; ``resume`` continues from it bit for bit. The checkpoint
    records the run's configuration (the runner's own arguments plus ``config``, e.g. the algorithm, its
    hyperparameters and schedule): resuming under another configuration raises ValueError naming the fields.
    Wall times count training only: loading the data and evaluating happen off the clock.
    With ``batch_sizes``, each step draws ``batch_sizes.batch_size`` samples and ``batch_sizes.backward``
    computes the gradients (a growing batch, e.g. AdAdaGrad); ``samples`` counts what was drawn.
    ``on_evaluation(point)`` receives each curve point (step, samples, wall time, mean training loss since the
    previous point, metric) as it is measured, e.g. to show the current loss in a progress bar.
    """
    steps = workload.steps if steps is None else steps
    batch_size = workload.batch_size if batch_size is None else batch_size
    eval_every = workload.eval_every if eval_every is None else eval_every
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    loss_fn = workload.loss if loss_fn is None else loss_fn

    torch.manual_seed(seed)
    model = workload.make_model()
    optimizer = make_optimizer(model)
    local = None if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    if local is not None and (
        make_scheduler is not None
        or on_gradients is not None
        or loss_fn is not workload.loss
        or batch_sizes is not None
    ):
        raise ValueError(
            "make_scheduler, on_gradients, loss_fn and batch_sizes apply to optimizers, not to a BatchTrainer"
        )
    evaluated = model if local is None else local.predictor
    scheduler = make_scheduler(optimizer) if make_scheduler is not None else None
    run = _RunState()
    record = _run_config(workload, seed, steps, batch_size, eval_every, stop_at_target, config)
    if resume and checkpoint is not None and checkpoint.exists():
        run = _load_checkpoint(checkpoint, model, optimizer, scheduler, batch_sizes, record)
    saved_step = run.step if resume and checkpoint is not None and checkpoint.exists() else None

    pending: list[torch.Tensor] = []  # losses since the last evaluation, synced only at evaluations
    step = run.step
    workload.make_batch(batch_size, batch_generator(seed, step))  # loads the data before the clock starts
    importlib.import_module("torch._dynamo")  # torch.optim's first step imports it (~5 s): off the first run's clock
    start = time.perf_counter() - run.elapsed_s
    while step < steps and run.diverged_at is None:
        size = batch_size if batch_sizes is None else batch_sizes.batch_size
        batch = workload.make_batch(size, batch_generator(seed, step))
        run.samples += _batch_length(batch, size)
        t0 = time.perf_counter()

        def closure(batch: Batch = batch, step: int = step) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            if batch_sizes is None:
                loss = loss_fn(model, batch)
                loss.backward()
            else:
                loss = batch_sizes.backward(model, loss_fn, batch)
            if on_gradients is not None:
                on_gradients(step, model)
            return loss

        loss = optimizer.step(closure) if local is None else local.train_step(batch)
        if scheduler is not None:
            scheduler.step()
        run.step_times_s.append(time.perf_counter() - t0)
        pending.append(loss.detach())
        step += 1
        if progress is not None:
            progress(1)
        stopping = False
        if step % eval_every == 0 or step == steps:
            paused = time.perf_counter()
            _evaluate(workload, evaluated, run, pending, step, paused - start)
            if on_evaluation is not None:
                on_evaluation(run.curve[-1])
            start += time.perf_counter() - paused  # as in AlgoPerf, evaluation time is not training time
            pending = []
            stopping = run.diverged_at is None and stop_at_target and run.steps_to_target is not None
        due = step == steps or stopping or (checkpoint_every and step % checkpoint_every == 0)
        if checkpoint is not None and due and run.diverged_at is None:
            if _finite(pending, evaluated):  # a sync point anyway: saving copies the state to the host
                run.step, run.elapsed_s = step, time.perf_counter() - start
                _save_checkpoint(checkpoint, model, optimizer, scheduler, run, batch_sizes, record)
                saved_step = step
            else:  # record the divergence now rather than at the next evaluation
                _evaluate(workload, evaluated, run, pending, step, time.perf_counter() - start)
                run.diverged_at = run.diverged_at or step
                pending = []
        if run.diverged_at is not None:
            kept = "" if checkpoint is None else (
                f"; {checkpoint} keeps step {saved_step}, the last finite state" if saved_step is not None
                else "; no finite checkpoint was written before it"
            )  # fmt: skip
            print(f"{workload.name}: non-finite training loss or weights at step {run.diverged_at}, run stopped{kept}",
                  file=sys.stderr)  # fmt: skip
        if stopping:
            break

    wall = time.perf_counter() - start
    metrics = [p["metric"] for p in run.curve if math.isfinite(p["metric"])]
    pick = max if workload.higher_is_better else min
    return TrainResult(
        model=model,
        optimizer=optimizer,
        final_metric=run.curve[-1]["metric"] if run.curve else float("nan"),
        best_metric=pick(metrics) if metrics else float("nan"),
        steps_to_target=run.steps_to_target,
        time_to_target_s=run.time_to_target_s,
        wall_time_s=wall,
        diverged_at=run.diverged_at,
        curve=run.curve,
        train_losses=run.train_losses,
        step_times_s=run.step_times_s,
        samples=run.samples,
        samples_to_target=run.samples_to_target,
    )


def _run_config(
    workload: Workload,
    seed: int,
    steps: int,
    batch_size: int,
    eval_every: int,
    stop_at_target: bool,
    config: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed, as JSON values (tuples become lists)."""
    own = {"workload": workload.name, "seed": seed, "steps": steps, "batch_size": batch_size,
           "eval_every": eval_every, "stop_at_target": stop_at_target}  # fmt: skip
    return json.loads(json.dumps({**own, **dict(config or {})}, default=repr))


def _finite(pending: list[torch.Tensor], model: nn.Module) -> bool:
    """Whether the losses since the last sync and every floating-point weight are finite (one host sync)."""
    params = [p.detach() for p in model.parameters() if p.is_floating_point()]
    checks = [torch.stack(pending).float().isfinite().all()] if pending else []
    if params:
        checks.append(torch.stack(torch._foreach_norm(params)).float().isfinite().all())
    return bool(torch.stack(checks).all()) if checks else True


def _batch_length(batch: Batch, requested: int) -> int:
    """Samples in ``batch``: dim 0 of its (first) tensor; the requested size for other batch types."""
    first = batch[0] if isinstance(batch, tuple | list) and batch else batch
    return first.shape[0] if isinstance(first, torch.Tensor) and first.ndim else requested


def _check_config(path: Path, stored: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Refuse to resume under another configuration, naming every field that differs."""
    if not stored:
        raise ValueError(
            f"checkpoint {path} records no run configuration (written by an older trainlab); delete it to start afresh"
        )
    missing = object()
    fields = sorted(k for k in set(stored) | set(config) if stored.get(k, missing) != config.get(k, missing))
    if fields:
        diff = "; ".join(
            f"{k}: checkpoint {stored.get(k, '(unset)')!r}, now {config.get(k, '(unset)')!r}" for k in fields
        )
        raise ValueError(
            f"checkpoint {path} was written by another run configuration ({diff}); resume with the checkpoint's "
            "configuration, or delete the checkpoint (or use another --out) to start afresh"
        )


@dataclass
class _RunState:
    step: int = 0
    elapsed_s: float = 0.0
    steps_to_target: int | None = None
    time_to_target_s: float | None = None
    diverged_at: int | None = None
    curve: list[dict[str, float]] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    step_times_s: list[float] = field(default_factory=list)
    samples: int = 0
    samples_to_target: int | None = None


def _evaluate(
    workload: Workload, model: nn.Module, run: _RunState, pending: list[torch.Tensor], step: int, wall: float
) -> None:
    losses = torch.stack(pending).float().tolist()
    first = step - len(losses)
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        run.diverged_at = first + bad[0] + 1
        losses = losses[: bad[0] + 1]
    run.train_losses.extend(losses)
    metric = float("nan") if bad else workload.evaluate(model)
    if not math.isfinite(metric) and not bad:
        run.diverged_at = step
    run.curve.append(
        {
            "step": step,
            "samples": run.samples,
            "wall_time_s": wall,
            "train_loss": sum(losses) / len(losses),
            "metric": metric,
        }
    )
    if run.steps_to_target is None and math.isfinite(metric) and workload.reached(metric):
        run.steps_to_target, run.time_to_target_s, run.samples_to_target = step, wall, run.samples


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run: _RunState,
    batch_sizes: BatchSizeController | None,
    config: Mapping[str, Any],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": json.dumps(config, sort_keys=True),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "batch_sizes": batch_sizes.state_dict() if batch_sizes is not None else {},
        "rng": torch.get_rng_state(),
        "run": {
            "step": run.step,
            "elapsed_s": run.elapsed_s,
            "steps_to_target": -1 if run.steps_to_target is None else run.steps_to_target,
            "time_to_target_s": -1.0 if run.time_to_target_s is None else run.time_to_target_s,
            "diverged_at": -1 if run.diverged_at is None else run.diverged_at,
            "curve": run.curve,
            "train_losses": run.train_losses,
            "step_times_s": run.step_times_s,
            "samples": run.samples,
            "samples_to_target": -1 if run.samples_to_target is None else run.samples_to_target,
        },
    }
    with atomic_path(path) as tmp:  # a run killed mid-save keeps its previous checkpoint
        torch.save(payload, tmp)


def _load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch_sizes: BatchSizeController | None,
    config: Mapping[str, Any],
) -> _RunState:
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as err:  # truncated or corrupt: torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise ValueError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); delete it to start that run from "
            "step 0, or resume into another --out"
        ) from None
    _check_config(path, json.loads(payload.get("config", "{}")), config)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if batch_sizes is not None:
        batch_sizes.load_state_dict(payload["batch_sizes"])
    torch.set_rng_state(payload["rng"])
    r = payload["run"]
    return _RunState(
        step=r["step"],
        elapsed_s=r["elapsed_s"],
        steps_to_target=None if r["steps_to_target"] < 0 else r["steps_to_target"],
        time_to_target_s=None if r["time_to_target_s"] < 0 else r["time_to_target_s"],
        diverged_at=None if r["diverged_at"] < 0 else r["diverged_at"],
        curve=r["curve"],
        train_losses=r["train_losses"],
        step_times_s=r["step_times_s"],
        samples=r.get("samples", 0),  # checkpoints written before samples were counted
        samples_to_target=None if r.get("samples_to_target", -1) < 0 else r["samples_to_target"],
    )
