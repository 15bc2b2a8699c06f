"""A compression run on a built-in workload: train (or reuse a cached) dense model, compress it (prune at one
or more sparsities, optionally recovering with PERP, or quantize at a bit-width), evaluate, export, and write
report.md, results.json and (several sparsities) a plot. ``trainlab compress`` parses into a
:class:`CompressionJob` and calls :func:`prune_workload` or :func:`quantize_workload`."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from trainlab.compress import Plan, allocate_plan, compress, compressible_layers
from trainlab.compress.registry import compressor_names, get_compressor
from trainlab.lab.cache import default_cache_dir
from trainlab.lab.compress_report import plot_metric_vs_sparsity, pruning_report, quantization_report, results_json
from trainlab.lab.compression import (
    calibration_batches,
    calibration_inputs,
    recover_perp,
    trained_model,
)
from trainlab.lab.workloads import Workload, get_workload


@dataclass(frozen=True)
class CompressionJob:
    """One ``trainlab compress`` run; arguments already checked (the CLI names the flag of a bad value). Either
    ``workload`` (a built-in workload, trained here) or ``model`` (the user's ``pkg.module:factory`` or Hugging
    Face directory, with ``calibration`` batches from ``pkg.module:batches``; see :mod:`.compress_user`)."""

    workload: str | None
    method: str
    out: Path
    allocator: str = "uniform"
    sparsities: tuple[float, ...] = ()
    pattern: str | None = None  # N:M for method "nm"
    recover: str | None = None
    recover_steps: int = 150
    bits: float | None = None
    second_order: bool = False
    sequential: bool = False  # with second order: Hessians layer by layer on the quantized upstream (GPTQ's order)
    group_size: int | None = None
    steps: int | None = None  # dense training steps (None: the workload's)
    seed: int = 0
    calibration_batches: int = 4
    cache_dir: Path | None = None  # None: default_cache_dir()
    progress: bool = True
    model: str | None = None
    calibration: str | None = None
    embedding_bits: int | None = None  # also quantize nn.Embedding tables, one grid per row


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
        pruned, path, levels, achieved, left_dense = _prune_one(job, dense, s)
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
                "achieved_sparsity": round(achieved, 6),
                "dense_layers": left_dense,
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


def _prune_one(
    job: CompressionJob, dense: _Dense, sparsity: float
) -> tuple[nn.Module, Path, dict[str, Any], float, dict[str, str]]:
    """The pruned model, its exported file, its per-layer levels, the achieved sparsity over all compressible
    weights and the layers left dense (with the reason)."""
    from trainlab.compress.export import save_compressed
    from trainlab.compress.masks import sparsity as layer_sparsity

    tag = f"{job.method}-{sparsity:g}"
    path = job.out / f"model-{tag}.safetensors"
    if job.method in compressor_names("structured"):
        from trainlab.compress.structured import save_structured

        result = compress(dense.model, [(".*", job.method, sparsity)], calibration=dense.calibration)
        save_structured(result.model, path)
        widths = {n: int(m.weight.shape[0]) for n, m in compressible_layers(result.model).items()}
        return result.model, path, widths, result.report.sparsity, {}
    if job.method == "nm":
        plan = Plan([(".*", "nm", job.pattern)])
    else:
        plan = allocate_plan(
            job.allocator, dense.model, sparsity=sparsity, calibration=dense.calibration, progress=job.progress
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layers N:M leaves dense are named in the report
        result = compress(dense.model, plan)
    if not result.report.layers:
        raise ValueError(f"--pattern {job.pattern}: no layer's input dimension is divisible by M (all left dense)")
    pruned = result.model
    (job.out / f"plan-{tag}.json").write_text(plan.to_json())
    if job.recover == "perp":
        recover_perp(pruned, dense.workload, steps=job.recover_steps, seed=job.seed + 1, progress=job.progress)
    save_compressed(pruned, path, metadata={"plan": plan.to_json()})
    zeros = layer_sparsity(pruned)
    levels = {k: round(zeros.get(k, 0.0), 6) for k in compressible_layers(pruned)}
    return pruned, path, levels, result.report.sparsity, result.report.dense


def quantize_workload(job: CompressionJob) -> Path:
    """Quantize the workload's dense model at ``job.bits``; write the packed file, results.json and report.md
    and return the path of report.md."""
    from trainlab.compress.quant.apply import save_quantized_model

    dense = _dense_setup(job)
    qm = _quantize(job, dense)
    if job.embedding_bits is not None:
        from trainlab.compress.embeddings import quantize_embeddings

        qm = quantize_embeddings(qm, job.embedding_bits)
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
    """The CompressionResult for the job: the allocator's plan (bits per layer, or per column for baq), then
    :func:`trainlab.compress.compress`; gradient-aware methods get whole batches and the workload's loss."""
    try:
        plan = allocate_plan(
            job.allocator,
            dense.model,
            bits=job.bits,
            compressor=job.method,
            calibration=dense.calibration,
            second_order=job.second_order,
            group_size=job.group_size,
            progress=job.progress,
        )
    except ValueError as err:
        raise ValueError(f"--allocator {job.allocator} --bits {job.bits:g}: {err}") from None
    batches = dense.calibration
    if "gradient" in get_compressor(job.method).needs:  # the same draws as the inputs, with their targets
        batches = calibration_batches(dense.workload, job.calibration_batches)
    return compress(
        dense.model,
        plan,
        calibration=batches,
        loss=dense.workload.loss,
        second_order=job.second_order,
        sequential=job.sequential,
        group_size=job.group_size,
    )
