"""Pruned linear layers that run a sparse kernel where it is faster than the dense matmul, and only there.

:class:`SparseLinear` stores a pruned weight either as ``torch.sparse_csr`` (``y = (W x^T)^T``) or dense, chosen
once from the weight's sparsity and size (``.kernel``, with ``.reason``). The rule comes from
``benchmarks/sparse_inference.py`` (torch 2.13, CPU, 1 thread, results in ``benchmarks/results/``): with 32 rows
of x (e.g. a batch of tokens), CSR beats dense from 90% sparsity on every layer of at least 384x128 weights
(0.43-0.86x the dense time) and loses below 70%; on a 128x128 layer it loses even at 95%. With a single row of x,
CSR wins only at 95% on the large MiniLM layers (0.85x on 1536x384) and loses elsewhere, so for one-row inference
pass ``min_sparsity=0.95``. :func:`sparse_runtime_model` swaps every masked ``nn.Linear`` of a model.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from trainlab.compress.masks import get_mask

CSR_MIN_SPARSITY = 0.9  # measured crossover at 32 rows (see the module docstring)
CSR_MIN_WEIGHTS = 384 * 128  # smaller layers (128x128) lost at every sparsity measured


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return float(value)


class SparseLinear(nn.Module):
    """``y = x W^T + b`` for a pruned ``W`` (``(out_features, in_features)``; zeros are the pruned entries).

    ``kernel`` is ``"csr"`` when the fraction of zeros is at least ``min_sparsity`` and the layer has at least
    ``min_weights`` weights, else ``"dense"``; ``.reason`` says which rule decided. Inference only: the weight
    takes no gradient."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        min_sparsity: float = CSR_MIN_SPARSITY,
        min_weights: int = CSR_MIN_WEIGHTS,
    ) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a 2-D floating tensor, got {getattr(weight, 'shape', weight)!r}")
        _check_fraction("min_sparsity", min_sparsity)
        if isinstance(min_weights, bool) or not isinstance(min_weights, int) or min_weights < 0:
            raise ValueError(f"min_weights must be an integer >= 0, got {min_weights!r}")
        weight = weight.detach()
        self.out_features, self.in_features = weight.shape
        self.sparsity = float((weight == 0).sum()) / max(weight.numel(), 1)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if self.sparsity < min_sparsity:
            self.kernel = "dense"
            self.reason = f"sparsity {self.sparsity:.3f} < {min_sparsity} (CSR is slower than dense below it)"
        elif weight.numel() < min_weights:
            self.kernel = "dense"
            self.reason = f"{weight.numel()} weights < {min_weights} (CSR is slower than dense on small layers)"
        else:
            self.kernel = "csr"
            self.reason = f"sparsity {self.sparsity:.3f} >= {min_sparsity} and {weight.numel()} weights"
        if self.kernel == "csr":
            with warnings.catch_warnings():  # torch marks CSR support as beta on every conversion
                warnings.simplefilter("ignore", UserWarning)
                self.register_buffer("weight", weight.to_sparse_csr())
        else:
            self.register_buffer("weight", weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kernel == "dense":
            return F.linear(x, self.weight.to(x.dtype), bias)
        flat = x.reshape(-1, self.in_features)
        y = (self.weight @ flat.T.to(self.weight.dtype)).T.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, sparsity={self.sparsity:.3f}, "
            f"kernel={self.kernel}"
        )


def sparse_runtime_model(
    model: nn.Module, *, min_sparsity: float = CSR_MIN_SPARSITY, min_weights: int = CSR_MIN_WEIGHTS
) -> nn.Module:
    """A copy of ``model`` whose masked (pruned) ``nn.Linear`` layers are :class:`SparseLinear` modules;
    ``model`` is not modified."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    for name, module in modules.items():
        if name and isinstance(module, nn.Linear) and get_mask(module) is not None:
            parent, _, child = name.rpartition(".")
            layer = SparseLinear(module.weight, module.bias, min_sparsity=min_sparsity, min_weights=min_weights)
            setattr(modules[parent], child, layer)
    return out
