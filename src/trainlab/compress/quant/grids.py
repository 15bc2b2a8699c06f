"""Uniform affine round-to-nearest grids, per output channel or per group of inputs, 2 to 8 bits.

A weight ``w`` of shape ``(rows, cols)`` (rows = output channels; flatten conv kernels to ``(out, -1)``) gets,
for each row and each group of ``group_size`` consecutive columns (the whole row when ``group_size`` is None;
a shorter last group when ``cols`` is not a multiple), a scale ``s > 0`` and an integer zero point ``z``:

    code = clamp(round(w / s) + z, 0, 2**bits - 1),        w_hat = (code - z) * s

* symmetric (GPTQ's convention, all ``2**bits`` levels used): ``s = 2 max|w| / (2**bits - 1)``,
  ``z = 2**(bits-1)``; levels run from ``-2**(bits-1) s`` to ``(2**(bits-1) - 1) s``;
* asymmetric: the range ``[min(w, 0), max(w, 0)]`` (0 always inside, as in GPTQ) gives
  ``s = (max - min) / (2**bits - 1)`` and ``z = round(-min / s)``.

Both grids hold 0 exactly (``z`` is an integer) and every ``w`` in the fitted range is within ``s / 2`` of
its ``w_hat``. Scales are stored in float16 (``scale_dtype``): they are rounded *up* to the next float16
before the codes are computed, so the grid used for rounding is exactly the stored one and the half-step
bound still holds. ``scale_dtype=None`` keeps exact scales. An all-zero row/group gets scale 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainlab.compress.bits import pack_codes, packed_bytes, unpack_codes
from trainlab.compress.formats import default_dtype, float16_part, register_format

MIN_BITS, MAX_BITS = 2, 8
SCALE_DTYPES = (torch.float16, None)


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def check_group_size(group_size: int | None) -> int | None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(
            f"group_size must be None (one group per output channel) or an integer >= 1, got {group_size!r}"
        )
    return group_size


def check_weight(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        is_tensor = isinstance(weight, torch.Tensor)
        got = f"shape {tuple(weight.shape)} {weight.dtype}" if is_tensor else type(weight).__name__
        raise ValueError(f"{name} must be a 2-D floating tensor (rows = output channels), got {got}")
    return weight


def num_groups(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-cols // group_size)


def expand_groups(t: torch.Tensor, cols: int, group_size: int | None) -> torch.Tensor:
    """``(rows, groups)`` per-group values broadcast to ``(rows, cols)``."""
    if group_size is None:
        return t[:, :1].expand(t.shape[0], cols)
    return t.repeat_interleave(group_size, dim=1)[:, :cols]


def round_scale_up(scale: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The smallest value of ``dtype`` that is >= ``scale``, returned in ``scale``'s dtype."""
    if dtype is None:
        return scale
    low = scale.to(dtype)
    low = torch.where(low.to(scale.dtype) < scale, torch.nextafter(low, torch.full_like(low, float("inf"))), low)
    if not torch.isfinite(low).all():
        raise ValueError(f"a scale exceeds the range of {dtype} (max {torch.finfo(dtype).max}); use scale_dtype=None")
    return low.to(scale.dtype)


def sqnr_db(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||w||^2 / ||w - w_hat||^2)`` in dB."""
    w, e = weight.double(), (weight.double() - approx.double())
    return float(10 * torch.log10(w.square().sum() / e.square().sum()))


@dataclass(frozen=True)
class GridParams:
    """Per-row, per-group ``scale`` and integer-valued ``zero`` (both ``(rows, groups)``, the weight's dtype)."""

    scale: torch.Tensor
    zero: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[GridParams]) -> GridParams:
        return GridParams(torch.cat([p.scale for p in parts], 1), torch.cat([p.zero for p in parts], 1))


@register_format("uniform")
@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes (uint8, ``(rows, cols)``) with per-row, per-group scales and zero points.

    Stored as ``codes`` (packed at ``bits``), ``scale`` (float16, ``(rows, groups)``) and, for asymmetric grids
    only, ``zero`` (packed like the codes; symmetric grids have the implicit zero point ``2**(bits-1)``)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    symmetric: bool
    group_size: int | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(code - zero) * scale``; ``dtype`` defaults to the scale's (float32 when scales are float16)."""
        dtype = default_dtype(self.scale.dtype, dtype)
        cols = self.codes.shape[1]
        scale = expand_groups(self.scale.to(dtype), cols, self.group_size)
        zero = expand_groups(self.zero.to(dtype), cols, self.group_size)
        return (self.codes.to(dtype) - zero) * scale

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        if self.symmetric and not bool((self.zero == 2 ** (self.bits - 1)).all()):
            raise ValueError(f"the grid is symmetric but its zero points are not {2 ** (self.bits - 1)}")
        out = {f"{prefix}codes": pack_codes(self.codes, self.bits), f"{prefix}scale": float16_part("scale", self.scale)}
        if not self.symmetric:
            out[f"{prefix}zero"] = pack_codes(self.zero, self.bits)
        return out

    def metadata(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "bits": self.bits,
            "symmetric": self.symmetric,
            "group_size": self.group_size,
        }

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], prefix: str, metadata: Mapping[str, Any]
    ) -> QuantizedWeight:
        return cls(
            *unpack_grid(tensors, prefix, metadata), metadata["bits"], metadata["symmetric"], metadata["group_size"]
        )

    def nbytes(self) -> int:
        """Packed codes, float16 scales and (asymmetric grids) packed zero points."""
        size = packed_bytes(self.codes.numel(), self.bits) + 2 * self.scale.numel()
        return size if self.symmetric else size + packed_bytes(self.zero.numel(), self.bits)


def unpack_grid(
    tensors: Mapping[str, torch.Tensor], prefix: str, metadata: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero)`` of a stored :class:`QuantizedWeight` (the implicit zero of symmetric grids)."""
    (rows, cols), bits = metadata["shape"], metadata["bits"]
    scale = tensors[f"{prefix}scale"]
    codes = unpack_codes(tensors[f"{prefix}codes"], bits, rows * cols).reshape(rows, cols)
    if metadata["symmetric"]:
        zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.uint8)
    else:
        zero = unpack_codes(tensors[f"{prefix}zero"], bits, scale.numel()).reshape(scale.shape)
    return codes, scale, zero


@dataclass(frozen=True)
class UniformGrid:
    """Uniform affine grid; ``fit`` finds scales/zero points, ``encode`` rounds to codes, ``quantize`` does both
    (round-to-nearest, RTN). ``fit`` and ``quantize_column`` are the interface :func:`..gptq.gptq` uses."""

    bits: int
    symmetric: bool = True
    group_size: int | None = None
    scale_dtype: torch.dtype | None = torch.float16

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be torch.float16 or None, got {self.scale_dtype!r}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def fit(self, weight: torch.Tensor) -> GridParams:
        """Scales and zero points for each row and group of ``weight``'s columns."""
        w = check_weight(weight)
        parts = [w] if self.group_size is None else torch.split(w, self.group_size, dim=1)
        if self.symmetric:
            top = torch.stack([p.abs().amax(dim=1) for p in parts], 1)
            scale = round_scale_up(torch.where(top > 0, 2 * top / self.maxq, torch.ones_like(top)), self.scale_dtype)
            return GridParams(scale, torch.full_like(scale, 2 ** (self.bits - 1)))
        low = torch.stack([p.amin(dim=1) for p in parts], 1).clamp(max=0)
        high = torch.stack([p.amax(dim=1) for p in parts], 1).clamp(min=0)
        span = high - low
        scale = round_scale_up(torch.where(span > 0, span / self.maxq, torch.ones_like(span)), self.scale_dtype)
        return GridParams(scale, torch.round(-low / scale).clamp(0, self.maxq))

    def _codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)

    def quantize_column(self, column: torch.Tensor, params: GridParams) -> torch.Tensor:
        """Grid values for ``column`` (``(rows, 1)``) under one group's ``params`` (``(rows, 1)``)."""
        return (self._codes(column, params.scale, params.zero) - params.zero) * params.scale

    def encode(self, weight: torch.Tensor, params: GridParams) -> QuantizedWeight:
        """Round ``weight`` to the grid ``params`` describe (one column of params per group)."""
        w = check_weight(weight)
        rows, cols = w.shape
        if params.scale.shape != (rows, num_groups(cols, self.group_size)):
            raise ValueError(
                f"params must have shape {(rows, num_groups(cols, self.group_size))} for weight {(rows, cols)} "
                f"and group_size {self.group_size}, got {tuple(params.scale.shape)}"
            )
        scale = expand_groups(params.scale, cols, self.group_size)
        codes = self._codes(w, scale, expand_groups(params.zero, cols, self.group_size)).to(torch.uint8)
        zero = params.zero.to(torch.uint8)
        return QuantizedWeight(codes, params.scale, zero, self.bits, self.symmetric, self.group_size)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """Round-to-nearest (RTN) quantization of ``weight``."""
        return self.encode(weight, self.fit(weight))


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    group_size: int | None = None,
    scale_dtype: torch.dtype | None = torch.float16,
) -> QuantizedWeight:
    """Round-to-nearest uniform quantization; see :class:`UniformGrid`."""
    return UniformGrid(bits, symmetric, group_size, scale_dtype).quantize(weight)
