"""Bit-packing primitives shared by every packed format: integers of ``bits`` bits and ternary digits.

Integers are packed densely, with no padding between values (3-bit codes cross byte boundaries): each value's
bits, least significant first, are appended to one bit stream that is cut into bytes most significant bit
first (``numpy.packbits``' order). Trits in {-1, 0, 1} are packed 5 to a byte as the base-3 digits ``t + 1``,
the first trit in the least significant digit (``3**5 = 243 <= 256``: 1.6 bits per trit).
"""

from __future__ import annotations

import math

import numpy as np
import torch

TRITS_PER_BYTE = 5
_POWERS3 = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int64)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers ``< 2**bits``, flattened, as ``ceil(n * bits / 8)`` uint8 bytes (unchecked; see
    :func:`pack_codes` for the checked form)."""
    arr = values.detach().cpu().flatten().numpy().astype(np.uint32)
    planes = (arr[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return torch.from_numpy(np.packbits(planes.astype(np.uint8).reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` integers, as int64."""
    planes = np.unpackbits(packed.detach().cpu().numpy())[: count * bits].reshape(count, bits).astype(np.int64)
    return torch.from_numpy((planes << np.arange(bits)).sum(axis=1))


def _check_pack_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")
    return bits


def _check_count(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    return count


def _check_packed(packed: torch.Tensor, need: int, what: str, writer: str) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor (as returned by {writer})")
    if packed.numel() != need:
        raise ValueError(f"packed has {packed.numel()} bytes; {what} need {need}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers in ``codes`` (each in ``[0, 2**bits)``), flattened, as ``ceil(n * bits / 8)`` uint8 bytes."""
    _check_pack_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    flat = codes.detach().cpu().flatten().long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}, got [{flat.min()}, {flat.max()}]")
    return pack_bits(flat, bits)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes, as uint8."""
    _check_pack_bits(bits)
    _check_count(count)
    _check_packed(packed, math.ceil(count * bits / 8), f"{count} codes of {bits} bits", "pack_codes")
    return unpack_bits(packed.contiguous(), bits, count).to(torch.uint8)


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that :func:`pack_codes` writes for ``count`` codes of ``bits`` bits."""
    return math.ceil(count * bits / 8)


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """Values in {-1, 0, 1}, flattened, as ``ceil(n / 5)`` uint8 bytes (5 base-3 digits ``t + 1`` a byte)."""
    if not isinstance(trits, torch.Tensor) or trits.is_floating_point() or trits.is_complex():
        raise ValueError(f"trits must be an integer tensor, got {getattr(trits, 'dtype', type(trits).__name__)}")
    flat = trits.detach().cpu().flatten().long()
    if flat.numel() and (flat.min() < -1 or flat.max() > 1):
        raise ValueError(f"trits must lie in {{-1, 0, 1}}, got [{flat.min()}, {flat.max()}]")
    digits = torch.ones(math.ceil(flat.numel() / TRITS_PER_BYTE) * TRITS_PER_BYTE, dtype=torch.int64)
    digits[: flat.numel()] = flat + 1
    return (digits.reshape(-1, TRITS_PER_BYTE) * _POWERS3).sum(1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: the first ``count`` trits, as int8."""
    _check_count(count)
    _check_packed(packed, math.ceil(count / TRITS_PER_BYTE), f"{count} trits", "pack_trits")
    if packed.numel() and int(packed.max()) >= 3**TRITS_PER_BYTE:
        raise ValueError(f"packed holds a byte >= {3**TRITS_PER_BYTE}; it was not written by pack_trits")
    digits = packed.long().unsqueeze(1) // _POWERS3 % 3
    return (digits.flatten()[:count] - 1).to(torch.int8)
