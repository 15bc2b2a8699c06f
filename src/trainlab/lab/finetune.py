"""Fine-tune a workload's model with an adapter method (or fully) through the lab's runner, with the bench's
accounting: trainable parameters, optimizer-state bytes, peak memory, wall time and quality.

The adapter is attached in place to the runner's fresh model (``attach_``), data-dependent inits run on
``prepare_batches`` drawn from the workload's own batch stream (seed offset so they are not the first training
batches), and the method's training callback runs where a learning-rate scheduler would, right after each
optimizer step; its regularizer is added to the workload's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
# The adapter's random init (LoRA's A, ...) draws from its own seed: the global stream at attach time depends on what
# the process did before (a workload's first make_model builds and caches its pretrained model, drawing from it).
ATTACH_SEED_OFFSET = 104729
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
    """Runs a learning-rate scheduler (if any), then the adapter callback, after every optimizer step."""

    def __init__(self, run: AdapterRun, inner: Any = None) -> None:
        self.run, self.inner, self.count = run, inner, 0

    def step(self) -> None:
        if self.inner is not None:
            self.inner.step()
        self.count += 1
        if self.run.callback is not None:
            self.run.callback.step(self.count)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "inner": self.inner.state_dict() if self.inner is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])
        if self.inner is not None and state.get("inner") is not None:
            self.inner.load_state_dict(state["inner"])


class AdapterRun:
    """One adapter method inside the lab's runner: :meth:`wrap` an optimizer factory so that it first attaches the
    adapter to the runner's fresh model (in place), runs ``prepare`` on batches from the workload's own stream and
    builds the training callback; :meth:`loss_fn` adds the callback's regularizer; :meth:`scheduler` runs the
    callback after every optimizer step (next to an optional learning-rate scheduler). ``method=None`` trains every
    parameter (full fine-tuning) and changes nothing. Shared by :func:`finetune` and ``trainlab bench --adapters``.
    """

    def __init__(
        self,
        workload: Workload,
        method: str | None,
        *,
        steps: int,
        seed: int = 0,
        targets: Sequence[str | type] | None = None,
        config: Mapping[str, Any] | None = None,
        callback: Mapping[str, Any] | None = None,
        prepare_batches: int = 64,
        prepare_batch_size: int = 2,
    ) -> None:
        self.workload, self.method, self.steps, self.seed = workload, method, steps, seed
        self.targets = DEFAULT_TARGETS.get(workload.name, [nn.Linear]) if targets is None else targets
        self.config, self.callback_options = dict(config or {}), dict(callback or {})
        self.prepare_batches, self.prepare_batch_size = prepare_batches, prepare_batch_size
        self.callback: adapters.TrainingCallback | None = None
        self.model: nn.Module | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        """Attach the adapter to ``model`` in place, prepare it and build its callback; returns ``model``."""
        self.model = model
        if self.method is None:
            return model
        batches = [
            self.workload.make_batch(self.prepare_batch_size, batch_generator(self.seed + PREPARE_SEED_OFFSET, i))
            for i in range(self.prepare_batches)
        ]
        data = {"batches": batches, "loss": self.workload.loss} if adapters.get_spec(self.method).arrange else {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + ATTACH_SEED_OFFSET)
            adapters.attach_(model, self.method, targets=self.targets, **data, **self.config)
        adapters.prepare(model, batches, loss=self.workload.loss)
        spec = adapters.get_spec(self.method)
        options = dict(self.callback_options)
        if spec.callback is not None and "total_steps" in spec.callback_fields:
            options.setdefault("total_steps", self.steps)
        self.callback = adapters.training_callback(model, **options)
        return model

    def wrap(self, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> Callable[..., Any]:
        return lambda model: make_optimizer(self.attach(model))

    def loss_fn(self, model: nn.Module, batch: Any) -> torch.Tensor:
        loss = self.workload.loss(model, batch)
        return loss + self.callback.regularizer() if self.callback is not None else loss

    def scheduler(self, make_scheduler: Callable[[Any], Any] | None = None) -> Callable[[Any], Any] | None:
        """A scheduler factory that steps ``make_scheduler``'s scheduler (if any) and then the adapter callback."""
        if self.method is None:
            return make_scheduler

        def make(optimizer: Any) -> _CallbackAsScheduler:
            inner = make_scheduler(optimizer) if make_scheduler is not None else None
            return _CallbackAsScheduler(self, inner)

        return make

    def counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the adapted model."""
        assert self.model is not None, "counts() after training"
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_optimizer(name: str, hyperparameters: Mapping[str, Any]) -> Callable[[nn.Module], Any]:
    """``create(name)`` over the parameters that train (an adapter's), by name; frozen ones get no state."""
    return lambda model: create(
        name, [(n, p) for n, p in model.named_parameters() if p.requires_grad], **hyperparameters
    )


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
    hp = {**workload.hyperparameters.get(optimizer, {}), **(hyperparameters or {})}
    adapter = AdapterRun(
        workload,
        method,
        steps=steps,
        seed=seed,
        targets=targets,
        config=config,
        callback=callback,
        prepare_batches=prepare_batches,
        prepare_batch_size=prepare_batch_size,
    )
    reset_peak_rss()
    run = train(
        workload,
        adapter.wrap(trainable_optimizer(optimizer, hp)),
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        eval_every=eval_every,
        loss_fn=adapter.loss_fn,
        make_scheduler=adapter.scheduler(),
    )
    trainable, total = adapter.counts()
    return FinetuneResult(
        method=method or "full",
        trainable=trainable,
        total=total,
        optimizer_state_bytes=state_bytes(run.optimizer),
        peak_rss_bytes=peak_rss_bytes(),
        run=run,
    )


def finetune_report(workload: Workload, results: Sequence[FinetuneResult]) -> str:
    """A markdown table: one row per method (mean over its seeds)."""
    rows = [
        {
            "algorithm": r.method,
            "trainable_parameters": r.trainable,
            "total_parameters": r.total,
            "optimizer_state_bytes": r.optimizer_state_bytes,
            "peak_rss_bytes": r.peak_rss_bytes,
            "wall_time_s": r.run.wall_time_s,
            "final_metric": r.final_metric,
            "steps_to_target": r.run.steps_to_target,
        }
        for r in results
    ]
    head = [
        f"# Fine-tuning on {workload.name}",
        "",
        f"{workload.description}; metric {workload.metric} (target {workload.target}).",
        "",
    ]
    return "\n".join(head + adapter_table(rows, workload.metric, label="method")) + "\n"


def adapter_table(records: Sequence[Mapping[str, Any]], metric: str, label: str = "adapter + algorithm") -> list[str]:
    """Markdown rows, one per ``algorithm`` label (mean over its seeds): trainable parameters and their share,
    optimizer state, peak RSS, wall time, final metric and steps to target. Read by ``finetune`` and by
    ``bench --adapters`` (whose records carry the same keys)."""
    rows = [
        f"| {label} | trainable | share | optimizer state | peak RSS | wall time | final {metric} | steps to target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["algorithm"] for r in records):
        runs = [r for r in records if r["algorithm"] == name]
        first = runs[0]
        finite = [r["final_metric"] for r in runs if r["final_metric"] is not None]
        metric_text = f"{sum(finite) / len(finite):.4f}" if finite else "diverged"
        wall = sum(r["wall_time_s"] for r in runs) / len(runs)
        reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
        to_target = f"{sum(reached) / len(reached):.0f} ({len(reached)}/{len(runs)})" if reached else "-"
        rows.append(
            f"| {name} | {first['trainable_parameters']:,} | "
            f"{first['trainable_parameters'] / first['total_parameters']:.2%} | "
            f"{first['optimizer_state_bytes'] / 2**10:.1f} KiB | "
            f"{max(r['peak_rss_bytes'] for r in runs) / 2**20:.0f} MiB | {wall:.2f} s | {metric_text} | {to_target} |"
        )
    return rows


# -- `trainlab bench --adapters`: every (adapter, algorithm) pair as one bench algorithm ------------------------------
FULL = "full"  # in a list of adapters: train every parameter (full fine-tuning)


def bench_label(adapter: str | None, algorithm: str) -> str:
    """The bench's algorithm column for an adapter run: ``lora+adamw`` (the plain name without an adapter)."""
    return algorithm if adapter is None else f"{adapter}+{algorithm}"


def check_bench_adapters(
    names: Sequence[str],
    algorithms: Sequence[str],
    options: Mapping[str, Any] | None,
    callbacks: Mapping[str, Any] | None,
) -> None:
    """Every adapter name, option and callback option of a bench, checked before any training."""
    from trainlab.lab import local

    if len(set(names)) != len(names):
        raise ValueError(f"adapters: each method once, got {list(names)}")
    for algorithm in algorithms:
        if local.is_local(algorithm):
            raise ValueError(f"adapters train with an optimizer; {algorithm!r} is a local-training method")
    for what, table in (("adapter option", options or {}), ("adapter callback option", callbacks or {})):
        for name, values in table.items():
            if not isinstance(values, Mapping) or name not in names or name == FULL:
                raise ValueError(
                    f"{what} {name!r}: name an adapter of this bench as METHOD.KEY=VALUE (adapters: {', '.join(names)})"
                )
    for name in names:
        if name == FULL:
            continue
        spec = adapters.get_spec(name)  # an unknown name raises, listing the methods
        spec.resolve((options or {}).get(name, {}))
        given = dict((callbacks or {}).get(name, {}))
        if "total_steps" in spec.callback_fields:
            given.setdefault("total_steps", None)  # the run's steps, known per workload
        spec.resolve_callback(given)


def bench_adapter_run(
    workload: Workload,
    adapter: str,
    algorithm: str,
    hyperparameters: Mapping[str, Any],
    *,
    seed: int,
    steps: int,
    targets: Sequence[str | type] | None = None,
    options: Mapping[str, Any] | None = None,
    callbacks: Mapping[str, Any] | None = None,
) -> tuple[AdapterRun, Callable[[nn.Module], Any]]:
    """The :class:`AdapterRun` of one bench run and its optimizer factory (``algorithm`` over the trainable
    parameters only)."""
    from trainlab.lab import local

    method = None if adapter == FULL else adapter
    run = AdapterRun(
        workload,
        method,
        steps=steps,
        seed=seed,
        targets=targets,
        config=(options or {}).get(adapter, {}),
        callback=(callbacks or {}).get(adapter, {}),
    )
    return run, run.wrap(trainable_optimizer(local.algorithm_spec(algorithm).name, hyperparameters))


def adapter_record(run: AdapterRun, adapter: str, batch: Any) -> dict[str, Any]:
    """The bench record's adapter columns: trainable and total parameters, and the activation bytes autograd holds
    during one step of the adapted model (measured on a copy of the trained model; the sizes do not depend on the
    weights)."""
    import copy

    from trainlab.memory.saved import SavedTensorMeter

    assert run.model is not None, "adapter_record() after training"
    trainable, total = run.counts()
    model = copy.deepcopy(run.model)
    with SavedTensorMeter(exclude=list(model.parameters())) as meter:
        run.workload.loss(model, batch).backward()
    return {
        "adapter": adapter,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "activation_peak_bytes": meter.peak_bytes,
    }


def append_adapter_report(results: Sequence[Mapping[str, Any]], path: Any) -> None:
    """Append one table per workload (trainable parameters and their share next to the bench's columns) to the
    bench report at ``path``, for the runs that carry an adapter."""
    from pathlib import Path

    from trainlab.runtime import atomic_path

    runs = [r for r in results if "adapter" in r]
    if not runs:
        return
    lines = ["## Adapters side by side", "", "Mean over seeds; the share is of the adapted model's parameters.", ""]
    for workload in dict.fromkeys(r["workload"] for r in runs):
        rows = [r for r in runs if r["workload"] == workload]
        lines += [f"### {workload}", "", *adapter_table(rows, rows[0]["metric"]), ""]
    text = Path(path).read_text() + "\n" + "\n".join(lines)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
