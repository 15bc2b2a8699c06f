"""LoRA-GA: LoRA whose A and B start from the SVD of the full-weight gradient, so LoRA's first step approximates
full fine-tuning's.

Follows the official code (Outsider565/LoRA-GA, ``lora_ga_init``): with ``G ≈ U S Vᵀ`` the mean gradient of W over
the prepare batches, direction ``ArB2r`` takes ``A = Vᵀ[:r]`` and ``B = U[:, r:2r]``; scale ``stable`` multiplies
both by ``m^(1/4)/√γ`` (m = out features). The paper subtracts ``(α/r)·B₀A₀`` from the frozen W so the output is
unchanged at init; here that offset is kept as two frozen buffers (``init_A``, ``init_B``) instead of editing W, so
the saved adapter stays valid with the original base model (the pitfall the spec names) and merges exactly.
The SVD is exact (``torch.linalg.svd``) where the official code uses ``svd_lowrank(q=4r, niter=4)``, its
randomized approximation. (PEFT's port multiplies B by the singular values and scales only B; we follow the
authors' code.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.adapters.lora import LORA_FIELDS, LoRALayer, lora_count
from trainlab.adapters.registry import AdapterSpec, Field, register_adapter

LORA_GA_PAPER = "LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang et al., NeurIPS 2024)"

_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
_SCALES = ("stable", "unit", "gd")


class LoRAGALayer(LoRALayer):
    def __init__(
        self, base: nn.Module, *, r: int, alpha: float, dropout: float, stable_gamma: float, direction: str, scale: str
    ) -> None:
        super().__init__(base, r=r, alpha=alpha, dropout=dropout)
        if 2 * r > min(self.in_features, self.out_features):
            raise ValueError(f"lora-ga needs 2r={2 * r} <= min(in, out)={min(self.in_features, self.out_features)}")
        self.stable_gamma, self.direction, self.scale = stable_gamma, direction, scale
        with torch.no_grad():
            self.lora_A.zero_()  # nothing trains until prepare() sets A and B from the gradient
        self.register_buffer("init_A", torch.zeros_like(self.lora_A))
        self.register_buffer("init_B", torch.zeros_like(self.lora_B))
        self.register_buffer("prepared", torch.zeros((), dtype=torch.bool))
        self.is_prepared = False  # host copy of `prepared`: forward checks it without a device sync

    @torch.no_grad()
    def initialize_from_gradient(self, grad: torch.Tensor) -> None:
        """Set A, B (and the frozen offset copies) from the (out x in) mean gradient ``grad`` of the base weight."""
        r, m = self.r, grad.shape[0]
        dtype = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
        u, _, vh = torch.linalg.svd(grad.to(dtype), full_matrices=False)
        if self.direction == "ArB2r":
            a, b = vh[:r], u[:, r : 2 * r]
        elif self.direction == "A2rBr":
            a, b = vh[r : 2 * r], u[:, :r]
        else:  # ArBr: interleaved singular directions
            a, b = vh[1 : 2 * r : 2], u[:, 0 : 2 * r : 2]
        if self.scale == "stable":
            factor = m**0.25 / self.stable_gamma**0.5
            a, b = a * factor, b * factor
        elif self.scale == "gd":
            a, b = a / self.scaling, b / self.scaling
        for target, value in ((self.lora_A, a), (self.lora_B, b), (self.init_A, a), (self.init_B, b)):
            target.copy_(value.to(target.dtype))
        self.prepared.fill_(True)
        self.is_prepared = True

    def loaded(self) -> None:
        self.is_prepared = bool(self.prepared)

    def _check_prepared(self) -> None:
        if self.lora_A.requires_grad and torch.is_grad_enabled() and not self.is_prepared:
            raise RuntimeError(
                "lora-ga starts from the gradient: call adapters.prepare(model, batches, loss=...) before training"
            )

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A - self.init_B @ self.init_A)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        self._check_prepared()
        x = self.dropout(x)
        if self.kind == "conv2d":
            return self.apply_weight(x, self.delta_weight(self.base_weight()))
        moving = F.linear(F.linear(x, self.lora_A), self.lora_B)
        offset = F.linear(F.linear(x, self.init_A), self.init_B)
        return (moving - offset) * self.scaling


register_adapter(
    AdapterSpec(
        name="lora-ga",
        paper=LORA_GA_PAPER,
        summary="LoRA initialized from the SVD of the full gradient (A = V[:r]ᵀ, B = U[:, r:2r], stable scale), "
        "offset so the output is unchanged",
        fields={
            **LORA_FIELDS,
            "stable_gamma": Field(16.0, 1e-6, 1e6),
            "direction": Field("ArB2r", choices=_DIRECTIONS),
            "scale": Field("stable", choices=_SCALES),
        },
        layer_class=LoRAGALayer,
        layer_types=("linear", "conv1d", "conv2d"),
        count=lora_count,
        prepare="gradients",
        peft="lora (rank 2r: [B, -B0] [A; A0])",
    )
)
