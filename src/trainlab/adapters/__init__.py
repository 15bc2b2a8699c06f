"""Parameter-efficient fine-tuning: adapter layers that wrap any model's layers, never fork the model.

``attach(model, method, targets=[...], **config)`` returns a copy of ``model`` whose matching ``nn.Linear`` /
Hugging Face ``Conv1D`` / ``nn.Conv2d`` layers are adapter layers (frozen base + trainable delta); ``attach_`` does
the same in place. ``prepare`` runs data-dependent inits (LoRA-GA), ``training_callback`` gives the per-step hooks
(AdaLoRA rank pruning, SaRA progressive masks, SNELL allocation), ``merge``/``unmerge``/``merged_copy`` fold deltas,
``save_adapter``/``load_adapter`` keep only adapter tensors, ``export_peft`` writes PEFT's LoRA layout. Methods:
``adapter_names()``; each one's paper, defaults and ranges: ``get_spec(name)``.
"""

from trainlab.adapters import adalora, bone, hut, lora, lora_ga, s2ft, sara, snell, welore  # noqa: F401 (register)
from trainlab.adapters.attach import (
    TrainingCallback,
    adapter_info,
    adapter_layers,
    attach,
    attach_,
    count_trainable,
    find_targets,
    merge,
    merged_copy,
    prepare,
    trainable_parameters,
    training_callback,
    unmerge,
)
from trainlab.adapters.io import load_adapter, save_adapter
from trainlab.adapters.layer import AdapterLayer
from trainlab.adapters.peft_export import export_peft, peft_factors
from trainlab.adapters.registry import AdapterSpec, Field, adapter_names, get_spec, register_adapter

__all__ = [
    "AdapterLayer",
    "AdapterSpec",
    "Field",
    "TrainingCallback",
    "adapter_info",
    "adapter_layers",
    "adapter_names",
    "attach",
    "attach_",
    "count_trainable",
    "export_peft",
    "find_targets",
    "get_spec",
    "load_adapter",
    "merge",
    "merged_copy",
    "peft_factors",
    "prepare",
    "register_adapter",
    "save_adapter",
    "trainable_parameters",
    "training_callback",
    "unmerge",
]
