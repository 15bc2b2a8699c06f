"""How calibration batches reach any model, Hugging Face models included.

A batch is a tensor (``model(batch)``), a mapping of keyword arguments (``model(**batch)``, e.g. a tokenizer's
output) or a tuple/list whose first element is the input (``model(batch[0])``: the ``(inputs, targets)`` pairs a
DataLoader yields). A model's output is a tensor, or a ``ModelOutput``/dict/tuple from which the tensor
measurements use is taken: ``logits``, else ``last_hidden_state``, else the first tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

OUTPUT_KEYS = ("logits", "last_hidden_state")
OutputFn = Callable[[nn.Module, Any], torch.Tensor]  # the user's ``output_fn(model, batch) -> tensor``


def run_batch(model: nn.Module, batch: Any) -> Any:
    """``model`` applied to one calibration batch (see the module docstring for the batch shapes)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple | list):
        if not batch:
            raise ValueError("a calibration batch given as a tuple/list must hold the model input first, got ()")
        return model(batch[0])
    return model(batch)


def model_input(batch: Any) -> Any:
    """The input part of a batch: a tuple/list's first element, anything else as it is."""
    return batch[0] if isinstance(batch, tuple | list) and batch else batch


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor a model output stands for: itself, ``logits``, ``last_hidden_state`` or the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    for key in OUTPUT_KEYS:
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, tuple | list) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(
        f"the model returned {type(output).__name__}, which holds no tensor; return a tensor, logits or "
        "last_hidden_state, or pass loss="
    )


def output_of(model: nn.Module, batch: Any, output_fn: OutputFn | None = None) -> torch.Tensor:
    """``output_fn(model, batch)`` when the user gave one (for outputs :func:`output_tensor` cannot read), else
    :func:`output_tensor` of :func:`run_batch`."""
    if output_fn is None:
        return output_tensor(run_batch(model, batch))
    out = output_fn(model, batch)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"output_fn(model, batch) must return a tensor, got {type(out).__name__}")
    return out
