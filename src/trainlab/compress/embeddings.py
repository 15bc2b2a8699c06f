"""Quantize a model's embedding tables, one grid per row (each token's vector gets its own scale).

Plans act on Linear and Conv layers; the embedding tables of a language model are often half its size (MiniLM's
word embeddings hold 11.7M of its 22.7M parameters), so a 4-bit export that leaves them dense stays near 60% of the
dense file. :func:`quantize_embeddings` takes a :class:`~.front_door.CompressionResult` and quantizes its
``nn.Embedding`` weights with a quantizer from the registry, per row: a row is one token's vector, looked up
alone, so per-row scales keep rare tokens' small vectors from sharing a scale with frequent tokens' large ones.
The packed rows join ``result.weights``, so :func:`~.export.save_model` stores them packed like any layer.
A weight tied to a quantized Linear layer (a GPT-2 style head) is left as it is, and said so in the report.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from trainlab.compress.front_door import CompressionReport, CompressionResult, LayerReport
from trainlab.compress.registry import get_compressor


def quantize_embeddings(result: CompressionResult, bits: int, compressor: str = "rtn") -> CompressionResult:
    """A new result whose model's ``nn.Embedding`` weights are quantized per row at ``bits`` with ``compressor``
    (a uniform-grid quantizer that needs no calibration); ``result`` itself is not modified."""
    spec = get_compressor(compressor)
    if spec.kind != "quantizer" or spec.needs:
        raise ValueError(f"compressor {compressor!r} must be a quantizer that needs no calibration (e.g. 'rtn')")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8] for embeddings, got {bits!r}")
    model = copy.deepcopy(result.float_model())  # the tables and the layers' weights, all float
    weights, bit_widths = dict(result.weights), dict(result.bits)
    layers, dense = dict(result.report.layers), dict(result.report.dense)
    taken = {id(dict(model.named_modules())[n].weight) for n in result.weights}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding):
            continue
        if id(module.weight) in taken:
            dense[name] = "tied to a quantized layer: stored once, with that layer's codes"
            continue
        w = module.weight.detach()
        if not torch.isfinite(w).all():
            raise ValueError(f"embedding {name!r} has NaN or inf weights; quantizing them would give garbage")
        q = spec.function(w.float(), bits=bits)
        with torch.no_grad():
            module.weight.copy_(q.dequantize(torch.float32).to(w.dtype))
        weights[name], bit_widths[name] = q, bits
        taken.add(id(module.weight))
        dense.pop(name, None)
        layers[name] = LayerReport(None, (compressor, bits), float((module.weight == 0).float().mean()), bits,
                                   "embedding, one grid per row")  # fmt: skip
    counts = {n: dict(model.named_modules())[n].weight.numel() for n in bit_widths}
    mean_bits = sum(bit_widths[n] * c for n, c in counts.items()) / sum(counts.values()) if counts else None
    report = CompressionReport(layers, dense, result.report.sparsity, mean_bits)
    if result.runtime != "float":  # the Linear layers back on the runtime result's kernels
        from trainlab.compress.front_door import _masked
        from trainlab.compress.quantized_linear import _swap

        model = _swap(model, _masked(model, result.weights), result.runtime)
    return dataclasses.replace(result, model=model, weights=weights, bits=bit_widths, report=report)
