"""One view of a weight layer as the ``(out, in)`` matrix of ``F.linear``, whatever its storage layout.

``nn.Linear`` stores ``(out, in)``; a convolution ``(out, in, *kernel)``, viewed as ``(out, in * kernel area)`` in
``F.unfold``'s column order; Hugging Face's GPT-2 style ``Conv1D`` (``y = x @ W + b``) stores the transpose,
``(in, out)``. Methods that work on the matrix read it with :func:`weight_matrix`, turn a matrix-shaped result back
into the module's layout with :func:`to_weight_layout`, and never special-case a layer type themselves.
"""

from __future__ import annotations

import torch
from torch import nn


def is_transposed_linear(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (a linear layer whose weight is stored ``(in, out)``)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def layer_type(module: nn.Module) -> str | None:
    """'linear', 'conv1d' (Hugging Face's transposed linear) or 'conv2d'; None for anything else."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if is_transposed_linear(module):
        return "conv1d"
    return None


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as an ``(out, -1)`` matrix view (no copy; convolution kernels flattened)."""
    weight = module.weight
    if is_transposed_linear(module):
        return weight.t()
    return weight.flatten(1) if weight.dim() > 2 else weight


def to_weight_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """A tensor in :func:`weight_matrix`'s ``(out, -1)`` layout (a quantized weight, a mask) in the module's own
    weight layout, so it can be copied into or multiplied with ``module.weight``."""
    if is_transposed_linear(module):
        return matrix.reshape(module.weight.shape[::-1]).t()
    return matrix.reshape(module.weight.shape)


def to_out_major(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor in the module's weight layout (its weight, a mask) with output channels first: transposed for a
    ``Conv1D``, unchanged otherwise (a reshape of :func:`weight_matrix`'s layout, which :func:`to_weight_layout`
    undoes)."""
    return tensor.t() if is_transposed_linear(module) else tensor
