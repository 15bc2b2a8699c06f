"""Whole-model quantization shorthands over :func:`trainlab.compress.compress`: :func:`quantize_model` quantizes
every compressible layer (conv kernels flattened to ``(out, -1)``) with one registered quantizer; the result holds
the model with the dequantized weights loaded (so it evaluates exactly like the packed file) and the packed
per-layer objects; :func:`save_quantized_model` writes them through :func:`trainlab.compress.storage.save` and
:func:`load_quantized_model` rebuilds the model from the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainlab.compress.export import load_model, save_model
from trainlab.compress.front_door import CompressionResult, compress
from trainlab.compress.plan import Plan, compressible_layers
from trainlab.compress.quant.gwq import collect_gradients
from trainlab.compress.registry import get_compressor
from trainlab.layer_weights import is_transposed_linear, weight_matrix

QuantizedModel = CompressionResult  # what quantize_model returns (and save_quantized_model takes)


def flat_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(out, -1)`` (conv kernels flattened in ``F.unfold``'s column order, a Hugging Face
    Conv1D's transposed)."""
    return weight_matrix(module).detach()


def quantize_model(
    model: nn.Module,
    method: str,
    bits: float | Mapping[str, float],
    *,
    second_order: bool = False,
    sequential: bool = False,
    calibration: Sequence[Any] = (),
    group_size: int | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
    gradients: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
    runtime: str | None = "auto",
) -> CompressionResult:
    """:func:`~trainlab.compress.compress` with one quantizer ``method`` on every compressible layer at ``bits``
    (one bit-width, or one per layer name); ``runtime`` as in ``compress``. ``model`` itself is not modified."""
    if get_compressor(method).kind != "quantizer":
        raise ValueError(f"{method!r} is not a quantizer; quantize_model takes one of the registered quantizers")
    if isinstance(bits, Mapping):
        layers = compressible_layers(model)
        if set(bits) != set(layers):
            raise ValueError(f"bits must name exactly the layers {sorted(layers)}, got {sorted(bits)}")
        plan = Plan.from_levels(method, dict(bits))
    else:
        plan = Plan([(".*", method, bits)])
    return compress(
        model,
        plan,
        calibration=calibration,
        second_order=second_order,
        sequential=sequential,
        group_size=group_size,
        hessians=hessians,
        gradients=gradients,
        progress=progress,
        runtime=runtime,
    )


def save_quantized_model(qm: QuantizedModel, path: str | Path, metadata: Mapping[str, str] | None = None) -> int:
    """The packed layers, pruned layers encoded sparse and every other tensor unchanged, tied weights once
    (:func:`trainlab.compress.export.save_model`), with the method in the metadata; returns the file size."""
    meta = {"method": qm.method, "second_order": str(qm.second_order), **(metadata or {})}
    return save_model(qm.model, path, qm.weights, metadata=meta)


def load_quantized_model(
    path: str | Path, make_model: Callable[[], nn.Module], *, runtime: str | None = "auto"
) -> nn.Module:
    """A fresh ``make_model()`` with the file's weights (conv kernels reshaped back), masks re-armed and ties
    restored, quantized ``nn.Linear`` layers as ``runtime`` says (:func:`trainlab.compress.export.load_model`)."""
    return load_model(path, make_model, runtime=runtime)


def layer_gradients(model: nn.Module, batches: Sequence[Any], loss: Callable[[nn.Module, Any], torch.Tensor]):
    """Mean gradient of ``loss(model, batch)`` over ``batches`` for each compressible layer's weight (Linear only,
    :func:`..gwq.collect_gradients`)."""
    layers = compressible_layers(model)
    convs = [k for k, m in layers.items() if not (isinstance(m, nn.Linear) or is_transposed_linear(m))]
    if convs:
        raise ValueError(
            f"gradient-aware quantization supports Linear and Conv1D layers only; got convolutions {convs}"
        )
    return collect_gradients(model, batches, loss, layers)


def layer_loss(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: with ``H = 2 X^T X / n`` twice the mean squared output error of the layer."""
    d = (weight.double() - approx.double()).reshape(weight.shape[0], -1)
    return float(((d @ hessian.double()) * d).sum())


def nominal_bits_per_weight(qm: QuantizedModel, nominal: Callable[[Any], int]) -> float:
    """Stored bits per quantized weight (codes + scales + codebooks, as counted by ``nominal``)."""
    return 8 * sum(nominal(q) for q in qm.weights.values()) / qm.quantized_weight_count()
