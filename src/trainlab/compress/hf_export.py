"""Export a compressed Hugging Face model as a directory that ``transformers`` loads offline and runs.

Uniformly quantized ``nn.Linear`` weights (:class:`~trainlab.compress.quant.grids.QuantizedWeight`) are written in
the ``compressed-tensors`` ``pack-quantized`` format by compressed-tensors' own ``ModelCompressor``, with its
quantization config in ``config.json``; ``AutoModel.from_pretrained(directory)`` decompresses them on load to
exactly trainlab's dequantized weights. The mapping of trainlab's codes onto that format:

* compressed-tensors stores signed integers ``q`` in ``[-2**(b-1), 2**(b-1) - 1]`` and dequantizes
  ``(q - zp) * scale``; trainlab's unsigned code ``c`` of a symmetric grid (zero point ``2**(b-1)``) is
  ``q = c - 2**(b-1)`` with ``zp = 0`` (not stored). Asymmetric grids are refused: compressed-tensors 0.20 packs
  their zero points on save, but transformers' loader builds them unpacked and rejects the file;
* a grid per output channel is strategy ``channel``, per group of ``g`` inputs strategy ``group`` with
  ``group_size = g`` (compressed-tensors needs the inputs to be a whole number of groups);
* scales are stored in the model's dtype, as compressed-tensors lays them out (trainlab's float16 scales are
  exact in float32 and float16).

Pruned weights are written dense (zeros included): compressed-tensors 0.20 no longer writes its sparse-bitmask
format. A layer pruned and then quantized gets the zero code at its pruned positions (exactly 0 on symmetric
grids), so its zeros survive. Formats with no compressed-tensors equivalent (power grids, trit-planes, vector
quantization, outliers, per-column bits) raise a ValueError; :func:`trainlab.compress.storage.save` keeps them in
trainlab's own format.
Needs the ``hf`` extra (``transformers`` and ``compressed-tensors``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainlab.compress.formats import Packed
from trainlab.compress.masks import get_mask
from trainlab.compress.quant.grids import QuantizedWeight
from trainlab.compress.sparse_formats import BitmaskWeight, CSRWeight, MaskedWeight, NMWeight
from trainlab.layer_weights import is_transposed_linear

NO_EQUIVALENT = {
    "power": "a power-companding grid (NUPES)",
    "trits": "trit-planes (PTQTP)",
    "vq": "vector quantization with codebooks (VPTQ)",
    "outliers": "a grid with float16 outliers (GWQ)",
    "column-bits": "per-column bit-widths (BAQ)",
}
DTYPES = (torch.float32, torch.float16)


def _layer_name(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _scheme_key(q: QuantizedWeight) -> tuple[int, bool, int | None]:
    return q.bits, q.symmetric, q.group_size


def _check(model: nn.Module, packed: Mapping[str, Packed]) -> tuple[dict[str, QuantizedWeight], dict[str, Packed]]:
    """``(quantized Linear layers, pruned layers)`` by module name; ValueError for anything the format lacks."""
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        raise ValueError(
            f"model must be a Hugging Face PreTrainedModel (with save_pretrained and config), got "
            f"{type(model).__name__}; save other models with trainlab.compress.storage.save"
        )
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    quantized: dict[str, QuantizedWeight] = {}
    pruned: dict[str, Packed] = {}
    for key, q in packed.items():
        name = _layer_name(key)
        module = modules.get(name)
        if module is None:
            raise ValueError(f"packed[{key!r}]: the model has no module {name!r}")
        if is_transposed_linear(module):
            raise ValueError(
                f"packed[{key!r}]: {name!r} is a Hugging Face Conv1D (weight stored (in, out)); this export writes "
                "compressed-tensors' nn.Linear layout only, so keep trainlab's own format (CompressionResult.save) "
                "for GPT-2 style models"
            )
        kind = getattr(q, "kind", type(q).__name__)
        if kind in NO_EQUIVALENT:
            raise ValueError(
                f"packed[{key!r}] is {NO_EQUIVALENT[kind]}, which has no compressed-tensors equivalent; "
                "keep trainlab's own format (trainlab.compress.storage.save / save_quantized_model) for this model"
            )
        if isinstance(q, BitmaskWeight | CSRWeight | NMWeight):
            pruned[name] = q
            continue
        mask = get_mask(module)
        if isinstance(q, MaskedWeight):
            q, mask = q.base, q.mask
        if type(q) is not QuantizedWeight:
            raise ValueError(f"packed[{key!r}] is a {type(q).__name__}; the Hugging Face export writes uniform grids")
        if not q.symmetric:
            raise ValueError(
                f"packed[{key!r}] is an asymmetric grid: compressed-tensors writes its zero points packed, but "
                "transformers' loader expects them unpacked and refuses the file (vllm-project/llm-compressor#1618); "
                "quantize symmetric for this export or keep trainlab's own format (trainlab.compress.storage.save)"
            )
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"packed[{key!r}]: compressed-tensors packs nn.Linear weights; {name!r} is a {type(module).__name__}"
            )
        if q.group_size is not None and module.in_features % q.group_size:
            raise ValueError(
                f"packed[{key!r}]: compressed-tensors needs the {module.in_features} inputs to be whole groups of "
                f"group_size {q.group_size}"
            )
        if module.weight.dtype not in DTYPES:
            raise ValueError(
                f"packed[{key!r}]: the layer's weight is {module.weight.dtype}; trainlab's float16 scales are exact "
                "only in float32 or float16 models"
            )
        tied = [n for n, p in params.items() if p is module.weight and n != f"{name}.weight"]
        if tied:
            raise ValueError(
                f"packed[{key!r}]: the weight is tied to {tied}; leave tied weights unquantized for this export"
            )
        if mask is not None:  # pruned, then quantized: the zero code dequantizes to exactly 0 (symmetric grids)
            q = dataclasses.replace(q, codes=q.codes.masked_fill(~mask.reshape(q.shape), 2 ** (q.bits - 1)))
        quantized[name] = q
    return quantized, pruned


def _quantization_config(quantized: Mapping[str, QuantizedWeight]) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[tuple[int, bool, int | None], list[str]] = {}
    for name, q in quantized.items():
        groups.setdefault(_scheme_key(q), []).append(name)
    schemes = {}
    for i, ((bits, symmetric, group_size), names) in enumerate(groups.items()):
        args = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=symmetric,
            strategy="channel" if group_size is None else "group",
            group_size=group_size,
        )
        schemes[f"group_{i}"] = QuantizationScheme(targets=names, weights=args)
    return QuantizationConfig(config_groups=schemes, format="pack-quantized", quantization_status="frozen")


def _load_codes(model: nn.Module, quantized: Mapping[str, QuantizedWeight], pruned: Mapping[str, Packed]) -> None:
    """Put each layer's dequantized weight, scales and signed zero points into ``model`` (initialized for
    quantization by compressed-tensors)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, q in quantized.items():
            module = modules[name]
            dtype = module.weight.dtype
            offset = 2 ** (q.bits - 1)
            module.weight.copy_(q.dequantize(torch.float32).to(dtype))
            module.weight_scale.copy_(q.scale.to(dtype))
            zero = getattr(module, "weight_zero_point", None)
            if zero is not None:  # symmetric: compressed-tensors' zero point is 0 (and is dropped on save)
                zero.copy_((q.zero.to(torch.int16) - offset).to(zero.dtype))
        for name, p in pruned.items():
            modules[name].weight.copy_(p.dequantize(modules[name].weight.dtype))


def _check_packed_codes(model: nn.Module, quantized: Mapping[str, QuantizedWeight]) -> None:
    """Unpack what compressed-tensors wrote and compare with trainlab's codes: the export is exact or it fails."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    modules = dict(model.named_modules())
    for name, q in quantized.items():
        codes = unpack_from_int32(modules[name].weight_packed, q.bits, torch.Size(q.shape))
        if not torch.equal(codes.to(torch.int16) + 2 ** (q.bits - 1), q.codes.to(torch.int16)):
            raise RuntimeError(f"compressed-tensors packed layer {name!r} to codes that differ from trainlab's")


def _replace_dir(tmp: Path, directory: Path) -> None:
    """Move the finished ``tmp`` folder to ``directory``, replacing an existing one only once the new is complete."""
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
        os.replace(directory, old / directory.name)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old)


def save_pretrained_compressed(
    model: nn.Module,
    packed: Mapping[str, Packed],
    directory: str | Path,
    *,
    tokenizer: Any = None,
) -> Path:
    """Write ``model`` (a Hugging Face ``PreTrainedModel``) to ``directory`` with the layers in ``packed`` (keyed by
    module name or ``"{module}.weight"``: uniform grids, or pruned layers) in the compressed-tensors format, so
    that ``transformers.AutoModel.from_pretrained(directory)`` (the model's own class) loads it offline. The
    packed layers' weights come from ``packed``; every other tensor from ``model``, which is not modified.
    ``tokenizer``: also saved into the directory when given. Returns the directory."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import apply_quantization_config
    except ImportError as err:  # pragma: no cover - the hf extra is part of the test extra
        raise ImportError("the Hugging Face export needs compressed-tensors: pip install trainlab[hf]") from err
    from trainlab.compress.quantized_linear import float_model

    model = float_model(model)  # QuantizedLinear layers (compress's default) back to nn.Linear
    quantized, pruned = _check(model, packed)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    out = copy.deepcopy(model)
    if quantized:
        apply_quantization_config(out, _quantization_config(quantized), show_progress=False)
    _load_codes(out, quantized, pruned)
    compressor = None
    if quantized:
        compressor = ModelCompressor.from_pretrained_model(out, quantization_format="pack-quantized")
        compressor.compress_model(out)
        _check_packed_codes(out, quantized)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        out.save_pretrained(tmp)
        if compressor is not None:
            compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
