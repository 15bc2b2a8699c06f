"""Packed storage of masked (pruned) weights: bitmask, CSR and N:M, each a registered packed format.

* ``bitmask``: the mask packed 8 entries a byte plus the kept values in row-major order (n/8 bytes + the
  values' bytes);
* ``csr`` (2-D view ``(out, -1)``): int32 row pointers and column indices plus the values, smaller than the
  bitmask only at very high sparsity;
* ``nm`` for layers pruned N:M along the inputs: exactly N values per group of M inputs, and each value's
  position inside its group packed at ``ceil(log2 M)`` bits (2:4 -> 2 bits).

Values keep the weight's dtype, so a stored weight comes back bit for bit; :func:`encode_sparse` picks the
smallest encoding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainlab.compress.bits import pack_bits, unpack_bits
from trainlab.compress.formats import format_of, register_format

SPARSE_FORMATS = ("auto", "bitmask", "csr")


def _input_last(t: torch.Tensor) -> torch.Tensor:
    """Conv kernels ``(out, in, *k)`` with the input channels last, so N:M groups run along the inputs."""
    return t if t.dim() == 2 else t.movedim(1, -1)


def _scatter(shape: list[int], mask: torch.Tensor, values: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    weight = torch.zeros(math.prod(shape), dtype=dtype or values.dtype)
    weight[mask.flatten()] = values.to(weight.dtype)
    return weight.reshape(shape)


@register_format("bitmask")
@dataclass(frozen=True)
class BitmaskWeight:
    """``mask``: bool, the weight's shape; ``values``: the kept entries in row-major order."""

    mask: torch.Tensor
    values: torch.Tensor

    pattern = None

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}values": self.values.contiguous(),
            f"{prefix}bitmask": pack_bits(self.mask.to(torch.uint8), 1),
        }

    def metadata(self) -> dict[str, Any]:
        return {"shape": list(self.mask.shape)}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], prefix: str, metadata: Mapping[str, Any]
    ) -> BitmaskWeight:
        shape = metadata["shape"]
        mask = unpack_bits(tensors[f"{prefix}bitmask"], 1, math.prod(shape)).bool().reshape(shape)
        return cls(mask, tensors[f"{prefix}values"])

    def nbytes(self) -> int:
        return math.ceil(self.mask.numel() / 8) + self.values.nbytes

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (zeros where the mask is False), in the values' dtype unless ``dtype`` is given."""
        return _scatter(list(self.mask.shape), self.mask, self.values, dtype)


@register_format("csr")
@dataclass(frozen=True)
class CSRWeight:
    """The weight viewed as ``(out, -1)`` in compressed sparse rows: int32 ``crow`` (out + 1) and ``col``."""

    shape: tuple[int, ...]
    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor

    pattern = None

    @property
    def mask(self) -> torch.Tensor:
        crow = self.crow.long()
        rows = torch.arange(len(crow) - 1).repeat_interleave(crow.diff())
        mask = torch.zeros(self.shape[0], math.prod(self.shape) // self.shape[0], dtype=torch.bool)
        mask[rows, self.col.long()] = True
        return mask.reshape(self.shape)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}values": self.values.contiguous(), f"{prefix}crow": self.crow, f"{prefix}col": self.col}

    def metadata(self) -> dict[str, Any]:
        return {"shape": list(self.shape)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str, metadata: Mapping[str, Any]) -> CSRWeight:
        parts = (tensors[f"{prefix}{p}"] for p in ("crow", "col", "values"))
        return cls(tuple(metadata["shape"]), *parts)

    def nbytes(self) -> int:
        return self.crow.nbytes + self.col.nbytes + self.values.nbytes

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _scatter(list(self.shape), self.mask, self.values, dtype)


@register_format("nm")
@dataclass(frozen=True)
class NMWeight:
    """N of every M consecutive inputs kept: ``index`` (int64) holds each kept value's position in its group, in
    row-major group order (increasing inside a group), ``values`` the kept values in the same order."""

    shape: tuple[int, ...]
    n: int
    m: int
    index: torch.Tensor
    values: torch.Tensor

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.m)))

    def _group_mask(self) -> torch.Tensor:
        groups = math.prod(self.shape) // self.m
        gmask = torch.zeros(groups, self.m, dtype=torch.bool)
        gmask[torch.arange(groups).repeat_interleave(self.n), self.index] = True
        return gmask

    def _input_last_shape(self) -> list[int]:
        shape = list(self.shape)
        return shape if len(shape) == 2 else [shape[0], *shape[2:], shape[1]]

    def _restore(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(self._input_last_shape())
        return (t if len(self.shape) == 2 else t.movedim(-1, 1)).contiguous()

    @property
    def mask(self) -> torch.Tensor:
        return self._restore(self._group_mask())

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}values": self.values.contiguous(),
            f"{prefix}nm_index": pack_bits(self.index, self.index_bits),
        }

    def metadata(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "n": self.n, "m": self.m}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str, metadata: Mapping[str, Any]) -> NMWeight:
        shape, n, m = tuple(metadata["shape"]), metadata["n"], metadata["m"]
        count = math.prod(shape) // m * n
        index = unpack_bits(tensors[f"{prefix}nm_index"], max(1, math.ceil(math.log2(m))), count)
        return cls(shape, n, m, index, tensors[f"{prefix}values"])

    def nbytes(self) -> int:
        return math.ceil(self.index.numel() * self.index_bits / 8) + self.values.nbytes

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        gmask = self._group_mask()
        groups = torch.zeros(gmask.shape, dtype=dtype or self.values.dtype)
        groups[gmask] = self.values.to(groups.dtype)
        return self._restore(groups)


SparseWeight = BitmaskWeight | CSRWeight | NMWeight


def encode_sparse(
    weight: torch.Tensor, mask: torch.Tensor, fmt: str = "auto", nm: tuple[int, int] | None = None
) -> SparseWeight:
    """The masked ``weight`` in ``fmt``: ``auto`` (N:M when ``nm`` is given and the mask keeps exactly N of every
    M inputs, else the smaller of bitmask and CSR), ``bitmask`` or ``csr``."""
    if fmt not in SPARSE_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(SPARSE_FORMATS)}, got {fmt!r}")
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of the weight's shape {tuple(weight.shape)}")
    w = weight.detach().contiguous()
    if nm is not None and fmt == "auto":
        n, m = nm
        inputs_last = _input_last(mask)
        gmask = inputs_last.reshape(-1, m) if inputs_last.shape[-1] % m == 0 else None
        if gmask is not None and bool((gmask.sum(1) == n).all()):
            index = gmask.nonzero()[:, 1]  # row-major: each group's kept positions in increasing order
            return NMWeight(tuple(w.shape), n, m, index, _input_last(w).reshape(-1, m)[gmask])
    rows, mrows = w.reshape(w.shape[0], -1), mask.reshape(w.shape[0], -1)
    nnz = int(mrows.sum())
    csr_bytes = 4 * (rows.shape[0] + 1) + (4 + w.element_size()) * nnz
    if fmt == "csr" or (fmt == "auto" and csr_bytes < math.ceil(mask.numel() / 8) + w.element_size() * nnz):
        r, c = mrows.nonzero(as_tuple=True)
        crow = torch.zeros(rows.shape[0] + 1, dtype=torch.int32)
        crow[1:] = torch.bincount(r, minlength=rows.shape[0]).cumsum(0)
        return CSRWeight(tuple(w.shape), crow, c.to(torch.int32), rows[mrows])
    return BitmaskWeight(mask.clone(), w[mask])


@register_format("masked")
@dataclass(frozen=True)
class MaskedWeight:
    """A pruned and quantized weight: any packed ``base`` (grid codes, trit-planes, ...) and the pruning ``mask``
    (bool, the weight's shape) that zeroes it, so the zeros stay zeros whatever the quantizer put there. Stored as
    the base's own tensors plus ``bitmask`` (8 entries a byte); ``pattern``: ``"N:M"`` for N:M masks."""

    base: Any
    mask: torch.Tensor
    pattern: str | None = None

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        parts = self.base.to_tensors(prefix)
        if f"{prefix}bitmask" in parts:
            raise ValueError(f"a {self.base.kind} base already stores a bitmask; it cannot be masked again")
        return {**parts, f"{prefix}bitmask": pack_bits(self.mask.to(torch.uint8), 1)}

    def metadata(self) -> dict[str, Any]:
        base = {"kind": self.base.kind, **self.base.metadata()}
        return {"base": base, "shape": list(self.mask.shape), "pattern": self.pattern}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], prefix: str, metadata: Mapping[str, Any]
    ) -> MaskedWeight:
        base_meta = metadata["base"]
        base = format_of(base_meta["kind"]).from_tensors(tensors, prefix, base_meta)
        shape = metadata["shape"]
        mask = unpack_bits(tensors[f"{prefix}bitmask"], 1, math.prod(shape)).bool().reshape(shape)
        return cls(base, mask, metadata["pattern"])

    def nbytes(self) -> int:
        return self.base.nbytes() + math.ceil(self.mask.numel() / 8)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base's weight, in the mask's shape, times the mask."""
        w = self.base.dequantize(dtype).reshape(self.mask.shape)
        return w * self.mask.to(w.dtype)


MASKED_FORMATS = (BitmaskWeight, CSRWeight, NMWeight, MaskedWeight)  # the formats that carry a pruning mask
