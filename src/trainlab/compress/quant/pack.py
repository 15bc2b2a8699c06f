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

Power grids (:class:`..nupes.PowerQuantizedWeight`) are stored like uniform grids, with the exponent in the
metadata (``kind: "power"``; a JSON float, exact). Vector-quantized weights (:class:`..vptq.VQWeight`) are
stored as ``name::codebook`` (float16, ``(K, v)``) and ``name::indices`` (packed at ``ceil(log2 K)`` bits), and
the residual pair as ``name::res_codebook`` / ``name::res_indices``. Weights with outliers
(:class:`..gwq.OutlierQuantizedWeight`) store their base uniform grid as above plus ``name::outlier_idx``
(int32 flat positions) and ``name::outlier_val`` (float16).
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
from trainlab.compress.quant.gwq import OutlierQuantizedWeight
from trainlab.compress.quant.nupes import PowerQuantizedWeight
from trainlab.compress.quant.ptqtp import TritPlanes
from trainlab.compress.quant.vptq import VQWeight, index_bits

Quantized = QuantizedWeight | TritPlanes | VQWeight | OutlierQuantizedWeight

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


def nominal_bytes(weight: Quantized) -> int:
    """Bytes of the packed codes (or trit-planes, or indices), the float16 scales or codebooks, (asymmetric
    grids) the packed zero points and (outliers) 6 bytes per outlier."""
    if isinstance(weight, OutlierQuantizedWeight):
        return nominal_bytes(weight.base) + 6 * weight.indices.numel()
    if isinstance(weight, VQWeight):
        bits = index_bits(weight.codebook.shape[0])
        size = math.ceil(weight.indices.numel() * bits / 8) + 2 * weight.codebook.numel()
        if weight.res_codebook is not None:
            bits = index_bits(weight.res_codebook.shape[0])
            size += math.ceil(weight.res_indices.numel() * bits / 8) + 2 * weight.res_codebook.numel()
        return size
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


def _check_storable(name: str, q: Quantized) -> None:
    if isinstance(q, OutlierQuantizedWeight):
        _check_float16(name, "values", q.values)
        if q.indices.dtype != torch.int32 or q.indices.numel() != q.values.numel():
            raise ValueError(f"weights[{name!r}].indices must be int32, one per value")
        _check_storable(name, q.base)
        return
    if isinstance(q, VQWeight):
        _check_float16(name, "codebook", q.codebook)
        if q.res_codebook is not None:
            _check_float16(name, "res_codebook", q.res_codebook)
        return
    if isinstance(q, TritPlanes):
        _check_float16(name, "alpha1", q.alpha1)
        _check_float16(name, "alpha2", q.alpha2)
        return
    if not isinstance(q, QuantizedWeight):
        raise ValueError(
            f"weights[{name!r}] must be a QuantizedWeight, TritPlanes, VQWeight or OutlierQuantizedWeight, "
            f"got {type(q).__name__}"
        )
    _check_float16(name, "scale", q.scale)
    if q.symmetric and not bool((q.zero == 2 ** (q.bits - 1)).all()):
        raise ValueError(f"weights[{name!r}] is symmetric but its zero points are not {2 ** (q.bits - 1)}")


def _save_uniform(state: dict[str, torch.Tensor], name: str, q: QuantizedWeight) -> dict:
    rows, cols = q.shape
    state[f"{name}{SEP}codes"] = pack_codes(q.codes, q.bits)
    state[f"{name}{SEP}scale"] = q.scale.detach().half().contiguous()
    if not q.symmetric:
        state[f"{name}{SEP}zero"] = pack_codes(q.zero, q.bits)
    desc = {
        "kind": "uniform",
        "shape": [rows, cols],
        "bits": q.bits,
        "symmetric": q.symmetric,
        "group_size": q.group_size,
    }
    if isinstance(q, PowerQuantizedWeight):
        desc.update(kind="power", exponent=q.exponent)
    return desc


def _load_uniform(stored: dict[str, torch.Tensor], name: str, desc: dict) -> QuantizedWeight:
    (rows, cols), bits = desc["shape"], desc["bits"]
    scale = stored[f"{name}{SEP}scale"]
    codes = unpack_codes(stored[f"{name}{SEP}codes"], bits, rows * cols).reshape(rows, cols)
    if desc["symmetric"]:
        zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.uint8)
    else:
        zero = unpack_codes(stored[f"{name}{SEP}zero"], bits, scale.numel()).reshape(scale.shape)
    if desc["kind"] == "power":
        return PowerQuantizedWeight(codes, scale, zero, bits, desc["symmetric"], desc["group_size"], desc["exponent"])
    return QuantizedWeight(codes, scale, zero, bits, desc["symmetric"], desc["group_size"])


def save_quantized(
    path: str | Path,
    weights: Mapping[str, Quantized],
    tensors: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write the quantized ``weights`` (uniform or power grids, trit-planes, VQ, outliers) packed, plus any
    plain ``tensors`` (biases, norms, ...) unchanged, to a safetensors file; returns its size in bytes."""
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
        if isinstance(q, VQWeight):
            state[f"{name}{SEP}codebook"] = q.codebook.detach().half().contiguous()
            state[f"{name}{SEP}indices"] = pack_codes(q.indices, index_bits(q.codebook.shape[0]))
            if q.res_codebook is not None:
                state[f"{name}{SEP}res_codebook"] = q.res_codebook.detach().half().contiguous()
                state[f"{name}{SEP}res_indices"] = pack_codes(q.res_indices, index_bits(q.res_codebook.shape[0]))
            described[name] = {"kind": "vq", "shape": list(q.shape), "residual": q.res_codebook is not None}
            continue
        if isinstance(q, OutlierQuantizedWeight):
            state[f"{name}{SEP}outlier_idx"] = q.indices.detach().to(torch.int32).contiguous()
            state[f"{name}{SEP}outlier_val"] = q.values.detach().half().contiguous()
            described[name] = {**_save_uniform(state, name, q.base), "outliers": True}
            continue
        described[name] = _save_uniform(state, name, q)
    save_file(state, str(path), metadata={**(metadata or {}), META_KEY: json.dumps(described)})
    return Path(path).stat().st_size


def load_quantized(path: str | Path) -> tuple[dict[str, Quantized], dict[str, torch.Tensor]]:
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
        (rows, cols), group_size = desc["shape"], desc.get("group_size")
        if desc["kind"] == "trits":
            t1, t2 = (unpack_trits(stored[f"{name}{SEP}{t}"], rows * cols).reshape(rows, cols) for t in ("t1", "t2"))
            a1, a2 = stored[f"{name}{SEP}alpha1"], stored[f"{name}{SEP}alpha2"]
            weights[name] = TritPlanes(t1, t2, a1, a2, group_size, [])
            continue
        if desc["kind"] == "vq":
            weights[name] = _load_vq(stored, name, rows, cols, desc["residual"])
            continue
        base = _load_uniform(stored, name, desc)
        if desc.get("outliers"):
            idx, val = stored[f"{name}{SEP}outlier_idx"], stored[f"{name}{SEP}outlier_val"]
            weights[name] = OutlierQuantizedWeight(base, idx, val)
            continue
        weights[name] = base
    return weights, plain


def _load_vq(stored: dict[str, torch.Tensor], name: str, rows: int, cols: int, residual: bool) -> VQWeight:
    def part(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        codebook = stored[f"{name}{SEP}{prefix}codebook"]
        count = rows * cols // codebook.shape[1]
        packed = stored[f"{name}{SEP}{prefix}indices"]
        idx = unpack_codes(packed, index_bits(codebook.shape[0]), count).long().reshape(rows, -1)
        return idx, codebook

    idx, codebook = part("")
    res_idx, res_codebook = part("res_") if residual else (None, None)
    return VQWeight(idx, codebook, res_idx, res_codebook)


def dequantized_state(path: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The file's quantized weights dequantized to ``dtype`` together with its plain tensors (2-D weights as
    stored; reshape conv kernels yourself), ready for ``load_state_dict``."""
    weights, plain = load_quantized(path)
    return {**plain, **{name: q.dequantize(dtype) for name, q in weights.items()}}
