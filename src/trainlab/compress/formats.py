"""Packed weight formats: the protocol every packed type follows and the registry that finds a type by kind.

A packed type (uniform grid codes, power grid, trit-planes, vector quantization, outliers, per-column bits,
bitmask / CSR / N:M sparsity) owns its storage:

* ``to_tensors(prefix)``: its tensors, each key starting with ``prefix`` (packed bytes, float16 scales, ...);
* ``metadata()``: the JSON-serialisable rest (shape, bits, group size, ...);
* ``from_tensors(tensors, prefix, metadata)`` (classmethod): the object back, bit for bit;
* ``nbytes()``: the bytes of its tensors (the file holds these plus the safetensors header);
* ``dequantize(dtype=None)``: the dense 2-D weight (sparse formats: the weight in its own shape).

``@register_format(kind)`` puts a type in :data:`FORMATS`; :mod:`trainlab.compress.storage` writes the kind
next to each object's metadata and finds the type again on load. A new quantizer brings its packed type in its
own file with ``@register_format`` (the compression registry imports every quantizer module before a load).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch

SEP = "::"  # between a layer's name and its part's name in a file's keys


@runtime_checkable
class Packed(Protocol):
    kind: ClassVar[str]

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]: ...

    def metadata(self) -> dict[str, Any]: ...

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str, metadata: Mapping[str, Any]) -> Packed: ...

    def nbytes(self) -> int: ...

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor: ...


FORMATS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_format(kind: str) -> Callable[[T], T]:
    """Class decorator: register a packed type under ``kind`` (one type per kind)."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")

    def add(cls: T) -> T:
        if kind in FORMATS and FORMATS[kind] is not cls:
            raise ValueError(f"packed format kind {kind!r} is already registered by {FORMATS[kind].__name__}")
        missing = [m for m in ("to_tensors", "metadata", "from_tensors", "nbytes", "dequantize") if not hasattr(cls, m)]
        if missing:
            raise TypeError(f"{cls.__name__} cannot be a packed format: it lacks {', '.join(missing)}")
        cls.kind = kind
        FORMATS[kind] = cls
        return cls

    return add


def format_of(kind: str) -> type:
    """The packed type registered under ``kind``."""
    if kind not in FORMATS:
        raise ValueError(
            f"unknown packed format kind {kind!r} (registered: {', '.join(sorted(FORMATS))}); import the module "
            "that defines it (with @register_format) before loading"
        )
    return FORMATS[kind]


def float16_part(field: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as float16 for storage; ValueError unless every value is exactly representable (so a file dequantizes
    to exactly what was evaluated in memory)."""
    t = t.detach()
    if not torch.isfinite(t).all() or not torch.equal(t.half().to(t.dtype), t):
        raise ValueError(f"{field} is not exactly representable in float16; fit with a float16 scale/value dtype")
    return t.half().contiguous()


def default_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype to dequantize to: ``dtype``, else the stored values' own when float32/float64, else float32."""
    if dtype is not None:
        return dtype
    return stored if stored in (torch.float32, torch.float64) else torch.float32
