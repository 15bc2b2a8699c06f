"""A compression run on a built-in workload: train (or reuse a cached) dense model, compress it (prune at one
or more sparsities, optionally recovering with PERP, or quantize at a bit-width), evaluate, export, and write
report.md, results.json and (several sparsities) a plot. ``trainlab compress`` parses into a
:class:`CompressionJob` and calls :func:`prune_workload` or :func:`quantize_workload`."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from trainlab.compress.structured import METHODS as STRUCTURED
from trainlab.lab.compress_report import plot_metric_vs_sparsity, pruning_report, quantization_report, results_json
from trainlab.lab.compression import (
    calibration_batches,
    calibration_inputs,
    default_cache_dir,
    recover_perp,
    trained_model,
)
from trainlab.lab.workloads import Workload, get_workload


@dataclass(frozen=True)
class CompressionJob:
    """One ``trainlab compress`` run; arguments already checked (the CLI names the flag of a bad value)."""

    workload: str
    method: str
    out: Path
    allocator: str = "uniform"
    sparsities: tuple[float, ...] = ()
    pattern: str | None = None  # N:M for method "nm"
    recover: str | None = None
    recover_steps: int = 150
    bits: float | None = None
    second_order: bool = False
    group_size: int | None = None
    steps: int | None = None  # dense training steps (None: the workload's)
    seed: int = 0
    calibration_batches: int = 4
    cache_dir: Path | None = None  # None: default_cache_dir()
    progress: bool = True


@dataclass(frozen=True)
class _Dense:
    workload: Workload
    model: nn.Module
    metric: float
    file_bytes: int
    calibration: list[torch.Tensor]


def _dense_setup(job: CompressionJob) -> _Dense:
    """The workload's trained dense model (cached), its metric and saved size, and calibration inputs."""
    from trainlab.compress.export import save_dense

    workload = get_workload(job.workload)
    job.out.mkdir(parents=True, exist_ok=True)
    cache = job.cache_dir or default_cache_dir()
    model = trained_model(workload, job.seed, job.steps, cache, progress=job.progress)
    before = workload.evaluate(model)
    dense_bytes = save_dense(model, job.out / "model-dense.safetensors")
    return _Dense(workload, model, before, dense_bytes, calibration_inputs(workload, job.calibration_batches))


def prune_workload(job: CompressionJob) -> Path:
    """Prune the workload's dense model at each of ``job.sparsities``; returns the path of report.md."""
    dense = _dense_setup(job)
    records = []
    for s in tqdm(job.sparsities, desc="sparsities", disable=not job.progress or len(job.sparsities) == 1):
        pruned, path, levels = _prune_one(job, dense, s)
        records.append(
            {
                "workload": job.workload,
                "method": job.method,
                "allocator": job.allocator,
                "pattern": job.pattern,
                "recover": job.recover,
                "metric": dense.workload.metric,
                "higher_is_better": dense.workload.higher_is_better,
                "metric_before": dense.metric,
                "file_bytes_before": dense.file_bytes,
                "sparsity": s,
                "metric_after": dense.workload.evaluate(pruned),
                "file_bytes_after": path.stat().st_size,
                "levels": levels,
            }
        )
    (job.out / "results.json").write_text(json.dumps(results_json(records), indent=1))
    (job.out / "report.md").write_text(pruning_report(records))
    if len(records) > 1:
        plot_metric_vs_sparsity(records, job.out / "metric_vs_sparsity.png")
    return job.out / "report.md"


def _prune_one(job: CompressionJob, dense: _Dense, sparsity: float) -> tuple[nn.Module, Path, dict[str, Any]]:
    """The pruned model, its exported file and its per-layer levels."""
    from trainlab.compress.export import save_compressed
    from trainlab.compress.masks import sparsity as layer_sparsity
    from trainlab.compress.pipeline import allocate_magnitude, magnitude_plan
    from trainlab.compress.plan import Plan, compressible_layers

    tag = f"{job.method}-{sparsity:g}"
    path = job.out / f"model-{tag}.safetensors"
    if job.method in STRUCTURED:
        from trainlab.compress.structured import save_structured, structured_prune

        pruned = structured_prune(dense.model, job.method, sparsity, dense.calibration)
        save_structured(pruned, path)
        return pruned, path, {n: int(m.weight.shape[0]) for n, m in compressible_layers(pruned).items()}
    pruned = copy.deepcopy(dense.model)
    if job.method == "nm":
        m = int(job.pattern.split(":")[1])
        fits = [n for n, layer in compressible_layers(pruned).items() if layer.weight.shape[1] % m == 0]
        if not fits:
            raise ValueError(f"--pattern {job.pattern}: no layer's input dimension is divisible by M={m}")
        plan = Plan.from_levels("nm", dict.fromkeys(fits, job.pattern))
    else:
        kept = allocate_magnitude(pruned, job.allocator, sparsity, dense.calibration, progress=job.progress)
        plan = magnitude_plan(pruned, kept)
    plan.apply(pruned)
    (job.out / f"plan-{tag}.json").write_text(plan.to_json())
    if job.recover == "perp":
        recover_perp(pruned, dense.workload, steps=job.recover_steps, seed=job.seed + 1, progress=job.progress)
    save_compressed(pruned, path, metadata={"plan": plan.to_json()})
    zeros = layer_sparsity(pruned)
    return pruned, path, {k: round(zeros.get(k, 0.0), 6) for k in compressible_layers(pruned)}


def quantize_workload(job: CompressionJob) -> Path:
    """Quantize the workload's dense model at ``job.bits``; write the packed file, results.json and report.md
    and return the path of report.md."""
    from trainlab.compress.plan import compressible_layers
    from trainlab.compress.quant.apply import save_quantized_model

    dense = _dense_setup(job)
    qm = _quantize(job, dense)
    levels = qm.bits
    path = job.out / f"model-{job.method}-{job.bits:g}bit.safetensors"
    size = save_quantized_model(qm, path, metadata={"workload": job.workload, "allocator": job.allocator})
    counts = {k: m.weight.numel() for k, m in compressible_layers(dense.model).items()}
    mean_bits = sum(levels[k] * n for k, n in counts.items()) / sum(counts.values())
    record = {
        "workload": job.workload,
        "method": job.method,
        "allocator": job.allocator,
        "second_order": qm.second_order,
        "group_size": job.group_size,
        "metric": dense.workload.metric,
        "higher_is_better": dense.workload.higher_is_better,
        "metric_before": dense.metric,
        "file_bytes_before": dense.file_bytes,
        "bits": job.bits,
        "mean_bits": round(mean_bits, 4),
        "metric_after": dense.workload.evaluate(qm.model),
        "file_bytes_after": size,
        "levels": levels,
    }
    (job.out / "results.json").write_text(json.dumps(record, indent=1))
    (job.out / "report.md").write_text(quantization_report(record))
    return job.out / "report.md"


def _quantize(job: CompressionJob, dense: _Dense) -> Any:
    """The QuantizedModel for the job: BAQ (per-column bits) or per-layer bits then the method."""
    from trainlab.compress.pipeline import allocate_bits
    from trainlab.compress.quant.apply import METHODS as QUANT
    from trainlab.compress.quant.apply import layer_gradients, quantize_model, quantize_model_baq

    if job.allocator == "baq":
        return quantize_model_baq(dense.model, job.bits, dense.calibration, group_size=job.group_size)
    options = {} if job.allocator == "uniform" else {"group_size": job.group_size}
    try:
        levels = allocate_bits(dense.model, job.allocator, job.bits, job.method, dense.calibration, **options)
    except ValueError as err:
        raise ValueError(f"--allocator {job.allocator} --bits {job.bits:g}: {err}") from None
    gradients = None
    if QUANT[job.method].needs_gradient:
        batches = calibration_batches(dense.workload, job.calibration_batches)
        gradients = layer_gradients(dense.model, batches, dense.workload.loss)
    return quantize_model(
        dense.model,
        job.method,
        levels,
        second_order=job.second_order,
        calibration=dense.calibration,
        group_size=job.group_size,
        gradients=gradients,
    )
