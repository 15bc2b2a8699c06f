"""From a model and calibration data to per-layer levels: the glue between allocators (pure), level
databases and calibration measurements."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from trainlab.compress import allocate as alloc
from trainlab.compress.calibrate import distortion_curves, kl_to_dense, model_outputs, staged_kl_fitness
from trainlab.compress.plan import Plan, compressible_layers
from trainlab.compress.prune import MagnitudeLevels, check_sparsity, kept_count

ALLOCATORS = ("uniform", "global", "layer-adaptive", "evopress")
LAYER_ADAPTIVE_GRID = tuple(i / 50 for i in range(50))  # sparsity 0, 0.02, ..., 0.98 (spec P17)


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
