"""`trainlab bench`: train every (workload, algorithm, seed) and write results, a report and plots."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainlab.lab import local
from trainlab.lab.energy import EnergyMeter
from trainlab.lab.hyperparameters import resolve_hyperparameters
from trainlab.lab.memory import peak_rss_bytes, reset_peak_rss
from trainlab.lab.runner import train
from trainlab.lab.workloads import Workload, get_workload
from trainlab.runtime import batch_generator

DEMO_WORKLOADS = ("digits-mlp",)
DEMO_ALGORITHMS = ("sgd", "adamw", "lion", "muon", "stable-spam")


@dataclass(frozen=True)
class BenchConfig:
    workloads: Sequence[str]
    algorithms: Sequence[str]
    seeds: int = 1
    steps: int | None = None
    out: Path = Path("bench-out")
    # Overrides: {"lr": 1e-3} for every algorithm, {"adamw": {"lr": 1e-3}} for one.
    hyperparameters: Mapping[str, Any] | None = None
    schedule: str | None = None
    schedule_options: Mapping[str, Any] | None = None  # the schedule's own options, e.g. {"warmup": 0.1}
    resume: bool = False
    checkpoint_every: int = 50
    progress: bool = True
    overwrite: bool = False  # replace the results of another configuration in ``out``
    # Adapter methods ("full" = every parameter): each algorithm trains each adapter (trainlab.lab.finetune);
    # per-method options and callback options as {"lora": {"r": 4}}, adapted layers by name (default: the workload's).
    adapters: Sequence[str] = ()
    adapter_options: Mapping[str, Any] | None = None
    adapter_callbacks: Mapping[str, Any] | None = None
    adapter_targets: Sequence[str] | None = None


def validate(config: BenchConfig) -> list[Workload]:
    """Check every name and hyperparameter value before any training starts, so a typo costs no compute."""
    workloads = [get_workload(name) for name in config.workloads]
    for algorithm in config.algorithms:
        local.algorithm_spec(algorithm)
        if config.schedule is not None and local.is_local(algorithm):
            raise ValueError(f"a schedule applies to optimizers; {algorithm!r} is a local-training method")
    _check_override_names(config)
    if config.adapters:
        from trainlab.lab.finetune import check_bench_adapters

        check_bench_adapters(config.adapters, config.algorithms, config.adapter_options, config.adapter_callbacks)
    for algorithm in config.algorithms:
        for w in workloads:
            _check_values(w, algorithm, resolve_hyperparameters(algorithm, w, config.hyperparameters))
    if config.schedule is not None:
        from trainlab.schedules import scheduler_names

        if config.schedule not in scheduler_names():
            raise ValueError(f"unknown schedule {config.schedule!r}; choose one of: {', '.join(scheduler_names())}")
        _check_schedule(config, workloads)
    elif config.schedule_options:
        raise ValueError("schedule options need a schedule (--schedule)")
    if not isinstance(config.seeds, int) or config.seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {config.seeds!r}")
    if config.steps is not None and (not isinstance(config.steps, int) or config.steps < 1):
        raise ValueError(f"steps must be a positive integer, got {config.steps!r}")
    return workloads


def _check_schedule(config: BenchConfig, workloads: Sequence[Workload]) -> None:
    """Build the schedule once on a throwaway optimizer, where its options are checked."""
    import torch

    from trainlab.schedules import create_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        create_scheduler(config.schedule, probe, total_steps=config.steps or workloads[0].steps,
                         **dict(config.schedule_options or {}))  # fmt: skip
    except (ValueError, TypeError) as err:
        raise ValueError(f"--schedule {config.schedule}: {err}") from None


def _check_override_names(config: BenchConfig) -> None:
    """A per-algorithm override (``adamw.lr=...``) must name an algorithm of this bench."""
    for key, value in (config.hyperparameters or {}).items():
        if isinstance(value, Mapping) and key not in config.algorithms:
            first = next(iter(value), "")
            raise ValueError(
                f"--hp {key}.{first} names unknown algorithm '{key}' (not in this bench); choose one of: "
                f"{', '.join(config.algorithms)}"
            )


def _check_values(workload: Workload, algorithm: str, hp: Mapping[str, Any]) -> None:
    """Build the algorithm's optimizer (or local trainer) on a fresh model, where every value is checked."""
    try:
        local.make_trainer(workload, algorithm, hp, 0)(workload.make_model())
    except (ValueError, TypeError) as err:
        raise ValueError(f"hyperparameters of {algorithm} on {workload.name}: {err}") from None


def run_bench(config: BenchConfig) -> list[dict[str, Any]]:
    """Run the whole grid and write results.json, report.md, run.json (configuration and provenance),
    train-loss.csv and the plots into ``config.out``."""
    from trainlab.lab.bench_files import TrainLossLog, plot_train_losses, prepare_out
    from trainlab.lab.plots import write_plots
    from trainlab.lab.report import write_report

    workloads = validate(config)
    out = Path(config.out)
    origin = prepare_out(out, resolved_config(config, workloads), config.overwrite)
    log = TrainLossLog(out)
    total = (
        config.seeds
        * max(1, len(config.adapters))
        * sum(
            config.steps or local.default_steps(w, a, resolve_hyperparameters(a, w, config.hyperparameters))
            for w in workloads
            for a in config.algorithms
        )
    )
    results: list[dict[str, Any]] = []
    with tqdm(total=total, desc="bench", unit="step", disable=not config.progress) as bar:
        for w in workloads:
            for adapter, algorithm in ((d, a) for d in config.adapters or [None] for a in config.algorithms):
                for seed in range(config.seeds):
                    label = f"{w.name} {algorithm if adapter is None else f'{adapter}+{algorithm}'} seed {seed}"
                    bar.set_postfix_str(label)

                    def show(point: dict[str, float], label: str = label) -> None:
                        bar.set_postfix_str(f"{label} loss {point['train_loss']:.4g}")

                    record = _run_one(config, w, algorithm, seed, out, bar.update, show, log, adapter)
                    results.append({**record, "provenance": origin})
                    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out / "report.md")
    if config.adapters:
        from trainlab.lab.finetune import append_adapter_report

        append_adapter_report(results, out / "report.md")
    write_plots(results, out)
    plot_train_losses(log.path, out)
    return results


def resolved_config(config: BenchConfig, workloads: Sequence[Workload]) -> dict[str, Any]:
    """Every setting the results depend on, with each (workload, algorithm)'s resolved hyperparameters and steps."""
    runs = {}
    for w in workloads:
        for a in config.algorithms:
            hp = resolve_hyperparameters(a, w, config.hyperparameters)
            runs[f"{w.name}/{a}"] = {"hyperparameters": hp, "steps": config.steps or local.default_steps(w, a, hp)}
    return {
        "workloads": list(config.workloads),
        "algorithms": list(config.algorithms),
        "seeds": config.seeds,
        "steps": config.steps,
        "hyperparameters": dict(config.hyperparameters or {}),
        "schedule": config.schedule,
        "schedule_options": dict(config.schedule_options or {}),
        "checkpoint_every": config.checkpoint_every,
        "runs": runs,
        **(
            {
                "adapters": list(config.adapters),
                "adapter_options": dict(config.adapter_options or {}),
                "adapter_callbacks": dict(config.adapter_callbacks or {}),
                "adapter_targets": config.adapter_targets,
            }
            if config.adapters
            else {}
        ),
    }


def _run_one(
    config: BenchConfig,
    workload: Workload,
    algorithm: str,
    seed: int,
    out: Path,
    progress: Any,
    on_evaluation: Any = None,
    log: Any = None,
    adapter: str | None = None,
) -> dict[str, Any]:
    hp = resolve_hyperparameters(algorithm, workload, config.hyperparameters)
    steps = config.steps or local.default_steps(workload, algorithm, hp)
    make_scheduler = None
    if config.schedule is not None:
        from trainlab.schedules import create_scheduler

        def make_scheduler(opt: Any) -> Any:
            return create_scheduler(config.schedule, opt, total_steps=steps, **dict(config.schedule_options or {}))

    make_trainer, loss_fn, name, adapted = local.make_trainer(workload, algorithm, hp, seed), None, algorithm, None
    if adapter is not None:  # the adapter is attached to the runner's fresh model before its optimizer is built
        from trainlab.lab.finetune import bench_adapter_run, bench_label

        adapted, make_trainer = bench_adapter_run(workload, adapter, algorithm, hp, seed=seed, steps=steps,
                                                  targets=config.adapter_targets, options=config.adapter_options,
                                                  callbacks=config.adapter_callbacks)  # fmt: skip
        loss_fn, make_scheduler = adapted.loss_fn, adapted.scheduler(make_scheduler)
        name = bench_label(adapter, algorithm)
    checkpoint = out / "checkpoints" / f"{workload.name}--{name}--seed{seed}.pt"
    reset_peak_rss()
    with EnergyMeter() as energy:  # the whole run (training, evaluations); package/GPU counters, or n/a
        result = train(
            workload,
            make_trainer,
            seed=seed,
            steps=steps,
            batch_size=local.batch_size(workload, algorithm),
            make_scheduler=make_scheduler,
            checkpoint=checkpoint,
            checkpoint_every=config.checkpoint_every,
            resume=config.resume,
            progress=progress,
            loss_fn=loss_fn,
            config={
                "algorithm": name,
                "hyperparameters": hp,
                "schedule": config.schedule,
                "schedule_options": dict(config.schedule_options or {}),
            },  # fmt: skip
            on_evaluation=on_evaluation,
        )
    if log is not None:
        log.add(workload.name, name, seed, result.train_losses)
    step_times = result.step_times_s
    peak_rss = peak_rss_bytes()
    batch = workload.make_batch(local.batch_size(workload, algorithm), batch_generator(seed, steps))
    if adapted is None:
        activations = local.activation_peak_bytes(workload, algorithm, hp, seed, batch)
    else:
        from trainlab.lab.finetune import adapter_record

        extra = adapter_record(adapted, adapter, batch)
        activations = extra.pop("activation_peak_bytes")
    return {
        "workload": workload.name,
        "algorithm": name,
        "seed": seed,
        "hyperparameters": {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()},
        "schedule": config.schedule or "constant",
        "steps": steps,
        "metric": workload.metric,
        "higher_is_better": workload.higher_is_better,
        "target": workload.target,
        "final_metric": _finite_or_none(result.final_metric),
        "best_metric": _finite_or_none(result.best_metric),
        "steps_to_target": result.steps_to_target,
        "samples": result.samples,
        "samples_to_target": result.samples_to_target,
        "time_to_target_s": result.time_to_target_s,
        "wall_time_s": result.wall_time_s,
        "step_time_ms_median": 1e3 * statistics.median(step_times) if step_times else None,
        "peak_rss_bytes": peak_rss,
        "optimizer_state_bytes": local.trainer_state_bytes(result.optimizer),
        "activation_peak_bytes": activations,
        "energy_j": energy.reading.joules,
        "energy_per_sample_j": energy.reading.per(result.samples),
        "energy_note": energy.reading.reason,
        "diverged": result.diverged,
        "diverged_at_step": result.diverged_at,
        "curve": [{k: _finite_or_none(v) for k, v in point.items()} for point in result.curve],
        **(extra if adapted is not None else {}),
    }


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a diverged metric is written as null."""
    return value if isinstance(value, int | float) and math.isfinite(value) else None
