"""Quantized layers that run on PyTorch's low-bit CPU kernels instead of dequantize-then-matmul.

:class:`QuantizedLinear` holds a packed weight and picks, once at construction, how its forward runs
(``.kernel``, with ``.reason`` saying why):

* ``int4``: ``aten._weight_int4pack_mm_for_cpu`` for uniform grids of at most 4 bits. The kernel computes
  ``(q - 8) * scale + zero`` per group, so a trainlab grid ``(q - z) * s`` maps to ``scale = s`` and
  ``zero = (8 - z) * s``. It needs output rows divisible by 16 and a kernel group of 32, 64, 128 or 256 that
  divides both the input size and trainlab's group (a per-channel grid repeats its scale over kernel groups).
  Where every ``q - z + 8`` lies in [0, 15] (symmetric grids, asymmetric grids up to 3 bits) the codes are moved
  onto the kernel's zero point instead, so the bfloat16 zero term is exactly 0 and adds no rounding.
  Activations, scales and zeros run in bfloat16 (the only fast dtype of this kernel on CPUs; float32 and float16
  take its slow reference path), the output is cast back to the input's dtype.
* ``int8``: ``aten._weight_int8pack_mm`` for per-channel grids whose ``q - z`` fits int8 (symmetric 5-8 bits),
  bfloat16 activations and scales.
* ``int8-dynamic`` (``mode="dynamic"`` only, never chosen by ``auto``): ``torch._int_mm`` (int8 x int8 ->
  int32) for per-channel grids whose ``q - z`` fits int8, on activations quantized at each call to symmetric int8
  with one scale per row (per token). The weight is exact; the activations carry up to half an int8 step of
  their row's largest magnitude of error, far more than bfloat16 rounding, so this is an opt-in speed mode
  (about 2x float32's speed on MiniLM at 32 tokens, see docs/compression.md).
* ``cached``: the weight dequantized once and kept in the layer's dtype (memory for speed: 4 bytes a weight in
  float32). ``auto`` takes it for weights off the CPU (the two kernels above are CPU kernels) and for float64
  layers (the kernels would round a float64 model's activations to bfloat16).
* ``dequantize``: the weight dequantized at every call (trainlab's packed path; least memory, slowest).

``mode="auto"`` takes a kernel where the format and shape allow it and ``dequantize`` otherwise. Both kernels
round activations to bfloat16, so outputs equal the dequantized reference to bfloat16 precision, not float32's;
``mode="cache"`` keeps float32 results. :func:`runtime_model` swaps every quantized ``nn.Linear`` of a model for
this module (:func:`trainlab.compress.compress` and :func:`~.export.load_model` do it by default) and
:func:`float_model` turns them back into ``nn.Linear`` layers holding the dequantized weights (masks re-armed,
ties restored). A runtime model is for inference: its kernel tensors are not in its ``state_dict`` (they depend on
the kernel's layout); each module keeps its packed weight (``.packed``), which :func:`~.export.save_model` writes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from trainlab.compress.formats import Packed
from trainlab.compress.quant.grids import QuantizedWeight, expand_groups
from trainlab.compress.sparse_formats import MaskedWeight

MODES = ("auto", "kernel", "dynamic", "cache", "dequantize")
RUNTIMES = (*MODES, "float")  # what compress(runtime=) and load_model(runtime=) take; "float" (or None): nn.Linear


def check_runtime(runtime: str | None) -> str:
    """``runtime`` as one of :data:`RUNTIMES` (None is ``"float"``); ValueError naming the allowed values."""
    if runtime is None:
        return "float"
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)} or None (float layers), got {runtime!r}")
    return runtime


KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts, largest first
INT4_ROWS = 16  # _convert_weight_to_int4pack_for_cpu needs output rows divisible by this
# _weight_int8pack_mm reads each row in blocks of 16 inputs: on other input sizes torch 2.13's CPU kernel
# returns garbage or crashes the process (measured: K = 2, 4, 8, 12, 24, 36, 40, 44, 56, 100 all segfault)
INT8_COLS = 16
KERNEL_DTYPE = torch.bfloat16


def _int4_group(w: QuantizedWeight) -> tuple[int | None, str]:
    """The kernel group size for ``w`` (None when the int4 kernel cannot run it) and why."""
    rows, cols = w.shape
    if w.bits > 4:
        return None, f"{w.bits}-bit codes do not fit the int4 kernel"
    if rows % INT4_ROWS:
        return None, f"output size {rows} is not divisible by {INT4_ROWS} (int4 kernel)"
    if w.group_size is not None and cols % w.group_size:
        return None, f"input size {cols} is not a multiple of group size {w.group_size} (int4 kernel)"
    span = cols if w.group_size is None else w.group_size
    for g in KERNEL_GROUPS:
        if span % g == 0 and cols % g == 0:
            return g, f"int4 kernel, group {g}"
    return None, f"group of {span} inputs is not a multiple of 32, 64, 128 or 256 (int4 kernel)"


def _int8_fits(w: QuantizedWeight) -> tuple[bool, str]:
    """Whether ``_weight_int8pack_mm`` runs ``w``, and why (not)."""
    cols = w.shape[1]
    if cols % INT8_COLS:
        return False, f"input size {cols} is not divisible by {INT8_COLS} (int8 kernel)"
    return _int8_codes(w)


def _int8_codes(w: QuantizedWeight) -> tuple[bool, str]:
    """Whether ``w`` is per channel with codes minus zero points in int8, and why (not)."""
    cols = w.shape[1]
    if w.group_size is not None and w.group_size < cols:
        return False, f"groups of {w.group_size} inputs: the int8 kernel has one scale per output channel"
    low, high = (w.codes.int() - w.zero.int()).aminmax() if w.codes.numel() else (torch.tensor(0), torch.tensor(0))
    if low < -128 or high > 127:
        return False, "codes minus zero points leave the int8 range (asymmetric 8-bit grid)"
    return True, "int8 kernel, per-channel scales"


def _grid(packed: Packed) -> Packed:
    """A pruned uniform grid (:class:`~.sparse_formats.MaskedWeight` over a :class:`QuantizedWeight`) as a plain
    grid whose pruned positions hold their group's zero point, so they dequantize to exactly 0; others as given."""
    if not (isinstance(packed, MaskedWeight) and isinstance(packed.base, QuantizedWeight)):
        return packed
    base = packed.base
    zero = expand_groups(base.zero, base.shape[1], base.group_size)
    return replace(base, codes=torch.where(packed.mask.reshape(base.shape), base.codes, zero))


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` a packed weight (``(out_features, in_features)``), run as ``.kernel`` says.

    ``packed``: any packed format (:mod:`.formats`); the low-bit kernels take uniform grids
    (:class:`~.quant.grids.QuantizedWeight`). ``mode``: ``auto`` (a kernel when possible, the cache for weights
    off the CPU, else dequantize at every call), ``kernel`` (ValueError naming the reason when no kernel applies),
    ``cache`` (dequantize once) or ``dequantize``. ``dtype``: the dtype of the cache and of :meth:`to_linear`
    (default float32). ``.packed`` keeps the packed weight (what saving writes and :meth:`to_linear` rebuilds
    from; it costs the packed size again next to a kernel's own copy). ``.tied``: other parameter names of the
    model that shared this layer's weight (set by :func:`runtime_model`, restored by :func:`float_model`). The
    module is an inference module: its weight takes no gradient."""

    def __init__(
        self,
        packed: Packed,
        bias: torch.Tensor | None = None,
        *,
        mode: str = "auto",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(packed, Packed):
            raise TypeError(f"packed must be a packed weight format (see trainlab.compress.formats), got {packed!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.packed = packed
        self.dtype = dtype
        self.tied: tuple[str, ...] = ()
        self.trainable = (False, False)  # the requires_grad flags to_linear gives the weight and the bias
        grid = _grid(packed)
        shape = grid.shape if isinstance(grid, QuantizedWeight) else packed.dequantize(torch.float32).shape
        self.out_features, self.in_features = shape[0], math.prod(shape[1:])
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel, self.reason = self._choose(mode)

    def _choose(self, mode: str) -> tuple[str, str]:
        if mode == "cache":
            self.register_buffer("dense", self._dense(), persistent=False)
            return "cached", f"mode='cache': dequantized once, {self.dtype}"
        if mode == "dequantize":
            return "dequantize", "mode='dequantize'"
        w = _grid(self.packed)
        if mode == "dynamic":
            return self._dynamic(w)
        if not isinstance(w, QuantizedWeight):
            reason = f"{type(w).__name__} has no low-bit kernel (uniform grids only)"
        elif self.dtype == torch.float64:
            reason = "float64 layer: the int4/int8 kernels compute in bfloat16"
            if mode == "auto":
                self.register_buffer("dense", self._dense(), persistent=False)
                return "cached", f"{reason}; dequantized once, float64"
        elif w.codes.device.type != "cpu":
            reason = f"weight on {w.codes.device.type}: the int4/int8 kernels used here are CPU kernels"
            if mode == "auto":
                self.register_buffer("dense", self._dense(), persistent=False)
                return "cached", f"{reason}; dequantized once, {self.dtype}"
        else:
            group, reason = _int4_group(w)
            if group is not None:
                self._pack_int4(w, group)
                return "int4", reason
            fits, why = _int8_fits(w)
            if fits:
                self._pack_int8(w)
                return "int8", why
            reason = f"{reason}; {why}"
        if mode == "kernel":
            raise ValueError(f"no low-bit kernel runs this weight: {reason}")
        return "dequantize", f"no kernel: {reason}"

    def _dynamic(self, w: Packed) -> tuple[str, str]:
        if not isinstance(w, QuantizedWeight):
            raise ValueError(f"mode='dynamic' needs a uniform grid, got {type(w).__name__}")
        if w.codes.device.type != "cpu":
            raise ValueError(f"mode='dynamic' runs the CPU int8 matmul; the weight is on {w.codes.device.type}")
        fits, why = _int8_codes(w)  # torch._int_mm takes any input size
        if not fits:
            raise ValueError(f"mode='dynamic' needs per-channel int8 codes: {why}")
        weight = (w.codes.to(torch.int16) - w.zero.to(torch.int16)).to(torch.int8)
        self.register_buffer("int8_weight_t", weight.T, persistent=False)  # (in, out) view: _int_mm's layout
        self.register_buffer("int8_scale", w.scale[:, 0].float(), persistent=False)
        return "int8-dynamic", "mode='dynamic': int8 weights, activations quantized to int8 per row at each call"

    def _dense(self) -> torch.Tensor:
        return self.packed.dequantize(torch.float32).reshape(self.out_features, self.in_features).to(self.dtype)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` holding the dequantized weight (in ``dtype``) and the bias, its pruning mask re-armed
        (a :class:`~.sparse_formats.MaskedWeight`, with its N:M pattern)."""
        from trainlab.compress.masks import apply_mask

        weight = self._dense()
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device,
                          dtype=self.dtype)  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        layer.weight.requires_grad_(self.trainable[0])
        if self.bias is not None:
            layer.bias.requires_grad_(self.trainable[1])
        layer.train(self.training)
        if isinstance(self.packed, MaskedWeight):
            apply_mask(layer, self.packed.mask.reshape(weight.shape), self.packed.pattern)
        return layer

    def _pack_int4(self, w: QuantizedWeight, group: int) -> None:
        rows, cols = w.shape
        span = cols if w.group_size is None else w.group_size
        repeat = span // group  # kernel groups per trainlab group
        scale = w.scale.float().repeat_interleave(repeat, dim=1)[:, : cols // group]
        zero = w.zero.float().repeat_interleave(repeat, dim=1)[:, : cols // group]
        shifted = w.codes.int() - expand_groups(w.zero, cols, w.group_size).int() + 8
        if shifted.min() >= 0 and shifted.max() <= 15:
            # codes moved onto the kernel's zero point 8: the bfloat16 zero term is exactly 0 (no cancellation)
            codes, zero = shifted, torch.zeros_like(scale)
        else:
            codes, zero = w.codes.int(), (8 - zero) * scale
        qsz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
        self.group = group
        self.register_buffer("int4_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), False)
        self.register_buffer("scale_and_zero", qsz, persistent=False)

    def _pack_int8(self, w: QuantizedWeight) -> None:
        weight = (w.codes.to(torch.int16) - w.zero.to(torch.int16)).to(torch.int8).contiguous()
        self.register_buffer("int8_weight", weight, persistent=False)
        self.register_buffer("int8_scale", w.scale[:, 0].to(KERNEL_DTYPE).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "cached":
            return F.linear(x, self.dense.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.kernel == "dequantize":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.packed.dequantize(x.dtype).reshape(self.out_features, -1), bias)
        if x.device.type != "cpu":
            raise RuntimeError(
                f"QuantizedLinear's {self.kernel} kernel runs on the CPU, the input is on {x.device.type}: compress or "
                "load the model on that device (weights off the CPU take the dequantize-once cache), or use "
                "runtime='float'"
            )
        if self.kernel == "int8-dynamic":
            return self._forward_dynamic(x)
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()  # the kernels need contiguous rows
        if self.kernel == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.int4_weight, self.group, self.scale_and_zero)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.int8_weight, self.int8_scale)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _forward_dynamic(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        step = flat.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
        codes = torch.round(flat / step).to(torch.int8)
        y = torch._int_mm(codes, self.int8_weight_t).float().mul_(step).mul_(self.int8_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def _swap(model: nn.Module, weights: Mapping[str, Packed], mode: str) -> nn.Module:
    """Replace, in place, the ``nn.Linear`` layers of ``model`` named in ``weights`` by QuantizedLinear."""
    modules = dict(model.named_modules())
    unknown = sorted(set(weights) - set(modules))
    if unknown:
        raise ValueError(f"weights names modules the model does not have: {unknown}")
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, packed in weights.items():
        layer = modules[name]
        if not isinstance(layer, nn.Linear) or not name:
            continue
        parent, _, child = name.rpartition(".")
        new = QuantizedLinear(packed, layer.bias, mode=mode, dtype=layer.weight.dtype)
        new.tied = tuple(k for k, p in params.items() if p is layer.weight and k != f"{name}.weight")
        new.trainable = (layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad)
        new.train(layer.training)
        setattr(modules[parent], child, new)
    return model


def runtime_model(model: nn.Module, weights: Mapping[str, Packed], *, mode: str = "auto") -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers named in ``weights`` (layer name -> packed weight, e.g. a
    compression result's ``weights``) are :class:`QuantizedLinear` modules; other layers (convolutions) stay as
    they are. ``model`` is not modified. A layer whose weight another module shares (an output layer tied to the
    embeddings) runs on the kernel too; the other module keeps the dequantized weight, and :func:`float_model`
    ties them again."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return _swap(copy.deepcopy(model), weights, mode)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Name -> module for every :class:`QuantizedLinear` of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def float_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose :class:`QuantizedLinear` modules are ``nn.Linear`` layers holding their
    dequantized weights (:meth:`QuantizedLinear.to_linear`), with the weights they shared tied again; ``model``
    itself when it has none (nothing to convert). ``model`` is not modified."""
    if not quantized_layers(model):
        return model
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    for name, q in quantized_layers(out).items():
        parent, _, child = name.rpartition(".")
        layer = q.to_linear()
        setattr(modules[parent], child, layer)
        for key in q.tied:
            owner, _, attr = key.rpartition(".")
            holder = out.get_submodule(owner) if owner else out
            setattr(holder, attr, layer.weight)
    return out
