"""NUPES ("Non-Uniform Post-Training Quantization via Power Exponent Search"): a power-companding grid.

With ``phi_a(w) = sign(w) |w|**a`` (``a > 0``), a weight is quantized on the uniform grid of
:class:`..grids.UniformGrid` in the transformed domain and mapped back by the inverse power:

    code = clamp(round(phi_a(w) / s) + z, 0, 2**bits - 1),        w_hat = phi_a^-1((code - z) * s)

so ``a = 1`` is exactly round-to-nearest (same codes, same scales), ``a < 1`` puts more levels near 0 (heavy
tails), ``a > 1`` more near the range ends. The exponent is searched per layer over a grid
(:data:`EXPONENTS`: 0.25 to 1.5 by 0.025, as in the spec pack's check; 1.0 always included), data-free by
the weight reconstruction error ``||W - W_hat||^2`` or, given a calibration Hessian ``H``, by the layer
output error ``tr(E H E^T)`` with ``E = W - W_hat``; the search rounds to nearest. The paper's data-driven
part (learning the rounding jointly with ``a``) is not implemented; :class:`PowerGrid` works with
:func:`..gptq.gptq` instead (``second_order=True``), which compensates errors in the original domain.

Storage is that of the uniform grid (codes packed at ``bits``, float16 scales of the transformed values) plus
the exponent (one float in the file's metadata). Dequantization is computed in float64 and then cast, so a
loaded weight dequantizes to exactly the same values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainlab.compress.formats import default_dtype, register_format
from trainlab.compress.quant.gptq import BLOCK_SIZE, DAMP, gptq
from trainlab.compress.quant.grids import GridParams, QuantizedWeight, UniformGrid, check_weight, unpack_grid
from trainlab.compress.registry import register_compressor

EXPONENTS = tuple(i / 40 for i in range(10, 61))  # 0.25, 0.275, ..., 1.5 (1.0 exactly)


def check_exponent(exponent: float, name: str = "exponent") -> float:
    if isinstance(exponent, bool) or not isinstance(exponent, int | float) or not 0 < exponent < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {exponent!r}")
    return float(exponent)


def power(w: torch.Tensor, exponent: float) -> torch.Tensor:
    """``sign(w) |w|**exponent`` (exact identity for ``exponent == 1``)."""
    if exponent == 1:
        return w.clone()
    return torch.sign(w) * w.abs().pow(exponent)


@register_format("power")
@dataclass(frozen=True)
class PowerQuantizedWeight(QuantizedWeight):
    """Codes and scales of the transformed weight ``phi_a(W)`` plus the exponent ``a``; stored like the uniform
    grid with the exponent in the metadata (a JSON float, exact)."""

    exponent: float = 1.0

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``phi_a^-1((code - zero) * scale)``, computed in float64; ``dtype`` defaults as for the uniform grid."""
        dtype = default_dtype(self.scale.dtype, dtype)
        return power(super().dequantize(torch.float64), 1 / self.exponent).to(dtype)

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "exponent": self.exponent}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], prefix: str, metadata: Mapping[str, Any]
    ) -> PowerQuantizedWeight:
        codes, scale, zero = unpack_grid(tensors, prefix, metadata)
        bits, symmetric, group_size = metadata["bits"], metadata["symmetric"], metadata["group_size"]
        return cls(codes, scale, zero, bits, symmetric, group_size, metadata["exponent"])


@dataclass(frozen=True)
class PowerGrid:
    """Uniform grid on ``phi_a(w)``; ``fit``/``quantize_column`` make it usable by :func:`..gptq.gptq`."""

    bits: int
    exponent: float
    symmetric: bool = True
    group_size: int | None = None
    scale_dtype: torch.dtype | None = torch.float16

    def __post_init__(self) -> None:
        check_exponent(self.exponent)
        object.__setattr__(self, "exponent", float(self.exponent))
        self.uniform  # validates bits, symmetric, group_size, scale_dtype  # noqa: B018

    @property
    def uniform(self) -> UniformGrid:
        return UniformGrid(self.bits, self.symmetric, self.group_size, self.scale_dtype)

    def fit(self, weight: torch.Tensor) -> GridParams:
        return self.uniform.fit(power(check_weight(weight), self.exponent))

    def quantize_column(self, column: torch.Tensor, params: GridParams) -> torch.Tensor:
        values = self.uniform.quantize_column(power(column, self.exponent), params)
        return power(values, 1 / self.exponent).to(column.dtype)

    def encode(self, weight: torch.Tensor, params: GridParams) -> PowerQuantizedWeight:
        q = self.uniform.encode(power(check_weight(weight), self.exponent), params)
        return PowerQuantizedWeight(q.codes, q.scale, q.zero, q.bits, q.symmetric, q.group_size, self.exponent)

    def quantize(self, weight: torch.Tensor) -> PowerQuantizedWeight:
        """Round to nearest in the transformed domain."""
        return self.encode(weight, self.fit(weight))


def _check_hessian(hessian: torch.Tensor | None, cols: int) -> torch.Tensor | None:
    if hessian is None:
        return None
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (cols, cols):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must be None or a ({cols}, {cols}) tensor, got {got}")
    return hessian.detach().double()


def reconstruction_loss(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None = None) -> float:
    """``||E||^2`` or, with a Hessian, ``tr(E H E^T)`` for ``E = weight - approx`` (float64)."""
    e = weight.detach().double() - approx.detach().double()
    if hessian is None:
        return float(e.square().sum())
    return float(((e @ hessian.double()) * e).sum())


def search_exponent(
    weight: torch.Tensor,
    bits: int,
    *,
    hessian: torch.Tensor | None = None,
    exponents: tuple[float, ...] = EXPONENTS,
    symmetric: bool = True,
    group_size: int | None = None,
    scale_dtype: torch.dtype | None = torch.float16,
) -> tuple[float, dict[float, float]]:
    """The exponent (among ``exponents`` and 1.0) whose round-to-nearest quantization of ``weight`` has the
    lowest :func:`reconstruction_loss` (ties: the first, 1.0 is tried first), and the loss of each."""
    check_weight(weight)
    h = _check_hessian(hessian, weight.shape[1])
    if isinstance(exponents, str) or not hasattr(exponents, "__iter__"):
        raise ValueError(f"exponents must be a sequence of numbers > 0, got {exponents!r}")
    candidates = [1.0] + [check_exponent(a, "exponents") for a in exponents]
    losses: dict[float, float] = {}
    w = weight.detach().double()
    for a in candidates:
        if a not in losses:
            approx = PowerGrid(bits, a, symmetric, group_size, scale_dtype).quantize(w).dequantize(torch.float64)
            losses[a] = reconstruction_loss(w, approx, h)
    best = min(losses, key=losses.__getitem__)
    return best, losses


def quantize_nupes(
    weight: torch.Tensor,
    bits: int,
    *,
    hessian: torch.Tensor | None = None,
    second_order: bool = False,
    exponent: float | None = None,
    exponents: tuple[float, ...] = EXPONENTS,
    symmetric: bool = True,
    group_size: int | None = None,
    scale_dtype: torch.dtype | None = torch.float16,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
) -> PowerQuantizedWeight:
    """Quantize ``weight`` on the power grid; ``exponent=None`` searches it (:func:`search_exponent`, with the
    Hessian's objective when one is given). ``second_order=True`` rounds with GPTQ error compensation (needs
    ``hessian``); otherwise round to nearest."""
    check_weight(weight)
    if not isinstance(second_order, bool):
        raise ValueError(f"second_order must be True or False, got {second_order!r}")
    if second_order and hessian is None:
        raise ValueError("hessian is required when second_order=True")
    _check_hessian(hessian, weight.shape[1])
    if exponent is None:
        exponent, _ = search_exponent(
            weight,
            bits,
            hessian=hessian,
            exponents=exponents,
            symmetric=symmetric,
            group_size=group_size,
            scale_dtype=scale_dtype,
        )
    grid = PowerGrid(bits, check_exponent(exponent), symmetric, group_size, scale_dtype)
    if not second_order:
        return grid.quantize(weight)
    result = gptq(weight, hessian, grid, damp=damp, block_size=block_size)
    return grid.encode(result.weight, GridParams.cat(result.params))


@register_compressor(
    "nupes",
    paper="NUPES: Non-Uniform Post-Training Quantization via Power Exponent Search",
    summary="power-companding grid, exponent searched per layer (by the Hessian-weighted error with second order)",
    kind="quantizer",
    level="bits",
    second_order="optional",
    grouped=True,
)
def nupes(
    weight: torch.Tensor, *, bits: int, group_size: int | None = None, hessian: torch.Tensor | None = None
) -> PowerQuantizedWeight:
    return quantize_nupes(weight, bits, hessian=hessian, second_order=hessian is not None, group_size=group_size)
