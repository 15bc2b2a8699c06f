"""Bone/Bat: block affine update guided by the weight itself.

W is cut into r x r blocks W_ij (i over output blocks, j over input blocks); one trainable r x r matrix b_i per
output block, shared by all input blocks, gives ``W'_ij = W_ij (I + b_i) + b_i``, i.e. ``ΔW_ij = W_ij b_i + b_i``.
b starts at zero (output unchanged). This is the paper's "weight guide" form, PEFT's MiSS with ``init_weights="bat"``
(``tuners/miss/layer.py``: blocks ``(out/r, r, r)``, ``W @ b + b``, unmerge ``(W' − b)(I + b)⁻¹`` with the inverse in
float32); the test suite compares against PEFT when it is installed. r=64 is PEFT's default ("use an even r").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from trainlab.adapters.layer import AdapterLayer
from trainlab.adapters.registry import AdapterSpec, Field, register_adapter

BONE_PAPER = "Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for LLMs (Kang, 2024)"


class BoneLayer(AdapterLayer):
    weight_dependent = True
    fused_forward = True

    def __init__(self, base: nn.Module, *, r: int) -> None:
        super().__init__(base)
        if self.in_features % r or self.out_features % r:
            raise ValueError(
                f"bone needs in and out divisible by r; this layer is {self.out_features} x {self.in_features}, r={r}"
            )
        self.r = r
        w = self.base_weight()
        self.bone_block = nn.Parameter(torch.zeros(self.out_features // r, r, r, dtype=w.dtype, device=w.device))

    def _blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in) -> (in/r, out/r, r, r): block [j, i] is W_ij."""
        r = self.r
        return weight.reshape(self.out_features // r, r, self.in_features // r, r).permute(2, 0, 1, 3)

    def _unblock(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.permute(1, 2, 0, 3).reshape(self.out_features, self.in_features)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self._unblock(self._blocks(weight) @ self.bone_block + self.bone_block)

    def restore_weight(self, merged: torch.Tensor) -> torch.Tensor:
        b = self.bone_block
        eye = torch.eye(self.r, dtype=torch.float64 if b.dtype == torch.float64 else torch.float32, device=b.device)
        inverse = torch.linalg.inv(eye + b.to(eye.dtype)).to(b.dtype)
        return self._unblock((self._blocks(merged) - b) @ inverse)


def bone_count(weight: torch.Tensor, config: Mapping[str, Any]) -> int:
    return weight.shape[0] * config["r"]


register_adapter(
    AdapterSpec(
        name="bone",
        paper=BONE_PAPER,
        summary="block affine ΔW_ij = W_ij b_i + b_i with one r x r block per output block (PEFT MiSS 'bat')",
        fields={"r": Field(64, 1, 4096, integer=True)},
        layer_class=BoneLayer,
        layer_types=("linear", "conv1d"),
        count=bone_count,
    )
)
