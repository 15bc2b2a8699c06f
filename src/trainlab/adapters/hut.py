"""HUT: the updated weight is a Hadamard transformation of the original, W' = W ⊙ (1 + U Vᵀ).

The paper (Zhang, Zhou & Chen, 2024) builds W' directly from W with "the Hadamard transformation with two low-rank
matrices"; no official code was found, so the exact form used here is W' = W ⊙ (J + U Vᵀ) with U (out x r)
Kaiming-uniform and V (in x r) zero, i.e. ΔW = W ⊙ (U Vᵀ): unchanged output at init, an update correlated with W
whose rank can reach rank(W)·r at LoRA's parameter count. W' is materialized once per forward (one dense matmul).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainlab.adapters.layer import AdapterLayer
from trainlab.adapters.lora import lora_count
from trainlab.adapters.registry import AdapterSpec, Field, register_adapter

HUT_PAPER = (
    "HUT: A More Computation Efficient Fine-Tuning Method With Hadamard Updated Transformation (Zhang et al., 2024)"
)


class HUTLayer(AdapterLayer):
    weight_dependent = True
    fused_forward = True

    def __init__(self, base: nn.Module, *, r: int) -> None:
        super().__init__(base)
        w = self.base_weight()
        self.hut_U = nn.Parameter(torch.empty(self.out_features, r, dtype=w.dtype, device=w.device))
        self.hut_V = nn.Parameter(torch.zeros(self.in_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.hut_U, a=math.sqrt(5))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (self.hut_U @ self.hut_V.T)

    def restore_weight(self, merged: torch.Tensor) -> torch.Tensor:
        factor = 1 + self.hut_U @ self.hut_V.T
        if bool((factor.abs() < 1e-6).any()):
            raise ValueError("cannot unmerge HUT: 1 + U Vᵀ has (near-)zero entries, W is not recoverable")
        return merged / factor


register_adapter(
    AdapterSpec(
        name="hut",
        paper=HUT_PAPER,
        summary="W' = W ⊙ (1 + U Vᵀ): a Hadamard update correlated with W, V = 0 at init (exact form unconfirmed)",
        fields={"r": Field(8, 1, 4096, integer=True)},  # no published default: LoRA's r, equal parameter count
        layer_class=HUTLayer,
        layer_types=("linear", "conv1d", "conv2d"),
        count=lora_count,
    )
)
