"""Gradient compressors for communication: pure functions of a flat tensor and a shared seed.

A compressor turns a flat tensor into a 1-D *payload* (what goes on the wire) and back. ``payload_bytes`` is
exactly the payload's size, so byte counts are measured, not estimated. Two families:

- linear compressors (identity, count sketch) have float payloads that can be summed on the wire, so workers
  all-reduce them and decode the sum once;
- the others (Top-K, scaled sign) have uint8 payloads that are gathered and decoded per sender.

``compress(x, seed)`` is ``decode(encode(x, seed), ...)``: the operator C(x) of the error-feedback papers.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Compressor", "CountSketch", "Identity", "ScaledSign", "TopK", "round_seed"]


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed % (2**63))


def round_seed(seed: int, key: str, step: int) -> int:
    """The seed every worker uses for parameter ``key`` in round ``step``: fresh per round, equal across workers
    and processes (crc32, not Python's per-process salted ``hash``)."""
    return (seed * 1_000_003 + zlib.crc32(key.encode()) * 7_919 + step) % (2**63)


class Compressor(ABC):
    """Base: ``encode``/``decode`` over flat tensors; ``linear`` payloads may be summed before decoding."""

    name = "compressor"
    linear = False
    lossless = False

    @abstractmethod
    def encode(self, x: Tensor, seed: int) -> Tensor: ...

    @abstractmethod
    def decode(self, payload: Tensor, numel: int, dtype: torch.dtype, seed: int) -> Tensor: ...

    @abstractmethod
    def payload_bytes(self, numel: int, dtype: torch.dtype) -> int: ...

    def compress(self, x: Tensor, seed: int = 0) -> Tensor:
        """C(x): what the receivers reconstruct from ``x``'s payload."""
        return self.decode(self.encode(x, seed), x.numel(), x.dtype, seed)

    def decode_many(self, payloads: Tensor, coefficients: Tensor, numel: int, dtype: torch.dtype, seed: int) -> Tensor:
        """``sum_j coefficients[j] * decode(payloads[j])`` for gathered payloads (one row per sender)."""
        return sum(c * self.decode(p, numel, dtype, seed) for c, p in zip(coefficients.tolist(), payloads, strict=True))


def _check_flat(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 1 or not x.is_floating_point():
        raise TypeError(f"x must be a flat floating-point tensor, got {type(x).__name__} {getattr(x, 'shape', '')}")


@dataclass(frozen=True)
class Identity(Compressor):
    """No compression (the dense all-reduce)."""

    name = "identity"
    linear = True
    lossless = True

    def encode(self, x: Tensor, seed: int) -> Tensor:
        _check_flat(x)
        return x

    def decode(self, payload: Tensor, numel: int, dtype: torch.dtype, seed: int) -> Tensor:
        return payload

    def payload_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * dtype.itemsize


@dataclass(frozen=True)
class TopK(Compressor):
    """Keep the ``ratio`` share of entries with the largest magnitudes (at least one per tensor).

    Payload: the kept values in the tensor's dtype, then their int32 indices, as bytes. Contractive with
    alpha = k/d: ||C(x) - x||^2 <= (1 - k/d) ||x||^2."""

    ratio: float = 0.01
    name = "topk"

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, float | int) and 0 < self.ratio <= 1):
            raise ValueError(f"ratio must be a number in (0, 1], got {self.ratio!r}")

    def k(self, numel: int) -> int:
        return max(1, math.ceil(self.ratio * numel))

    def encode(self, x: Tensor, seed: int) -> Tensor:
        _check_flat(x)
        if x.numel() >= 2**31:
            raise ValueError(f"TopK indexes with int32: tensors must have < 2**31 entries, got {x.numel()}")
        idx = x.abs().topk(self.k(x.numel()), sorted=False).indices
        values = x[idx].contiguous()
        return torch.cat([values.view(torch.uint8), idx.to(torch.int32).view(torch.uint8)])

    def _split(self, payload: Tensor, numel: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        k = self.k(numel)
        cut = k * dtype.itemsize
        values = payload[..., :cut].clone().view(dtype)
        idx = payload[..., cut:].clone().view(torch.int32).long()
        return values, idx

    def decode(self, payload: Tensor, numel: int, dtype: torch.dtype, seed: int) -> Tensor:
        values, idx = self._split(payload, numel, dtype)
        return torch.zeros(numel, dtype=dtype, device=payload.device).index_put_((idx,), values)

    def decode_many(self, payloads: Tensor, coefficients: Tensor, numel: int, dtype: torch.dtype, seed: int) -> Tensor:
        values, idx = self._split(payloads, numel, dtype)
        values = values * coefficients.to(dtype).unsqueeze(1)
        return torch.zeros(numel, dtype=dtype, device=payloads.device).index_add_(0, idx.flatten(), values.flatten())

    def payload_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return self.k(numel) * (dtype.itemsize + 4)


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


@dataclass(frozen=True)
class ScaledSign(Compressor):
    """C(x) = (||x||_1 / d) sign(x) (EF-SignSGD, Karimireddy et al. 2019); zeros are sent as +.

    Payload: one bit per entry (packed, little-endian within a byte), then the scale in the tensor's dtype.
    Contractive with alpha = ||x||_1^2 / (d ||x||_2^2)."""

    name = "sign"

    def encode(self, x: Tensor, seed: int) -> Tensor:
        _check_flat(x)
        d = x.numel()
        bits = torch.zeros(math.ceil(d / 8) * 8, dtype=torch.uint8, device=x.device)
        bits[:d] = (x < 0).to(torch.uint8)
        packed = (bits.view(-1, 8) * _BIT_WEIGHTS.to(x.device)).sum(1, dtype=torch.uint8)
        scale = (x.abs().sum() / d).reshape(1).to(x.dtype)
        return torch.cat([packed, scale.view(torch.uint8)])

    def _split(self, payload: Tensor, numel: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        nbytes = math.ceil(numel / 8)
        packed = payload[..., :nbytes]
        bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(payload.device)).ne(0).flatten(-2)[..., :numel]
        signs = 1 - 2 * bits.to(dtype)
        scale = payload[..., nbytes:].clone().view(dtype)
        return signs, scale

    def decode(self, payload: Tensor, numel: int, dtype: torch.dtype, seed: int) -> Tensor:
        signs, scale = self._split(payload, numel, dtype)
        return signs * scale

    def decode_many(self, payloads: Tensor, coefficients: Tensor, numel: int, dtype: torch.dtype, seed: int) -> Tensor:
        signs, scale = self._split(payloads, numel, dtype)
        return (signs * (scale.squeeze(1) * coefficients.to(dtype)).unsqueeze(1)).sum(0)

    def payload_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return math.ceil(numel / 8) + dtype.itemsize


@dataclass(frozen=True)
class CountSketch(Compressor):
    """Count sketch R x with ``ceil(ratio * d)`` buckets: entry j goes to bucket h(j) with sign s(j).

    R (one ±1 per column) satisfies E[R^T R] = I, so ``decode`` (R^T y) is unbiased; it is linear, so workers sum
    sketches on the wire and the receiver desketches once ("Sketching for First Order Method", Song et al. 2023).
    The hash and signs are drawn from ``seed``: every worker must use the same seed in a round and a fresh one
    in the next (a fixed R never recovers the directions it maps to zero)."""

    ratio: float = 0.125
    name = "count-sketch"
    linear = True

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, float | int) and 0 < self.ratio <= 1):
            raise ValueError(f"ratio must be a number in (0, 1], got {self.ratio!r}")

    def buckets(self, numel: int) -> int:
        return max(1, math.ceil(self.ratio * numel))

    def _hash(self, numel: int, dtype: torch.dtype, seed: int, device: torch.device) -> tuple[Tensor, Tensor]:
        g = _seeded(seed)
        h = torch.randint(self.buckets(numel), (numel,), generator=g)
        s = torch.randint(2, (numel,), generator=g).to(dtype).mul_(2).sub_(1)
        return h.to(device), s.to(device)

    def encode(self, x: Tensor, seed: int) -> Tensor:
        _check_flat(x)
        h, s = self._hash(x.numel(), x.dtype, seed, x.device)
        return torch.zeros(self.buckets(x.numel()), dtype=x.dtype, device=x.device).index_add_(0, h, x * s)

    def decode(self, payload: Tensor, numel: int, dtype: torch.dtype, seed: int) -> Tensor:
        h, s = self._hash(numel, dtype, seed, payload.device)
        return payload[h] * s

    def payload_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return self.buckets(numel) * dtype.itemsize
