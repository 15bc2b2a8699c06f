"""Compact export of sparse models through safetensors, and the loader that rebuilds them.

Each masked layer's weight is stored in the smallest of three encodings (the others' tensors are absent):

* ``bitmask``: the mask packed 8 entries a byte, plus the kept values in row-major order
  (n/8 bytes + 4 bytes per kept value);
* ``csr`` (2-D view ``(out, -1)``): int32 row pointers and column indices, plus values — smaller than the
  bitmask only at very high sparsity;
* ``nm`` for layers pruned N:M: exactly N values per group of M inputs and each value's position inside its
  group packed in ``ceil(log2 M)`` bits (2:4 -> 2 bits), so values are N/M of the dense count.

Dense tensors are stored unchanged. The encodings are described in the file's metadata (``trainlab.sparse``)
so :func:`load_compressed` can rebuild the exact weights and re-arm the masks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from trainlab.compress.masks import apply_mask, mask_pattern, masked_layers
from trainlab.compress.prune import is_nm, parse_pattern

FORMATS = ("auto", "bitmask", "csr")
META_KEY = "trainlab.sparse"


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers < 2**bits, ``bits`` each, little-endian bit planes, into uint8."""
    arr = codes.flatten().numpy().astype(np.uint32)
    planes = (arr[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return torch.from_numpy(np.packbits(planes.astype(np.uint8).reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    planes = np.unpackbits(packed.numpy())[: count * bits].reshape(count, bits).astype(np.int64)
    return torch.from_numpy((planes << np.arange(bits)).sum(axis=1))


def _input_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.movedim(1, -1)


def _encode(weight: torch.Tensor, mask: torch.Tensor, pattern: str | None, fmt: str) -> tuple[dict, dict]:
    """(tensors, description) for one masked weight."""
    w = weight.detach().contiguous()
    if pattern is not None and fmt == "auto" and is_nm(mask, *parse_pattern(pattern)):
        n, m = parse_pattern(pattern)
        groups, gmask = _input_last(w).reshape(-1, m), _input_last(mask).reshape(-1, m)
        index = gmask.nonzero()[:, 1]  # row-major: each group's kept positions in increasing order
        values = groups[gmask]
        return {"values": values, "nm_index": pack_bits(index, max(1, math.ceil(math.log2(m))))}, {"n": n, "m": m}
    rows = w.reshape(w.shape[0], -1)
    mrows = mask.reshape(rows.shape)
    nnz = int(mrows.sum())
    csr_bytes = 4 * (rows.shape[0] + 1) + 8 * nnz
    if fmt == "csr" or (fmt == "auto" and csr_bytes < math.ceil(mask.numel() / 8) + 4 * nnz):
        r, c = mrows.nonzero(as_tuple=True)
        crow = torch.zeros(rows.shape[0] + 1, dtype=torch.int32)
        crow[1:] = torch.bincount(r, minlength=rows.shape[0]).cumsum(0)
        return {"values": rows[mrows], "crow": crow, "col": c.to(torch.int32)}, {"format": "csr"}
    return {"values": w[mask], "bitmask": pack_bits(mask.to(torch.uint8), 1)}, {"format": "bitmask"}


def _decode(tensors: dict[str, torch.Tensor], desc: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, mask) from one layer's stored tensors."""
    shape, values = desc["shape"], tensors["values"]
    numel = math.prod(shape)
    if desc["format"] == "nm":
        n, m = desc["n"], desc["m"]
        il_shape = shape if len(shape) == 2 else [shape[0], *shape[2:], shape[1]]
        index = unpack_bits(tensors["nm_index"], max(1, math.ceil(math.log2(m))), numel // m * n)
        gmask = torch.zeros(numel // m, m, dtype=torch.bool)
        gmask[torch.arange(numel // m).repeat_interleave(n), index] = True
        gw = torch.zeros(numel // m, m, dtype=values.dtype)
        gw[gmask] = values
        mask, weight = gmask.reshape(il_shape), gw.reshape(il_shape)
        if len(shape) > 2:
            mask, weight = mask.movedim(-1, 1), weight.movedim(-1, 1)
        return weight.contiguous(), mask.contiguous()
    if desc["format"] == "csr":
        crow = tensors["crow"].long()
        rows = torch.arange(len(crow) - 1).repeat_interleave(crow.diff())
        mask = torch.zeros(shape[0], numel // shape[0], dtype=torch.bool)
        mask[rows, tensors["col"].long()] = True
    else:
        mask = unpack_bits(tensors["bitmask"], 1, numel).bool()
    weight = torch.zeros(numel, dtype=values.dtype)
    weight[mask.flatten()] = values
    return weight.reshape(shape), mask.reshape(shape)


def save_dense(model: nn.Module, path: str | Path) -> int:
    """The plain state dict through safetensors; returns the file size in bytes."""
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path).stat().st_size


def save_compressed(
    model: nn.Module, path: str | Path, fmt: str = "auto", metadata: dict[str, str] | None = None
) -> int:
    """Save ``model`` with its masked layers encoded compactly; returns the file size in bytes.
    ``fmt``: ``auto`` (N:M layers as ``nm``, others the smaller of bitmask/CSR), ``bitmask`` or ``csr``."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    described: dict[str, dict] = {}
    for name, module in masked_layers(model).items():
        key = f"{name}.weight" if name else "weight"
        tensors, desc = _encode(state.pop(key), module.sparsity_mask, mask_pattern(module), fmt)
        desc.setdefault("format", "nm")
        described[key] = {**desc, "shape": list(module.weight.shape)}
        state.update({f"{key}::{part}": t.contiguous() for part, t in tensors.items()})
    save_file(state, str(path), metadata={**(metadata or {}), META_KEY: json.dumps(described)})
    return Path(path).stat().st_size


def load_compressed(path: str | Path, make_model: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild the model saved by :func:`save_compressed`: exact weights, masks (and N:M patterns) re-armed."""
    with safe_open(str(path), framework="pt") as f:
        described = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        stored = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v for k, v in stored.items() if "::" not in k}
    masks = {}
    for key, desc in described.items():
        parts = {k.split("::", 1)[1]: v for k, v in stored.items() if k.startswith(f"{key}::")}
        state[key], masks[key] = _decode(parts, desc)
    model = make_model()
    model.load_state_dict(state)
    modules = dict(model.named_modules())
    for key, mask in masks.items():
        desc = described[key]
        pattern = f"{desc['n']}:{desc['m']}" if desc["format"] == "nm" else None
        apply_mask(modules[key.rsplit(".", 1)[0] if "." in key else ""], mask, pattern)
    return model
