"""Save a compressed model and rebuild it, through :mod:`trainlab.compress.storage`.

:func:`save_model` stores every quantized layer's packed object (wrapped with its pruning mask when the layer is
also pruned, :class:`~.sparse_formats.MaskedWeight`), every other masked layer's weight in the smallest sparse
encoding (:func:`~.sparse_formats.encode_sparse`: bitmask, CSR, or N:M for layers pruned N:M), every other tensor
unchanged and tied weights once. :func:`load_model` rebuilds the exact weights, re-arms the masks (with their N:M
patterns) and restores the ties; by default its quantized ``nn.Linear`` layers come back as
:class:`~.quantized_linear.QuantizedLinear` modules on the low-bit kernels (``runtime="float"`` for
``nn.Linear``). :func:`save_compressed` / :func:`load_compressed` are the pruning-only names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from trainlab.compress.formats import Packed
from trainlab.compress.masks import apply_mask, get_mask, mask_pattern, masked_layers
from trainlab.compress.registry import parse_pattern
from trainlab.compress.sparse_formats import (
    MASKED_FORMATS,
    SPARSE_FORMATS,
    BitmaskWeight,
    CSRWeight,
    MaskedWeight,
    NMWeight,
    encode_sparse,
)
from trainlab.compress.storage import dequantized, load, packed_ties, retie, save, shared_aliases, tied_aliases
from trainlab.layer_weights import to_out_major, to_weight_layout

FORMATS = SPARSE_FORMATS
SPARSE_TYPES = (BitmaskWeight, CSRWeight, NMWeight)  # pruned only: no quantized layer to run


def _weight_key(name: str) -> str:
    return f"{name}.weight" if name else "weight"


def _owner(key: str) -> str:
    """The module name of a state-dict key."""
    return key.rsplit(".", 1)[0] if "." in key else ""


def save_dense(model: nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None) -> int:
    """The plain state dict (tied weights once); returns the file size in bytes."""
    return save(path, model.state_dict(), metadata=metadata)


def save_model(
    model: nn.Module,
    path: str | Path,
    packed: Mapping[str, Packed] | None = None,
    *,
    fmt: str = "auto",
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Save ``model`` with the quantized layers' ``packed`` objects (keyed by module name, e.g. a compression
    result's ``weights``) and its other masked layers encoded sparse; returns the file size in bytes. A
    :class:`~.quantized_linear.QuantizedLinear` layer is written from the packed weight it holds (``packed`` need
    not name it). ``fmt`` (masked layers that are not quantized): ``auto`` (N:M layers as ``nm``, others the
    smaller of bitmask/CSR), ``bitmask`` or ``csr``."""
    from trainlab.compress.quantized_linear import float_model, quantized_layers

    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    packed = dict(packed or {})
    runtime = quantized_layers(model)
    if runtime:  # the float form carries the masks and ties the save path reads; codes from the modules
        for name, module in runtime.items():
            packed[name] = module.packed.base if isinstance(module.packed, MaskedWeight) else module.packed
        model = float_model(model)
    modules = dict(model.named_modules())
    unknown = sorted(set(packed) - set(modules))
    if unknown:
        raise ValueError(f"packed names modules the model does not have: {unknown}")
    state = model.state_dict()
    stored: dict[str, Any] = {}
    for name, q in packed.items():
        state.pop(_weight_key(name))
        mask = get_mask(modules[name])
        mask = None if mask is None else to_out_major(modules[name], mask)
        stored[_weight_key(name)] = q if mask is None else MaskedWeight(q, mask, mask_pattern(modules[name]))
    for name, module in masked_layers(model).items():
        if name not in packed:
            pattern = mask_pattern(module)
            nm = parse_pattern(pattern) if pattern is not None else None
            weight, mask = (to_out_major(module, t) for t in (state.pop(_weight_key(name)), module.sparsity_mask))
            stored[_weight_key(name)] = encode_sparse(weight, mask, fmt, nm)
    return save(path, state, stored, metadata, packed_ties(tied_aliases(model), state, stored))


def load_model(path: str | Path, make_model: Callable[[], nn.Module], *, runtime: str | None = "auto") -> nn.Module:
    """A fresh ``make_model()`` with the file's weights (packed layers dequantized, conv kernels reshaped back, in
    the model's dtypes), its masks re-armed and its tied weights tied again; its quantized ``nn.Linear`` layers
    are :class:`~.quantized_linear.QuantizedLinear` modules in mode ``runtime`` (default ``"auto"``: the fastest
    correct path, see that class). ``runtime="float"`` (or None): they stay ``nn.Linear`` layers holding the
    dequantized weights."""
    from trainlab.compress.quantized_linear import _swap, check_runtime

    runtime = check_runtime(runtime)
    state, packed = load(path)
    model = make_model()
    own = model.state_dict()
    full = dequantized(state, packed)
    missing = sorted(set(full) - set(own))
    if missing:
        raise ValueError(f"{path} holds tensors the model from make_model lacks: {missing[:5]}")
    modules = dict(model.named_modules())
    for key in packed:  # packed weights are stored output channels first (a Conv1D's transposed)
        full[key] = to_weight_layout(modules[_owner(key)], full[key])
    model.load_state_dict({k: v.reshape(own[k].shape).to(own[k].dtype) for k, v in full.items()})
    retie(model, shared_aliases(full))
    done = set()
    for key, obj in packed.items():
        if isinstance(obj, MASKED_FORMATS) and id(obj) not in done:
            done.add(id(obj))
            module = modules[_owner(key)]
            apply_mask(module, to_weight_layout(module, obj.mask), obj.pattern)
    if runtime == "float":
        return model
    quantized = {_owner(k): v for k, v in packed.items() if not isinstance(v, SPARSE_TYPES)}
    return _swap(model, {k: v for k, v in quantized.items() if k in modules}, runtime)


def save_compressed(
    model: nn.Module, path: str | Path, fmt: str = "auto", metadata: Mapping[str, str] | None = None
) -> int:
    """Save a pruned ``model`` with its masked layers encoded compactly (:func:`save_model` with nothing
    quantized); returns the file size in bytes."""
    return save_model(model, path, fmt=fmt, metadata=metadata)


def load_compressed(path: str | Path, make_model: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild the model saved by :func:`save_compressed` (:func:`load_model`)."""
    return load_model(path, make_model, runtime="float")
