"""GWQ ("Gradient-Aware Weight Quantization"): keep the most gradient-salient weights in float16, quantize the
rest.

Per layer, the ``ceil(fraction * numel)`` weights with the largest ``|dL/dW|`` (gradients of the loss on
calibration data, :func:`collect_gradients`; ties broken by position) are outliers: their values are kept in
float16 in a sparse side list (flat int32 indices + values), and they are set to 0 before the grid is fitted,
so the scales are computed without them (0 is inside every grid's range, so zeros never widen it). The rest
is quantized by round-to-nearest on a :class:`..grids.UniformGrid`:

    W_hat = Q(W * (1 - M)) * (1 - M) + W_fp16 * M

or, given a calibration Hessian, with GPTQ error compensation (:func:`..gptq.gptq`), where, as in SpQR, an
outlier keeps the value it has been updated to when its column is reached (rounded to float16, that rounding
error compensated like any other), so in that mode the stored outliers are the compensated values, not the
original weights; scales are fitted without the outliers there too.

Defaults follow the paper's description (top 1 % per layer; unconfirmed whether per layer or per row —
per layer here). Storage: the uniform grid's packed codes and scales, plus 4 bytes (index) + 2 bytes (value)
per outlier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainlab.compress.formats import float16_part, format_of, register_format
from trainlab.compress.quant.gptq import BLOCK_SIZE, DAMP, gptq
from trainlab.compress.quant.grids import GridParams, QuantizedWeight, UniformGrid, check_weight
from trainlab.compress.registry import Hyperparameter, register_compressor
from trainlab.runtime import evaluating

FRACTION = 0.01
VALUE_DTYPES = (torch.float16, None)


@register_format("outliers")
@dataclass(frozen=True)
class OutlierQuantizedWeight:
    """``base``: the grid-quantized weight (0 at the outliers); ``indices``: int32 flat (row-major) positions of
    the outliers, increasing; ``values``: their values (float16-representable when stored). Stored as the base's
    own tensors plus ``outlier_idx`` (int32) and ``outlier_val`` (float16); the base's kind and metadata are
    nested in this one's."""

    base: QuantizedWeight
    indices: torch.Tensor
    values: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight with the outliers put back; ``dtype`` as for the base."""
        w = self.base.dequantize(dtype)
        flat = w.flatten().clone()
        flat[self.indices.long()] = self.values.to(w.dtype)
        return flat.reshape(w.shape)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        if self.indices.dtype != torch.int32 or self.indices.numel() != self.values.numel():
            raise ValueError("indices must be int32, one per value")
        return {
            **self.base.to_tensors(prefix),
            f"{prefix}outlier_idx": self.indices.detach().contiguous(),
            f"{prefix}outlier_val": float16_part("values", self.values),
        }

    def metadata(self) -> dict[str, Any]:
        return {"base": {"kind": self.base.kind, **self.base.metadata()}}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], prefix: str, metadata: Mapping[str, Any]
    ) -> OutlierQuantizedWeight:
        base_meta = metadata["base"]
        base = format_of(base_meta["kind"]).from_tensors(tensors, prefix, base_meta)
        return cls(base, tensors[f"{prefix}outlier_idx"], tensors[f"{prefix}outlier_val"])

    def nbytes(self) -> int:
        """The base grid's bytes plus 4 (index) + 2 (value) per outlier."""
        return self.base.nbytes() + 6 * self.indices.numel()


def outlier_count(numel: int, fraction: float) -> int:
    """``ceil(fraction * numel)``, ignoring floating-point noise below 1e-9 (``0.07 * 100`` is 7, not 8)."""
    return min(numel, math.ceil(round(fraction * numel, 9)))


def select_outliers(saliency: torch.Tensor, fraction: float = FRACTION) -> torch.Tensor:
    """Flat indices (int32, increasing) of the ``ceil(fraction * numel)`` largest entries of ``|saliency|``."""
    if not isinstance(fraction, int | float) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    flat = saliency.detach().abs().flatten().double()
    k = outlier_count(flat.numel(), fraction)
    # stable descending sort: equal saliencies keep their order (deterministic ties)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.sort(order).values.to(torch.int32)


def quantize_gwq(
    weight: torch.Tensor,
    bits: int,
    gradient: torch.Tensor,
    *,
    fraction: float = FRACTION,
    hessian: torch.Tensor | None = None,
    symmetric: bool = True,
    group_size: int | None = None,
    scale_dtype: torch.dtype | None = torch.float16,
    value_dtype: torch.dtype | None = torch.float16,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
) -> OutlierQuantizedWeight:
    """Keep the top ``fraction`` of ``weight`` by ``|gradient|`` (same shape) as outliers, quantize the rest
    (RTN, or GPTQ given ``hessian``). ``value_dtype=None`` keeps the outliers' values exactly."""
    check_weight(weight)
    if not isinstance(gradient, torch.Tensor) or gradient.shape != weight.shape:
        got = tuple(gradient.shape) if isinstance(gradient, torch.Tensor) else type(gradient).__name__
        raise ValueError(f"gradient must be a tensor of the weight's shape {tuple(weight.shape)}, got {got}")
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be torch.float16 or None, got {value_dtype!r}")
    grid = UniformGrid(bits, symmetric, group_size, scale_dtype)
    indices = select_outliers(gradient, fraction)
    w = weight.detach()
    values = w.flatten()[indices.long()].clone()
    if value_dtype is not None:
        if not torch.isfinite(values.to(value_dtype)).all():
            raise ValueError(f"an outlier exceeds the range of {value_dtype}; use value_dtype=None")
        values = values.to(value_dtype).to(w.dtype)
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[indices.long()] = True
    mask = mask.reshape(w.shape)
    if hessian is None:
        return OutlierQuantizedWeight(grid.quantize(torch.where(mask, 0, w)), indices, values)
    wrapped = _OutlierGrid(grid, mask, value_dtype)
    result = gptq(w, hessian, wrapped, damp=damp, block_size=block_size)
    rest = torch.where(mask, 0, result.weight)
    base = grid.encode(rest, GridParams.cat(result.params))
    return OutlierQuantizedWeight(base, indices, result.weight.flatten()[indices.long()].clone())


class _OutlierGrid:
    """A grid for :func:`..gptq.gptq` that fits scales without the outliers and keeps them (rounded to
    ``value_dtype``) as they are when their column is reached; relies on gptq fitting a group right before
    quantizing its first column and quantizing columns once each, left to right."""

    def __init__(self, grid: UniformGrid, mask: torch.Tensor, value_dtype: torch.dtype | None) -> None:
        self.grid, self.mask, self.value_dtype = grid, mask, value_dtype
        self.group_size = grid.group_size
        self.column = 0

    def fit(self, slab: torch.Tensor) -> GridParams:
        m = self.mask[:, self.column : self.column + slab.shape[1]]
        return self.grid.fit(torch.where(m, 0, slab))

    def quantize_column(self, column: torch.Tensor, params: GridParams) -> torch.Tensor:
        m = self.mask[:, self.column : self.column + 1]
        self.column += 1
        kept = column if self.value_dtype is None else column.to(self.value_dtype).to(column.dtype)
        return torch.where(m, kept, self.grid.quantize_column(column, params))


def collect_gradients(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    layers: Mapping[str, nn.Module] | None = None,
) -> dict[str, torch.Tensor]:
    """Gradient of the mean of ``loss_fn(model, batch)`` over ``batches`` with respect to the weight of each
    ``nn.Linear`` (all of ``model``'s by default, or those in ``layers``), float64, keyed by module name. The
    model runs in eval mode; the parameters' ``.grad`` are left as they were."""
    if layers is None:
        layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, module in layers.items():
        if not isinstance(module, nn.Linear):
            raise ValueError(f"layers[{name!r}] must be an nn.Linear, got {type(module).__name__}")
    params = {name: m.weight for name, m in layers.items()}
    sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    count = 0
    with evaluating(model), torch.enable_grad():
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, g in zip(params, grads, strict=True):
                if g is not None:
                    sums[name] += g.detach().double()
            count += 1
    if count == 0:
        raise ValueError("batches must hold at least one calibration batch")
    return {name: s / count for name, s in sums.items()}


@register_compressor(
    "gwq",
    paper="GWQ: Gradient-Aware Weight Quantization for Large Language Models",
    summary="top 1% weights by loss-gradient magnitude kept in float16, the rest uniform RTN (GPTQ with second order)",
    kind="quantizer",
    level="bits",
    needs=("calibration", "gradient"),
    second_order="optional",
    grouped=True,
    hyperparameters={"fraction": Hyperparameter(FRACTION, low=0.0, high=1.0)},
)
def gwq(
    weight: torch.Tensor,
    *,
    bits: int,
    gradient: torch.Tensor,
    group_size: int | None = None,
    hessian: torch.Tensor | None = None,
    fraction: float = FRACTION,
) -> OutlierQuantizedWeight:
    gradient = gradient.reshape(weight.shape)
    return quantize_gwq(weight, bits, gradient, fraction=fraction, hessian=hessian, group_size=group_size)
