"""Compact export of pruned models and the loader that rebuilds them, through :mod:`trainlab.compress.storage`.

Each masked layer's weight is stored in the smallest sparse encoding (:func:`..sparse_formats.encode_sparse`:
bitmask, CSR, or N:M for layers pruned N:M); every other tensor is stored unchanged, tied weights once.
:func:`load_compressed` rebuilds the exact weights, re-arms the masks (with their N:M patterns) and restores
the ties.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from trainlab.compress.masks import apply_mask, mask_pattern, masked_layers
from trainlab.compress.registry import parse_pattern
from trainlab.compress.sparse_formats import SPARSE_FORMATS, encode_sparse
from trainlab.compress.storage import dequantized, load, packed_ties, retie, save, shared_aliases, tied_aliases

FORMATS = SPARSE_FORMATS


def save_dense(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> int:
    """The plain state dict (tied weights once); returns the file size in bytes."""
    return save(path, model.state_dict(), metadata=metadata)


def save_compressed(
    model: nn.Module, path: str | Path, fmt: str = "auto", metadata: dict[str, str] | None = None
) -> int:
    """Save ``model`` with its masked layers encoded compactly; returns the file size in bytes.
    ``fmt``: ``auto`` (N:M layers as ``nm``, others the smaller of bitmask/CSR), ``bitmask`` or ``csr``."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    state = model.state_dict()
    packed = {}
    for name, module in masked_layers(model).items():
        key = f"{name}.weight" if name else "weight"
        pattern = mask_pattern(module)
        nm = parse_pattern(pattern) if pattern is not None else None
        packed[key] = encode_sparse(state.pop(key), module.sparsity_mask, fmt, nm)
    return save(path, state, packed, metadata, packed_ties(tied_aliases(model), state, packed))


def load_compressed(path: str | Path, make_model: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild the model saved by :func:`save_compressed`: exact weights, masks (and N:M patterns) re-armed,
    tied weights tied again."""
    state, packed = load(path)
    model = make_model()
    full = dequantized(state, packed)
    model.load_state_dict(full)
    retie(model, shared_aliases(full))
    modules = dict(model.named_modules())
    done = set()
    for key, enc in packed.items():
        if id(enc) in done:
            continue
        done.add(id(enc))
        apply_mask(modules[key.rsplit(".", 1)[0] if "." in key else ""], enc.mask, enc.pattern)
    return model
