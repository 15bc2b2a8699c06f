"""Saving and loading only the adapter: its tensors (safetensors) and its method and config (JSON), written
atomically (temporary file, then ``os.replace``). The base model is not saved; load onto the same base model.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from trainlab.adapters.attach import adapter_info, adapter_layers, install_layers
from trainlab.adapters.layer import apply_permutations_
from trainlab.adapters.registry import get_spec
from trainlab.runtime import atomic_path

CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter.safetensors"
FORMAT = "trainlab-adapter/1"


def atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)`` and move the result onto ``path`` in one step."""
    with atomic_path(path) as tmp:
        write(str(tmp))


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter of ``model`` (tensors + config) into ``directory``; the base weights are not written."""
    info = adapter_info(model)
    layers = adapter_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("unmerge the adapters before saving them (merged deltas live in the base weights)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{name}.{key}": t.detach().contiguous().cpu()
        for name, layer in layers.items()
        for key, t in layer.adapter_state().items()
    }
    config = {
        "format": FORMAT,
        "method": info["method"],
        "config": info["config"],
        "layers": {name: layer.layer_kwargs() for name, layer in layers.items()},
        "permutations": info.get("permutations", {}),
    }
    atomic_write(out / TENSORS_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return out


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """A copy of the plain ``model`` with the adapter saved in ``directory`` attached and loaded."""
    path = Path(directory)
    if not (path / CONFIG_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no trainlab adapter ({CONFIG_FILE} and {TENSORS_FILE} expected)")
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE} is not a {FORMAT} file (format {config.get('format')!r})")
    spec = get_spec(config["method"])
    method_config = spec.resolve(config["config"])
    names = list(config["layers"]) + list(config.get("permutations", {}))
    missing = [n for n in names if n not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"the model has no module(s) {missing} that the adapter in {path} was trained on")
    adapted = copy.deepcopy(model)
    permutations = config.get("permutations", {})
    apply_permutations_(adapted, permutations)  # S2FT's co-permutation, repeated on the plain base
    adapted = install_layers(adapted, spec.name, method_config, config["layers"], permutations)
    tensors = load_file(str(path / TENSORS_FILE))
    for name, layer in adapter_layers(adapted).items():
        prefix = f"{name}."
        layer.load_adapter_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    return adapted
