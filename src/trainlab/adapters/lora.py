"""LoRA: ΔW = (α/r)·B A with A (r x in) Kaiming-uniform and B (out x r) zero, so the output is unchanged at init."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.adapters.layer import AdapterLayer
from trainlab.adapters.registry import AdapterSpec, Field, register_adapter

LORA_PAPER = "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022)"

# r=8, alpha=16: the LoRA paper's RoBERTa/GLUE settings (loralib's examples), also LoRA-GA's.
LORA_FIELDS = {
    "r": Field(8, 1, 4096, integer=True),
    "alpha": Field(16.0, 0.0, 1e6),
    "dropout": Field(0.0, 0.0, 0.99),
}


class LoRALayer(AdapterLayer):
    def __init__(self, base: nn.Module, *, r: int, alpha: float, dropout: float) -> None:
        super().__init__(base)
        if r > min(self.in_features, self.out_features):
            raise ValueError(f"r={r} exceeds min(in, out)={min(self.in_features, self.out_features)} of this layer")
        w = self.base_weight()
        self.r = r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, as the LoRA paper's code
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        if self.kind == "conv2d":
            return self.apply_weight(x, self.delta_weight(self.base_weight()))
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def lora_count(weight: torch.Tensor, config: Mapping[str, Any]) -> int:
    out_features, in_features = weight.shape
    return config["r"] * (in_features + out_features)


register_adapter(
    AdapterSpec(
        name="lora",
        paper=LORA_PAPER,
        summary="frozen W plus a trainable rank-r product (α/r)·B A, B = 0 at init",
        fields=LORA_FIELDS,
        layer_class=LoRALayer,
        layer_types=("linear", "conv1d", "conv2d"),
        count=lora_count,
        peft="lora",
    )
)
