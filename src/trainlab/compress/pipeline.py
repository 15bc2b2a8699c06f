"""From a model and calibration data to per-layer levels: the glue between allocators (pure), level
databases and calibration measurements; plus the cached dense checkpoint the CLI and claims start from."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from trainlab.compress import allocate as alloc
from trainlab.compress.calibrate import distortion_curves, kl_to_dense, model_outputs, staged_kl_fitness
from trainlab.compress.plan import Plan, compressible_layers
from trainlab.compress.prune import MagnitudeLevels, check_sparsity, kept_count
from trainlab.lab.workloads.base import Workload

ALLOCATORS = ("uniform", "global", "layer-adaptive", "evopress")
LAYER_ADAPTIVE_GRID = tuple(i / 50 for i in range(50))  # sparsity 0, 0.02, ..., 0.98 (spec P17)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/trainlab`` (or ``~/.cache/trainlab``): where dense checkpoints are reused from."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainlab"


def trained_model(
    workload: Workload, seed: int = 0, steps: int | None = None, cache_dir: Path | None = None, progress: bool = False
) -> nn.Module:
    """The workload's model trained with AdamW at its tuned hyperparameters; with ``cache_dir``, the weights
    are reused from ``{workload}-seed{seed}-steps{steps}.pt`` when present (saved there otherwise). A cached
    file that no longer fits the workload's model (its architecture changed) is retrained and replaced."""
    from trainlab.lab.bench import resolve_hyperparameters
    from trainlab.lab.runner import train
    from trainlab.optim import create

    steps = workload.steps if steps is None else steps
    path = None if cache_dir is None else Path(cache_dir) / f"{workload.name}-seed{seed}-steps{steps}.pt"
    if path is not None and path.exists():
        torch.manual_seed(seed)
        model = workload.make_model()
        with contextlib.suppress(RuntimeError, KeyError, EOFError):  # a stale or truncated entry is retrained
            model.load_state_dict(torch.load(path, weights_only=True))
            return model
    hp = resolve_hyperparameters("adamw", workload, None)
    bar = tqdm(total=steps, desc=f"train {workload.name}", disable=not progress, leave=False)
    result = train(
        workload, lambda m: create("adamw", m.named_parameters(), **hp), seed=seed, steps=steps, progress=bar.update
    )
    bar.close()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result.model.state_dict(), path)
    return result.model


def _layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach() for name, m in compressible_layers(model).items()}


def calibration_kl(model: nn.Module, kept: dict[str, int], inputs: Sequence[torch.Tensor]) -> float:
    """Mean KL(dense || magnitude-pruned at ``kept``) over the calibration inputs."""
    pruned = copy.deepcopy(model)
    magnitude_plan(pruned, kept).apply(pruned)
    dense, out = model_outputs(model, inputs), model_outputs(pruned, inputs)
    return sum(kl_to_dense(d, o).item() for d, o in zip(dense, out, strict=True)) / len(inputs)


def allocate_magnitude(
    model: nn.Module,
    allocator: str,
    sparsity: float,
    calibration: Sequence[torch.Tensor] = (),
    progress: bool = False,
    **options: object,
) -> dict[str, int]:
    """Kept weights per compressible layer for magnitude pruning at global ``sparsity`` by ``allocator``;
    ``options`` go to the allocator (e.g. ``min_threshold`` for global, ``generations`` for evopress)."""
    check_sparsity(sparsity)
    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; choose one of: {', '.join(ALLOCATORS)}")
    weights = _layer_weights(model)
    sizes = {k: w.numel() for k, w in weights.items()}
    if allocator == "uniform":
        return alloc.uniform(sizes, sparsity, **options)
    if allocator == "global":
        return alloc.global_magnitude(weights, sparsity, **options)
    if not calibration:
        raise ValueError(f"allocator {allocator!r} needs calibration inputs")
    db = MagnitudeLevels(weights)
    if allocator == "layer-adaptive":
        levels = {k: sorted({kept_count(n, s) for s in LAYER_ADAPTIVE_GRID}) for k, n in sizes.items()}
        bar = tqdm(total=len(sizes), desc="distortion curves", disable=not progress, leave=False)
        curves = distortion_curves(model, compressible_layers(model), levels, db.weight, calibration, bar.update)
        bar.close()
        return alloc.layer_adaptive(sizes, {k: (levels[k], curves[k]) for k in sizes}, sparsity)
    return _evopress(model, sizes, db, sparsity, calibration, progress, **options)


def _evopress(
    model: nn.Module,
    sizes: dict[str, int],
    db: MagnitudeLevels,
    sparsity: float,
    calibration: Sequence[torch.Tensor],
    progress: bool,
    **options: object,
) -> dict[str, int]:
    """EvoPress over kept-weight counts with :func:`staged_kl_fitness` (KL to the dense model)."""
    fitness = staged_kl_fitness(model, calibration, db.weight)
    generations = int(options.get("generations", 50))
    bar = tqdm(total=generations, desc="evopress", disable=not progress, leave=False)
    kept = alloc.evopress(sizes, sparsity, fitness, progress=bar.update, **options)
    bar.close()
    return kept


def magnitude_plan(model: nn.Module, kept: dict[str, int]) -> Plan:
    """Per-layer magnitude rules at the sparsity ``1 - kept / n`` (replays to exactly ``kept`` weights)."""
    sizes = {k: m.weight.numel() for k, m in compressible_layers(model).items()}
    return Plan.from_levels("magnitude", {k: 1.0 - kept[k] / sizes[k] for k in kept})


QUANT_ALLOCATORS = ("uniform", "hawq", "baq", "evopress")  # per-layer bit-widths under an average-bits budget


def calibration_batches(workload: Workload, batches: int = 4) -> list:
    """Whole training batches (inputs and targets) drawn like :func:`calibration_inputs` (same seed)."""
    from trainlab.compress.calibrate import CALIBRATION_SEED
    from trainlab.runtime import batch_generator

    return [workload.make_batch(workload.batch_size, batch_generator(CALIBRATION_SEED, i)) for i in range(batches)]


def allocate_bits(
    model: nn.Module,
    allocator: str,
    bits: float,
    method: str = "rtn",
    calibration: Sequence[torch.Tensor] = (),
    progress: bool = False,
    **options: object,
) -> dict[str, int]:
    """Bit-width per compressible layer with average ``bits`` (weighted by layer size) chosen by ``allocator``;
    ``uniform`` needs an integer ``bits``. ``hawq`` and ``evopress`` (:mod:`.quant.mixed`) pick among
    ``mixed.DEFAULT_CHOICES`` bits, measured with RTN on a uniform grid (``second_order``/``group_size`` in
    ``options``), and reach the average exactly; ``method`` then quantizes each layer at its bit-width. ``baq``
    allocates per column, not per layer: use :func:`trainlab.compress.quant.apply.quantize_model_baq`."""
    if allocator not in QUANT_ALLOCATORS:
        raise ValueError(f"unknown bit allocator {allocator!r}; choose one of: {', '.join(QUANT_ALLOCATORS)}")
    layers = compressible_layers(model)
    if allocator == "uniform":
        if float(bits) != int(bits):
            raise ValueError(f"the uniform allocator needs whole bits, got {bits:g}")
        return dict.fromkeys(layers, int(bits))
    if allocator == "baq":
        raise ValueError("baq allocates bits per input column; use quant.apply.quantize_model_baq")
    from trainlab.compress.quant import mixed

    return mixed.allocate_bits(model, allocator, bits, calibration, progress=progress, **options)
