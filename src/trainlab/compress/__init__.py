"""Compression: plans (what each layer gets), allocators (how much per layer), compressors, masks,
calibration, recovery and export.

The front door: ``plan = allocate_plan("hawq", model, bits=3, calibration=batches)`` then
``result = compress(model, plan, calibration=batches)``; ``compressor_names()`` / ``get_compressor(name)`` and
``allocator_names()`` / ``get_allocator(name, budget)`` read the registry of methods."""

from trainlab.compress.front_door import CompressionReport, CompressionResult, LayerReport, allocate_plan, compress
from trainlab.compress.plan import Plan, Rule, compressible_layers
from trainlab.compress.registry import (
    AllocatorSpec,
    CompressorSpec,
    allocator_names,
    allocator_specs,
    compressor_names,
    get_allocator,
    get_compressor,
)

__all__ = [
    "AllocatorSpec",
    "CompressionReport",
    "CompressionResult",
    "CompressorSpec",
    "LayerReport",
    "Plan",
    "Rule",
    "allocate_plan",
    "allocator_names",
    "allocator_specs",
    "compress",
    "compressible_layers",
    "compressor_names",
    "get_allocator",
    "get_compressor",
]
