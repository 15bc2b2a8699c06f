"""One save and one load for compressed models: plain tensors plus packed objects, through safetensors.

A file holds the plain tensors (biases, norms, dense weights) under their own names, each packed object's
tensors under ``"{name}::{part}"`` (:meth:`~trainlab.compress.formats.Packed.to_tensors`), and one metadata key,
``trainlab.format``: JSON ``{"packed": {name: {"kind": ..., **metadata}}, "aliases": {name: target}}``. Any other
metadata (the method, the plan, ...) is the caller's, kept as given.

Tied weights (one tensor under several names, e.g. an ``lm_head`` sharing the embedding's weight) are stored once:
the other names are aliases, recorded in the metadata, and on load they hold the very same tensor (or packed
object) as their target, so :func:`retie` can restore the tie in a fresh model. Files are written atomically
(a temporary file in the same folder, then ``os.replace``).

A quantizer's packed type is registered (:func:`~trainlab.compress.formats.register_format`) in the quantizer's
own module, which the compression registry imports before a file is read: a new quantizer with a new storage
format is one file plus its test.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from trainlab.compress import sparse_formats  # noqa: F401  (registers bitmask, csr, nm)
from trainlab.compress.formats import SEP, Packed, format_of
from trainlab.compress.registry import compressor_names
from trainlab.runtime import atomic_path

META_KEY = "trainlab.format"
LEGACY_KEYS = ("trainlab.quant", "trainlab.sparse", "trainlab.baq")


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.numel() > 0  # empty tensors have no memory to share
        and a.device == b.device
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def shared_aliases(tensors: Mapping[str, Any]) -> dict[str, str]:
    """``{name: first name}`` for every entry that is the same object as (tensors: the same view of the same
    memory as) an earlier one; the first name of each group is the target."""
    aliases: dict[str, str] = {}
    seen: list[tuple[str, Any]] = []
    for name, value in tensors.items():
        for first, other in seen:
            if value is other or (
                isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and _same_tensor(value, other)
            ):
                aliases[name] = first
                break
        else:
            seen.append((name, value))
    return aliases


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{state-dict key: first key}`` for the keys of ``model`` that name a tensor already named earlier (tied
    weights, such as an output layer sharing the embedding's weight)."""
    return shared_aliases(model.state_dict(keep_vars=True))


def packed_ties(
    ties: Mapping[str, str], state: dict[str, torch.Tensor], packed: Mapping[str, Packed]
) -> dict[str, str]:
    """Aliases for the names tied (``ties``, e.g. :func:`tied_aliases`) to a packed weight: each such name is
    removed from ``state`` and mapped to the packed name of its group (ties among plain tensors are left to
    :func:`save`, which sees the shared memory itself)."""
    groups: dict[str, list[str]] = {}
    for alias, target in ties.items():
        groups.setdefault(target, [target]).append(alias)
    aliases = {}
    for members in groups.values():
        owner = next((m for m in members if m in packed), None)
        for m in members:
            if owner is not None and m != owner and m not in packed:
                state.pop(m, None)
                aliases[m] = owner
    return aliases


def _check_user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"metadata must map strings to strings; bad entries: {bad}")
    if META_KEY in metadata:
        raise ValueError(f"metadata must not contain the reserved key {META_KEY!r}")
    return metadata


def _write_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> int:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path.stat().st_size


def save(
    path: str | Path,
    state: Mapping[str, torch.Tensor],
    packed: Mapping[str, Packed] | None = None,
    metadata: Mapping[str, str] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> int:
    """Write the plain tensors ``state`` and the ``packed`` objects to ``path``; returns the file's size in bytes.

    Names that hold the same tensor (or packed object) as an earlier name are stored once, as aliases; pass
    ``aliases`` (``{name: target}``, names absent from both mappings) for ties the tensors cannot show, such as an
    embedding tied to a layer that was quantized. ``metadata``: extra string entries for the file's header."""
    packed = dict(packed or {})
    state = dict(state)
    meta = _check_user_metadata(metadata)
    clash = sorted(set(state) & set(packed))
    bad = [n for n in [*state, *packed] if SEP in n]
    if clash or bad:
        raise ValueError(
            f"names must not contain {SEP!r} nor be both a state tensor and a packed object: {clash or bad}"
        )
    wrong = {n: type(p).__name__ for n, p in packed.items() if not isinstance(p, Packed)}
    if wrong:
        raise ValueError(
            f"packed values must be registered packed formats (see trainlab.compress.formats); got {wrong}"
        )
    links = dict(aliases or {})
    for name, target in links.items():
        if name in state or name in packed or (target not in state and target not in packed):
            raise ValueError(
                f"aliases[{name!r}] = {target!r}: the alias must be a new name and its target a stored one"
            )
    links.update(shared_aliases(state))
    links.update(shared_aliases(packed))
    for name, target in links.items():  # point every alias at a stored name
        while target in links:
            target = links[target]
        links[name] = target
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name not in links:
            tensors[name] = t.detach().contiguous()
    described: dict[str, dict[str, Any]] = {}
    for name, obj in packed.items():
        if name in links:
            continue
        prefix = f"{name}{SEP}"
        try:
            parts = obj.to_tensors(prefix)
        except ValueError as err:
            raise ValueError(f"packed[{name!r}] ({obj.kind}): {err}") from err
        stray = [k for k in parts if not k.startswith(prefix)]
        if stray:
            raise ValueError(f"{type(obj).__name__}.to_tensors returned keys outside its prefix {prefix!r}: {stray}")
        tensors.update(parts)
        described[name] = {"kind": obj.kind, **obj.metadata()}
    # tensors that overlap in memory without being the same view: store each its own copy
    owners: dict[int, str] = {}
    for k, t in list(tensors.items()):
        ptr = t.untyped_storage().data_ptr()
        if ptr and owners.setdefault(ptr, k) != k:
            tensors[k] = t.clone()
    meta[META_KEY] = json.dumps({"packed": described, "aliases": links}, separators=(",", ":"))
    return _write_atomic(tensors, Path(path), meta)


def _header(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Packed]]:
    """``(plain tensors, packed objects)`` from a file written by :func:`save` (or any plain safetensors file:
    all its tensors, nothing packed). An alias holds the same tensor or object as its target."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    legacy = [k for k in LEGACY_KEYS if k in header]
    if META_KEY not in header and legacy:
        raise ValueError(f"{path} was written by an older trainlab ({legacy[0]!r} metadata); export it again")
    described = json.loads(header.get(META_KEY, '{"packed": {}, "aliases": {}}'))
    if described["packed"]:
        compressor_names()  # imports every quantizer module, and with it the packed format it registers
    state = {k: v for k, v in stored.items() if SEP not in k}
    packed: dict[str, Packed] = {}
    for name, desc in described["packed"].items():
        prefix = f"{name}{SEP}"
        parts = {k: v for k, v in stored.items() if k.startswith(prefix)}
        meta = {k: v for k, v in desc.items() if k != "kind"}
        packed[name] = format_of(desc["kind"]).from_tensors(parts, prefix, meta)
    for name, target in described["aliases"].items():
        if target in packed:
            packed[name] = packed[target]
        else:
            state[name] = state[target]
    return state, packed


def read_metadata(path: str | Path) -> dict[str, str]:
    """The caller's metadata of a file written by :func:`save` (without the format's own key)."""
    return {k: v for k, v in _header(path).items() if k != META_KEY}


def dequantized(
    state: Mapping[str, torch.Tensor], packed: Mapping[str, Packed], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Plain tensors and every packed object dequantized (``dtype`` as each format's default when None); an alias
    of a packed object gets the same dequantized tensor as its target."""
    done: dict[int, torch.Tensor] = {}
    out = dict(state)
    for name, obj in packed.items():
        if id(obj) not in done:
            done[id(obj)] = obj.dequantize(dtype)
        out[name] = done[id(obj)]
    return out


def retie(model: nn.Module, aliases: Mapping[str, str]) -> nn.Module:
    """Make each alias parameter of ``model`` the very Parameter of its target (restores tied weights after
    ``load_state_dict`` into a model built untied); returns ``model``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, target in aliases.items():
        if name in params and target in params and params[name] is not params[target]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, params[target])
    return model
