"""Export LoRA-family adapters in PEFT's file layout, so ``peft.PeftModel.from_pretrained`` reproduces them.

Every layer becomes a PEFT LoRA pair with scaling 1 (``lora_alpha = r`` per layer through ``rank_pattern`` and
``alpha_pattern``) and our scale folded into ``lora_B``:

- ``lora``: ``A``, ``(α/r)·B``;
- ``lora-ga``: rank 2r, ``[A; A₀]`` and ``(α/r)·[B, −B₀]`` (the init offset, so it applies to the original base);
- ``adalora``: the kept singular triplets after rank pruning, ``Q[kept]`` and ``P[:, kept]·diag(λ[kept])·s/r₀``;
  layers pruned to rank 0 are left out of ``target_modules``.

WeLore replaces the dense weight by its factors, which PEFT's additive LoRA on the original base cannot express at
low rank, so it (and the non-LoRA methods) raise. PEFT itself is not needed to write the files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from trainlab.adapters.adalora import AdaLoRALayer
from trainlab.adapters.attach import adapter_info, adapter_layers
from trainlab.adapters.io import atomic_write
from trainlab.adapters.layer import AdapterLayer
from trainlab.adapters.lora import LoRALayer
from trainlab.adapters.lora_ga import LoRAGALayer

PEFT_METHODS = ("lora", "lora-ga", "adalora")


@torch.no_grad()
def peft_factors(layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``ΔW = B @ A`` exactly (scale folded into B), A: (k x in), B: (out x k)."""
    if isinstance(layer, LoRAGALayer):
        return torch.cat([layer.lora_A, layer.init_A]), torch.cat([layer.lora_B, -layer.init_B], 1) * layer.scaling
    if isinstance(layer, LoRALayer):
        return layer.lora_A.clone(), layer.lora_B * layer.scaling
    if isinstance(layer, AdaLoRALayer):
        kept = layer.lora_E.view(-1) != 0
        return layer.lora_A[kept].clone(), layer.lora_B[:, kept] * layer.lora_E.view(-1)[kept] * layer.factor()
    raise TypeError(f"{type(layer).__name__} has no PEFT LoRA form")


def _shaped(layer: AdapterLayer, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if layer.kind == "conv2d":  # PEFT: lora_A is a conv with the base kernel, lora_B a 1x1 conv
        if layer.base.groups != 1:
            raise ValueError("PEFT's LoRA Conv2d export needs groups=1")
        return a.reshape(a.shape[0], *layer.base.weight.shape[1:]), b.reshape(*b.shape, 1, 1)
    return a, b


def export_peft(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT LoRA) for ``model``'s adapters."""
    info = adapter_info(model)
    if info["method"] not in PEFT_METHODS:
        raise ValueError(
            f"{info['method']} adapters have no PEFT LoRA form; export_peft supports {', '.join(PEFT_METHODS)}"
        )
    layers = adapter_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("unmerge the adapters before exporting them")
    tensors, ranks = {}, {}
    for name, layer in layers.items():
        a, b = peft_factors(layer)
        if a.shape[0] == 0:
            continue  # AdaLoRA pruned this layer to rank 0: nothing to add
        a, b = _shaped(layer, a, b)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().cpu()
        ranks[name] = int(a.shape[0])
    if not ranks:
        raise ValueError("every adapter layer has rank 0 (AdaLoRA pruned them all): there is nothing to export")
    kinds = {layers[n].kind for n in ranks}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted(ranks),
        "r": max(ranks.values()),
        "lora_alpha": max(ranks.values()),
        "rank_pattern": ranks,
        "alpha_pattern": dict(ranks),  # alpha = r: PEFT's scaling is exactly 1
        "lora_dropout": float(info["config"].get("dropout", 0.0)),
        "fan_in_fan_out": kinds == {"conv1d"},
        "bias": "none",
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return out
