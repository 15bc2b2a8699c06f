"""AdaLoRA: the update in SVD form ΔW = P Λ Q, with singular values pruned during training by importance.

Follows the official code (QingruZhang/AdaLoRA, ``loralib/adalora.py``): ``y = W x + (B (A ⊙ E)) x · s / (r₀ + 1e-5)``
with P = ``lora_B`` (out x r), Λ = diag(``lora_E``), Q = ``lora_A`` (r x in), ``s = α`` (r₀ if α = 0) and r₀ the
*initial* rank forever. E starts at 0 and A, B at N(0, 0.02²), so the output is unchanged at init. Training adds
``γ · mean ‖QQᵀ − I‖_F, ‖PᵀP − I‖_F`` to the loss and, after each optimizer step, scores each singular triplet by
``s(λ) + mean s(Q_i·) + mean s(P_·i)`` (``s`` = sensitivity EMA × uncertainty EMA) and zeroes the λ below the
cubic budget's threshold (:class:`AdaLoRACallback`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.adapters.attach import TrainingCallback, adapter_layers
from trainlab.adapters.importance import SensitivityEMA, check_schedule, cubic_budget
from trainlab.adapters.layer import AdapterLayer
from trainlab.adapters.registry import AdapterSpec, Field, register_adapter

ADALORA_PAPER = "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., ICLR 2023)"


class AdaLoRALayer(AdapterLayer):
    def __init__(self, base: nn.Module, *, r: int, alpha: float, dropout: float) -> None:
        super().__init__(base)
        if r > min(self.in_features, self.out_features):
            raise ValueError(f"r={r} exceeds min(in, out)={min(self.in_features, self.out_features)} of this layer")
        w = self.base_weight()
        kw = {"dtype": w.dtype, "device": w.device}
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, **kw) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))
        self.lora_B = nn.Parameter(torch.randn(self.out_features, r, **kw) * 0.02)
        self.register_buffer("ranknum", torch.tensor(float(r), **kw))
        self.scaling = alpha if alpha > 0 else float(r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factor(self) -> torch.Tensor:
        return self.scaling / (self.ranknum + 1e-5)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.factor()

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        if self.kind == "conv2d":
            return self.apply_weight(x, self.delta_weight(self.base_weight()))
        return F.linear(F.linear(x, self.lora_A * self.lora_E), self.lora_B) * self.factor()

    def rank(self) -> int:
        return int(torch.count_nonzero(self.lora_E))


def orthogonal_regularizer(layers: list[AdaLoRALayer]) -> torch.Tensor:
    """Mean over all P and Q of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F (Frobenius, not squared, as the official code)."""
    terms = []
    for layer in layers:
        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - eye))
    return torch.stack(terms).mean()


class AdaLoRACallback(TrainingCallback):
    """Orthogonality penalty and importance-based rank pruning on the cubic budget schedule.

    ``step(t)`` must run after ``optimizer.step()`` and before ``zero_grad()`` (it reads the gradients).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        total_steps: int | None,
        target_rank: int,
        target_total_rank: int | None,
        init_warmup: int,
        final_warmup: int,
        mask_interval: int,
        beta1: float,
        beta2: float,
        orth_reg: float,
    ) -> None:
        super().__init__(model)
        self.total_steps = check_schedule(total_steps, init_warmup, final_warmup)
        self.layers = list(adapter_layers(model).values())
        self.initial = sum(int(layer.lora_E.shape[0]) for layer in self.layers)
        self.target = target_total_rank if target_total_rank is not None else target_rank * len(self.layers)
        if not 0 <= self.target <= self.initial:
            raise ValueError(f"the target total rank {self.target} must lie in [0, {self.initial}] (the initial)")
        self.init_warmup, self.final_warmup, self.mask_interval = init_warmup, final_warmup, mask_interval
        self.orth_reg = orth_reg
        # Triplets per layer: E (r x 1), A (r x in), B (out x r).
        self.ema = SensitivityEMA([p for la in self.layers for p in (la.lora_E, la.lora_A, la.lora_B)], beta1, beta2)
        self.budget = self.initial

    def regularizer(self) -> torch.Tensor | float:
        return self.orth_reg * orthogonal_regularizer(self.layers) if self.orth_reg else 0.0

    def triplet_scores(self) -> list[torch.Tensor]:
        """Per layer, the score of each singular value: s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)."""
        s = self.ema.scores()
        return [e.view(-1) + a.mean(1) + b.mean(0) for e, a, b in zip(s[0::3], s[1::3], s[2::3], strict=True)]

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        if global_step < self.total_steps - self.final_warmup:  # scores freeze in the final phase
            self.ema.update()
        self.budget, mask_now = cubic_budget(
            global_step,
            self.total_steps,
            self.initial,
            self.target,
            self.init_warmup,
            self.final_warmup,
            self.mask_interval,
        )
        if mask_now and self.budget < self.initial:
            scores = self.triplet_scores()
            threshold = torch.cat(scores).kthvalue(self.initial - self.budget).values
            for layer, score in zip(self.layers, scores, strict=True):
                layer.lora_E.masked_fill_((score <= threshold).view(-1, 1), 0.0)

    def ranks(self) -> dict[str, int]:
        return {name: layer.rank() for name, layer in adapter_layers(self.model).items()}


def adalora_count(weight: torch.Tensor, config: Mapping[str, Any]) -> int:
    out_features, in_features = weight.shape
    return config["r"] * (in_features + out_features + 1)


register_adapter(
    AdapterSpec(
        name="adalora",
        paper=ADALORA_PAPER,
        summary="ΔW = P Λ Q with orthogonality penalty; singular values pruned by sensitivity × uncertainty on a "
        "cubic budget schedule (training callback)",
        # r=12, target 8, warmups 500/1500, interval 10, β 0.85: the official README; α=16 and γ=0.1: its GLUE scripts.
        fields={
            "r": Field(12, 1, 4096, integer=True),
            "alpha": Field(16.0, 0.0, 1e6),
            "dropout": Field(0.0, 0.0, 0.99),
        },
        layer_class=AdaLoRALayer,
        layer_types=("linear", "conv1d", "conv2d"),
        count=adalora_count,
        callback=AdaLoRACallback,
        callback_fields={
            "total_steps": Field(None, 1, 10**9, integer=True, optional=True),
            "target_rank": Field(8, 0, 4096, integer=True),
            "target_total_rank": Field(None, 0, 10**9, integer=True, optional=True),
            "init_warmup": Field(500, 0, 10**9, integer=True),
            "final_warmup": Field(1500, 0, 10**9, integer=True),
            "mask_interval": Field(10, 1, 10**9, integer=True),
            "beta1": Field(0.85, 0.0, 0.9999),
            "beta2": Field(0.85, 0.0, 0.9999),
            "orth_reg": Field(0.1, 0.0, 1e3),
        },
        peft="lora (after pruning: rank = kept singular values, B·diag(λ)·s/r₀)",
    )
)
