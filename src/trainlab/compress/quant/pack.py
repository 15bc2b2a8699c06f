"""Packed storage of quantized weights through safetensors, and the loader.

Codes of ``bits`` bits are packed densely, with no padding between values (3-bit codes cross byte
boundaries): each code's bits, least significant first, are appended to one bit stream that is cut into bytes
most significant bit first (:func:`trainlab.compress.export.pack_bits`, shared with the sparse export).
A layer ``name`` is stored as ``name::codes`` (``ceil(rows * cols * bits / 8)`` bytes), ``name::scale``
(float16, ``(rows, groups)``) and, for asymmetric grids only, ``name::zero`` (zero points packed like the
codes; symmetric grids have the implicit zero point ``2**(bits-1)``). Shape, bits, symmetry and group size are
in the file's metadata (``trainlab.quant``). The file is the nominal size (:func:`nominal_bytes`) plus the
safetensors header (a few hundred bytes per layer).

Trit-planes (:class:`..ptqtp.TritPlanes`) are stored as ``name::t1`` and ``name::t2``, each packed 5 trits a
byte (base 3, ``3**5 = 243 <= 256``: 1.6 bits per trit, 3.2 bits per weight for both planes), and
``name::alpha1``, ``name::alpha2`` (float16).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainlab.compress.export import pack_bits, unpack_bits
from trainlab.compress.quant.grids import QuantizedWeight
from trainlab.compress.quant.ptqtp import TritPlanes

META_KEY = "trainlab.quant"
SEP = "::"
TRITS_PER_BYTE = 5
_POWERS3 = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int64)  # first trit in the least significant digit


def _check_pack_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")
    return bits


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
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed must be a 1-D uint8 tensor (as returned by pack_codes)")
    need = math.ceil(count * bits / 8)
    if packed.numel() != need:
        raise ValueError(f"packed has {packed.numel()} bytes; {count} codes of {bits} bits need {need}")
    return unpack_bits(packed.contiguous(), bits, count).to(torch.uint8)


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
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed must be a 1-D uint8 tensor (as returned by pack_trits)")
    need = math.ceil(count / TRITS_PER_BYTE)
    if packed.numel() != need:
        raise ValueError(f"packed has {packed.numel()} bytes; {count} trits need {need}")
    if packed.numel() and int(packed.max()) >= 3**TRITS_PER_BYTE:
        raise ValueError(f"packed holds a byte >= {3**TRITS_PER_BYTE}; it was not written by pack_trits")
    digits = packed.long().unsqueeze(1) // _POWERS3 % 3
    return (digits.flatten()[:count] - 1).to(torch.int8)


def nominal_bytes(weight: QuantizedWeight | TritPlanes) -> int:
    """Bytes of the packed codes (or trit-planes), the float16 scales and (asymmetric grids) the packed zero
    points."""
    if isinstance(weight, TritPlanes):
        return 2 * math.ceil(weight.t1.numel() / TRITS_PER_BYTE) + 2 * (weight.alpha1.numel() + weight.alpha2.numel())
    size = math.ceil(weight.codes.numel() * weight.bits / 8) + 2 * weight.scale.numel()
    return size if weight.symmetric else size + math.ceil(weight.zero.numel() * weight.bits / 8)


def _check_float16(name: str, field: str, scale: torch.Tensor) -> None:
    scale = scale.detach()
    if not torch.isfinite(scale).all() or not torch.equal(scale.half().to(scale.dtype), scale):
        raise ValueError(
            f"weights[{name!r}].{field} is not exactly representable in float16; fit with scale_dtype=torch.float16"
        )


def _check_storable(name: str, q: QuantizedWeight | TritPlanes) -> None:
    if isinstance(q, TritPlanes):
        _check_float16(name, "alpha1", q.alpha1)
        _check_float16(name, "alpha2", q.alpha2)
        return
    if not isinstance(q, QuantizedWeight):
        raise ValueError(f"weights[{name!r}] must be a QuantizedWeight or TritPlanes, got {type(q).__name__}")
    _check_float16(name, "scale", q.scale)
    if q.symmetric and not bool((q.zero == 2 ** (q.bits - 1)).all()):
        raise ValueError(f"weights[{name!r}] is symmetric but its zero points are not {2 ** (q.bits - 1)}")


def save_quantized(
    path: str | Path,
    weights: Mapping[str, QuantizedWeight | TritPlanes],
    tensors: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write the quantized ``weights`` (uniform grids or trit-planes) packed, plus any plain ``tensors``
    (biases, norms, ...) unchanged, to a safetensors file; returns its size in bytes."""
    tensors = dict(tensors or {})
    state = {k: v.detach().contiguous() for k, v in tensors.items()}
    described: dict[str, dict] = {}
    for name, q in weights.items():
        if SEP in name or name in tensors:
            raise ValueError(f"weights key {name!r} must not contain {SEP!r} nor also be a key of tensors")
        _check_storable(name, q)
        if isinstance(q, TritPlanes):
            state[f"{name}{SEP}t1"] = pack_trits(q.t1)
            state[f"{name}{SEP}t2"] = pack_trits(q.t2)
            state[f"{name}{SEP}alpha1"] = q.alpha1.detach().half().contiguous()
            state[f"{name}{SEP}alpha2"] = q.alpha2.detach().half().contiguous()
            described[name] = {"kind": "trits", "shape": list(q.t1.shape), "group_size": q.group_size}
            continue
        rows, cols = q.shape
        state[f"{name}{SEP}codes"] = pack_codes(q.codes, q.bits)
        state[f"{name}{SEP}scale"] = q.scale.detach().half().contiguous()
        if not q.symmetric:
            state[f"{name}{SEP}zero"] = pack_codes(q.zero, q.bits)
        described[name] = {
            "kind": "uniform",
            "shape": [rows, cols],
            "bits": q.bits,
            "symmetric": q.symmetric,
            "group_size": q.group_size,
        }
    save_file(state, str(path), metadata={**(metadata or {}), META_KEY: json.dumps(described)})
    return Path(path).stat().st_size


def load_quantized(path: str | Path) -> tuple[dict[str, QuantizedWeight | TritPlanes], dict[str, torch.Tensor]]:
    """``(quantized weights, plain tensors)`` from a file written by :func:`save_quantized`; scales are float16
    (loaded trit-planes have an empty ``objective``)."""
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(META_KEY)
        if meta is None:
            raise ValueError(f"{path} has no {META_KEY!r} metadata; it was not written by save_quantized")
        described = json.loads(meta)
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    plain = {k: v for k, v in stored.items() if SEP not in k}
    weights = {}
    for name, desc in described.items():
        (rows, cols), group_size = desc["shape"], desc["group_size"]
        if desc["kind"] == "trits":
            t1, t2 = (unpack_trits(stored[f"{name}{SEP}{t}"], rows * cols).reshape(rows, cols) for t in ("t1", "t2"))
            a1, a2 = stored[f"{name}{SEP}alpha1"], stored[f"{name}{SEP}alpha2"]
            weights[name] = TritPlanes(t1, t2, a1, a2, group_size, [])
            continue
        bits = desc["bits"]
        scale = stored[f"{name}{SEP}scale"]
        codes = unpack_codes(stored[f"{name}{SEP}codes"], bits, rows * cols).reshape(rows, cols)
        if desc["symmetric"]:
            zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.uint8)
        else:
            zero = unpack_codes(stored[f"{name}{SEP}zero"], bits, scale.numel()).reshape(scale.shape)
        weights[name] = QuantizedWeight(codes, scale, zero, bits, desc["symmetric"], group_size)
    return weights, plain


def dequantized_state(path: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The file's quantized weights dequantized to ``dtype`` together with its plain tensors (2-D weights as
    stored; reshape conv kernels yourself), ready for ``load_state_dict``."""
    weights, plain = load_quantized(path)
    return {**plain, **{name: q.dequantize(dtype) for name, q in weights.items()}}
