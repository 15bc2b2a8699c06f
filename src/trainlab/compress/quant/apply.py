"""Quantize a whole model: every compressible layer (``nn.Linear``; conv kernels flattened to ``(out, -1)``) by
one method at per-layer bit-widths, optionally with second-order (GPTQ-style) error compensation from
calibration Hessians. The result holds the model with the dequantized weights loaded (so it evaluates exactly
like the packed file) and the packed per-layer objects; :func:`save_quantized_model` writes them through
:func:`..pack.save_quantized` and :func:`load_quantized_model` rebuilds the model from the file.

Methods are a dispatch table (:data:`METHODS`): each entry quantizes one 2-D weight at a bit-width, given the
layer's calibration Hessian when second-order compensation is on (or when the method always uses it).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from trainlab.compress.plan import compressible_layers
from trainlab.compress.quant.gptq import collect_hessians, quantize_gptq
from trainlab.compress.quant.grids import UniformGrid, check_bits, quantize_rtn
from trainlab.compress.quant.gwq import collect_gradients, quantize_gwq
from trainlab.compress.quant.nupes import quantize_nupes
from trainlab.compress.quant.pack import dequantized_state, pack_codes, save_quantized, unpack_codes
from trainlab.compress.quant.ptqtp import quantize_ptqtp
from trainlab.compress.quant.vptq import quantize_vptq, settings_for_bits

# (weight (rows, cols), bits, hessian or None, group_size, gradient or None) -> an object with .dequantize() that
# pack can store
Quantizer = Callable[[torch.Tensor, int, "torch.Tensor | None", "int | None", "torch.Tensor | None"], Any]


@dataclass(frozen=True)
class QuantMethod:
    """``second_order``: "optional" (``--second-order`` switches it on), "always" (the method needs the
    Hessian) or "never"; ``bits``: the bit-widths it accepts (None: 2 to 8); ``mixed``: whether per-layer
    bit-widths (mixed-precision allocators) apply."""

    name: str
    quantize: Quantizer
    second_order: str
    description: str
    bits: tuple[int, ...] | None = None
    mixed: bool = True
    needs_gradient: bool = False
    grouped: bool = True  # whether group_size (scales per group of input columns) applies


METHODS: dict[str, QuantMethod] = {}


def register_method(method: QuantMethod) -> QuantMethod:
    if method.name in METHODS:
        raise ValueError(f"quantization method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def _rtn(w: torch.Tensor, bits: int, hessian: torch.Tensor | None, group_size: int | None, gradient=None) -> Any:
    if hessian is None:
        return quantize_rtn(w, bits, group_size=group_size)
    return quantize_gptq(w, hessian, UniformGrid(bits, group_size=group_size))


def _ptqtp(w: torch.Tensor, bits: int, hessian: torch.Tensor | None, group_size: int | None, gradient=None) -> Any:
    return quantize_ptqtp(w, group_size=group_size)


register_method(
    QuantMethod(
        "rtn", _rtn, "optional", "uniform symmetric round-to-nearest per channel/group (GPTQ with --second-order)"
    )
)


def _nupes(w: torch.Tensor, bits: int, hessian: torch.Tensor | None, group_size: int | None, gradient=None) -> Any:
    return quantize_nupes(w, bits, hessian=hessian, second_order=hessian is not None, group_size=group_size)


register_method(
    QuantMethod(
        "nupes",
        _nupes,
        "optional",
        "power-companding grid, exponent searched per layer (by the Hessian-weighted error with --second-order)",
    )
)
register_method(
    QuantMethod(
        "ptqtp",
        _ptqtp,
        "never",
        "two ternary planes with per-row scales (3.2 bits/weight packed)",
        bits=(3,),
        mixed=False,
    )
)


def _vptq(w: torch.Tensor, bits: int, hessian: torch.Tensor | None, group_size: int | None, gradient=None) -> Any:
    if group_size is not None:
        raise ValueError("vptq has one codebook per layer; group_size does not apply")
    k, k_res = settings_for_bits(bits)
    return quantize_vptq(w, hessian, num_centroids=k, num_res_centroids=k_res)


def _gwq(w: torch.Tensor, bits: int, hessian: torch.Tensor | None, group_size: int | None, gradient=None) -> Any:
    return quantize_gwq(w, bits, gradient.reshape(w.shape), hessian=hessian, group_size=group_size)


register_method(
    QuantMethod(
        "vptq",
        _vptq,
        "always",
        "k-means codebook over 4-weight vectors (+ residual codebook above 2 bits), Hessian-weighted, GPTQ-style "
        "block compensation",
        bits=(2, 3, 4),
        mixed=False,
        grouped=False,
    )
)
register_method(
    QuantMethod(
        "gwq",
        _gwq,
        "optional",
        "top 1% weights by gradient magnitude kept in float16, the rest uniform RTN (GPTQ with --second-order)",
        needs_gradient=True,
    )
)


def check_method(method: str) -> QuantMethod:
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[method]


def flat_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(out, -1)`` (conv kernels flattened in ``F.unfold``'s column order)."""
    return module.weight.detach().reshape(module.weight.shape[0], -1)


@dataclass
class QuantizedModel:
    """``model``: a copy with every quantized layer's weight replaced by its dequantized value; ``weights``:
    layer name -> packed object (``QuantizedWeight``, ``TritPlanes``, ...); ``bits``: layer name -> bit-width."""

    model: nn.Module
    weights: dict[str, Any]
    bits: dict[str, int]
    method: str
    second_order: bool
    group_size: int | None
    hessians: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def quantized_weight_count(self) -> int:
        return sum(flat_weight(m).numel() for k, m in compressible_layers(self.model).items() if k in self.weights)


def quantize_model(
    model: nn.Module,
    method: str,
    bits: int | Mapping[str, int],
    *,
    second_order: bool = False,
    calibration: Sequence[torch.Tensor] = (),
    group_size: int | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
    gradients: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
) -> QuantizedModel:
    """Quantize every compressible layer of a copy of ``model`` with ``method`` at ``bits`` (one int, or a
    bit-width per layer name). Second-order compensation (``second_order`` or a method that always uses it)
    needs ``calibration`` inputs (or precomputed ``hessians``); gradient-aware methods (gwq) need ``gradients``
    (layer name -> loss gradient of the weight, e.g. :func:`layer_gradients`). ``model`` itself is not
    modified."""
    spec = check_method(method)
    layers = compressible_layers(model)
    if not layers:
        raise ValueError("the model has no Linear/Conv layer to quantize")
    per_layer = dict.fromkeys(layers, bits) if isinstance(bits, int) else dict(bits)
    if set(per_layer) != set(layers):
        raise ValueError(f"bits must name exactly the layers {sorted(layers)}, got {sorted(per_layer)}")
    for name, b in per_layer.items():
        check_bits(b)
        if spec.bits is not None and b not in spec.bits:
            raise ValueError(f"method {method!r} supports bits {spec.bits}, got {b} for layer {name!r}")
    if second_order and spec.second_order == "never":
        raise ValueError(f"method {method!r} has no second-order error compensation")
    if spec.needs_gradient and (gradients is None or set(gradients) < set(layers)):
        raise ValueError(f"method {method!r} needs the loss gradient of every layer's weight (gradients=)")
    use_hessian = second_order or spec.second_order == "always"
    if use_hessian and hessians is None:
        if not calibration:
            raise ValueError(f"method {method!r} with second-order compensation needs calibration inputs")
        hessians = collect_hessians(model, calibration, layers)
    out = copy.deepcopy(model)
    out_layers = compressible_layers(out)
    packed: dict[str, Any] = {}
    for name, module in layers.items():
        w = flat_weight(module).float()
        h = hessians[name] if use_hessian else None
        g = gradients[name].float() if spec.needs_gradient else None
        q = spec.quantize(w, per_layer[name], h, group_size, g)
        packed[name] = q
        with torch.no_grad():
            out_layers[name].weight.copy_(q.dequantize(torch.float32).reshape(module.weight.shape))
        if progress is not None:
            progress(1)
    return QuantizedModel(out, packed, per_layer, method, use_hessian, group_size, dict(hessians or {}))


def quantize_model_baq(
    model: nn.Module,
    bits: float,
    calibration: Sequence[torch.Tensor],
    *,
    group_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> QuantizedModel:
    """BAQ (:func:`..mixed.baq_quantize`) on every Linear layer: per-column bit-widths averaging ``bits`` in each
    layer, GPTQ with BAQ's asymmetric per-row grid; ``bits`` of the result holds each layer's mean."""
    from trainlab.compress.quant.mixed import baq_quantize

    layers = compressible_layers(model)
    convs = [k for k, m in layers.items() if not isinstance(m, nn.Linear)]
    if convs:
        raise ValueError(f"BAQ supports Linear layers only; got conv layers {convs}")
    if not calibration:
        raise ValueError("BAQ needs calibration inputs")
    hessians = collect_hessians(model, calibration, layers)
    out = copy.deepcopy(model)
    out_layers = compressible_layers(out)
    packed, mean = {}, {}
    for name, module in layers.items():
        res = baq_quantize(flat_weight(module).float(), hessians[name], bits, group_size=group_size)
        packed[name] = res.codes
        mean[name] = round(float(res.bits.double().mean()), 6)
        with torch.no_grad():
            out_layers[name].weight.copy_(res.codes.dequantize().reshape(module.weight.shape))
        if progress is not None:
            progress(1)
    return QuantizedModel(out, packed, mean, "baq", True, group_size, hessians)


BAQ_KEY = "trainlab.baq"  # metadata: layer -> shape and group size of per-column-bit (BAQ) weights


def _baq_tensors(name: str, q: Any) -> dict[str, torch.Tensor]:
    """A :class:`..mixed.ColumnCodes` as plain tensors: per bit-width the packed codes of its columns, the
    per-column bits (uint8) and the per-row float32 ranges (exact, so the file dequantizes identically)."""
    out = {f"{name}.baq_bits": q.bits.to(torch.uint8), f"{name}.baq_low": q.low, f"{name}.baq_high": q.high}
    for b in torch.unique(q.bits).tolist():
        out[f"{name}.baq_codes{b}"] = pack_codes(q.codes[:, q.bits == b].contiguous(), int(b))
    return out


def _baq_weight(state: dict[str, torch.Tensor], name: str, desc: dict) -> torch.Tensor:
    from trainlab.compress.quant.mixed import ColumnCodes

    rows, cols = desc["shape"]
    bits = state.pop(f"{name}.baq_bits").long()
    low, high = state.pop(f"{name}.baq_low"), state.pop(f"{name}.baq_high")
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    for b in torch.unique(bits).tolist():
        mask = bits == b
        packed = state.pop(f"{name}.baq_codes{b}")
        codes[:, mask] = unpack_codes(packed, int(b), rows * int(mask.sum())).reshape(rows, -1)
    return ColumnCodes(codes, low, high, bits, desc["group_size"]).dequantize()


def save_quantized_model(qm: QuantizedModel, path: str | Path, metadata: Mapping[str, str] | None = None) -> int:
    """The packed layers (keyed ``"{layer}.weight"``) plus every other state-dict tensor unchanged; returns bytes.
    Per-column-bit (BAQ) layers are stored as packed plain tensors described in the ``trainlab.baq`` metadata."""
    from trainlab.compress.quant.mixed import ColumnCodes

    weights = {f"{name}.weight": q for name, q in qm.weights.items()}
    plain = {k: v for k, v in qm.model.state_dict().items() if k not in weights}
    columns = {k: weights.pop(k) for k in list(weights) if isinstance(weights[k], ColumnCodes)}
    described = {}
    for key, q in columns.items():
        plain.update(_baq_tensors(key, q))
        described[key] = {"shape": list(q.codes.shape), "group_size": q.group_size}
    meta = {"method": qm.method, "second_order": str(qm.second_order), **(metadata or {})}
    if described:
        meta[BAQ_KEY] = json.dumps(described)
    return save_quantized(path, weights, plain, meta)


def load_quantized_model(path: str | Path, make_model: Callable[[], nn.Module]) -> nn.Module:
    """A fresh ``make_model()`` with the file's dequantized weights (conv kernels reshaped back)."""
    model = make_model()
    own = model.state_dict()
    state = dequantized_state(path)
    with safe_open(str(path), framework="pt") as f:
        described = json.loads((f.metadata() or {}).get(BAQ_KEY, "{}"))
    for key, desc in described.items():
        state[key] = _baq_weight(state, key, desc)
    model.load_state_dict({k: v.reshape(own[k].shape).to(own[k].dtype) for k, v in state.items()})
    return model


def layer_gradients(model: nn.Module, batches: Sequence[Any], loss: Callable[[nn.Module, Any], torch.Tensor]):
    """Mean gradient of ``loss(model, batch)`` over ``batches`` for each compressible layer's weight (Linear only,
    :func:`..gwq.collect_gradients`)."""
    layers = compressible_layers(model)
    convs = [k for k, m in layers.items() if not isinstance(m, nn.Linear)]
    if convs:
        raise ValueError(f"gradient-aware quantization supports Linear layers only; got conv layers {convs}")
    return collect_gradients(model, batches, loss, layers)


def layer_loss(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: with ``H = 2 X^T X / n`` twice the mean squared output error of the layer."""
    d = (weight.double() - approx.double()).reshape(weight.shape[0], -1)
    return float(((d @ hessian.double()) * d).sum())


def nominal_bits_per_weight(qm: QuantizedModel, nominal: Callable[[Any], int]) -> float:
    """Stored bits per quantized weight (codes + scales + codebooks, as counted by ``nominal``)."""
    return 8 * sum(nominal(q) for q in qm.weights.values()) / qm.quantized_weight_count()
