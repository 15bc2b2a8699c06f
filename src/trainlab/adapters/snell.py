"""SNELL/SNELLA: a sparse update merged from two low-rank matrices through a nonlinear kernel, with layers competing
for the sparsity budget.

Follows the official code as read in the spec (ssfgunner/SNELL, ``model/vision_transformer_timm.py``): trainable
``in_q`` (H x in x r/H) and ``out_q`` (H x out x r/H), Kaiming-uniform, H = 2 heads; the kernel merge is
``ΔW[o, i] = Σ_h c_h ‖in_q[h, i] − out_q[h, o]‖₂`` with fixed ``c_h = 0.1·(−1)^h`` (a distance kernel, so ΔW is
full rank where B A would have rank r); intra-layer competition keeps the entries of largest |ΔW| (a fraction
``1 − sparsity``, default sparsity 0.9 = keep 10%) with a detached 0/1 mask. The paper's binary mask is used where
the code multiplies by |ΔW| (a quirk the spec names). ΔW ≠ 0 at init, as in the paper. Inter-layer competition
(SNELLA, :class:`SnellCallback`): layer scores from sensitivity × uncertainty EMAs of ``in_q``/``out_q`` share a kept-
entry budget that follows AdaLoRA's cubic schedule; each layer's volume is capped at its size and the excess is
re-shared among the rest. The branch output goes through DropPath (stochastic depth per sample, ``drop_path`` 0.1:
the official ``TuningModule`` wraps every SNELL branch in ``DropPath(0.1)`` and no released script turns it off);
in eval mode, and once merged, the branch is deterministic. ``learnable_kernel=True`` adds SNELLA's learnable term
``ΔW + α·softmax(ΔW/γ) + β`` (three scalars per layer, α = γ = 1, β = 0 at init; softmax over the output axis, the
code's last axis of its (in, out) matrix, as the spec reads it) before the sparsification.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from trainlab.adapters.attach import TrainingCallback, adapter_layers
from trainlab.adapters.importance import SensitivityEMA, check_schedule, cubic_budget
from trainlab.adapters.layer import AdapterLayer
from trainlab.adapters.lora import lora_count
from trainlab.adapters.registry import AdapterSpec, Field, register_adapter

SNELL_PAPER = (
    "Kernelized Sparse Fine-Tuning with Bi-level Parameter Competition for Vision Models (SNELL, NeurIPS 2024)"
)


def keep_largest(delta: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``delta`` with its ``sparsity`` fraction of smallest-|.| entries zeroed (mask detached from the graph)."""
    k = int(sparsity * delta.numel())
    if k <= 0:
        return delta
    threshold = delta.detach().abs().flatten().kthvalue(k).values
    return delta * (delta.detach().abs() > threshold)


class SnellLayer(AdapterLayer):
    fused_forward = True

    def __init__(
        self, base: nn.Module, *, r: int, heads: int, sparsity: float, drop_path: float, learnable_kernel: bool
    ) -> None:
        super().__init__(base)
        self.drop_path = drop_path
        if r % heads:
            raise ValueError(f"snell: r={r} must be divisible by heads={heads}")
        w = self.base_weight()
        kw = {"dtype": w.dtype, "device": w.device}
        self.in_q = nn.Parameter(torch.empty(heads, self.in_features, r // heads, **kw))
        self.out_q = nn.Parameter(torch.empty(heads, self.out_features, r // heads, **kw))
        for p in (self.in_q, self.out_q):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        signs = torch.tensor([0.1 * (-1) ** h for h in range(heads)], **kw)
        self.register_buffer("coefficients", signs)
        self.register_buffer("sparsity", torch.tensor(float(sparsity), **kw))
        self.kept_sparsity = float(sparsity)  # host copy of `sparsity`: forward needs it without a device sync
        if learnable_kernel:  # SNELLA: α, γ and β, plain learnable scalars
            self.kernel_alpha = nn.Parameter(torch.ones((), **kw))
            self.kernel_gamma = nn.Parameter(torch.ones((), **kw))
            self.kernel_beta = nn.Parameter(torch.zeros((), **kw))
        self.learnable_kernel = learnable_kernel

    def set_sparsity(self, value: float) -> None:
        self.sparsity.fill_(value)
        self.kept_sparsity = float(value)

    def loaded(self) -> None:
        self.kept_sparsity = float(self.sparsity)

    def dense_delta(self) -> torch.Tensor:
        distances = torch.cdist(self.out_q, self.in_q)  # (H, out, in)
        delta = torch.einsum("h,hoi->oi", self.coefficients, distances)
        if self.learnable_kernel:
            delta = delta + self.kernel_alpha * torch.softmax(delta / self.kernel_gamma, dim=0) + self.kernel_beta
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not (self.training and self.drop_path > 0):
            return super().forward(x)
        branch = self.apply_weight(x, self.delta_weight(self.base_weight()))
        keep = 1.0 - self.drop_path
        shape = (branch.shape[0],) + (1,) * (branch.ndim - 1) if branch.ndim > 1 else (1,)
        mask = torch.empty(shape, dtype=branch.dtype, device=branch.device).bernoulli_(keep).div_(keep)
        return self.base(x) + branch * mask

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return keep_largest(self.dense_delta(), self.kept_sparsity)


class SnellCallback(TrainingCallback):
    """SNELLA's inter-layer competition: per-layer kept volumes from importance on a cubic budget schedule."""

    def __init__(
        self,
        model: nn.Module,
        *,
        total_steps: int | None,
        target_ratio: float,
        init_warmup: int,
        final_warmup: int,
        mask_interval: int,
        beta1: float,
        beta2: float,
    ) -> None:
        super().__init__(model)
        self.total_steps = check_schedule(total_steps, init_warmup, final_warmup)
        self.layers = list(adapter_layers(model).values())
        self.sizes = torch.tensor([la.in_features * la.out_features for la in self.layers], dtype=torch.float64)
        kept = torch.tensor([1.0 - la.kept_sparsity for la in self.layers], dtype=torch.float64)
        self.initial = int((kept * self.sizes).sum())
        self.target = int((1.0 - target_ratio) * self.sizes.sum())
        self.init_warmup, self.final_warmup, self.mask_interval = init_warmup, final_warmup, mask_interval
        self.ema = SensitivityEMA([p for la in self.layers for p in (la.in_q, la.out_q)], beta1, beta2)

    def layer_scores(self) -> torch.Tensor:
        s = self.ema.scores()
        scores = torch.stack([a.mean() + b.mean() for a, b in zip(s[0::2], s[1::2], strict=True)]).double().cpu()
        total = scores.sum()
        return scores / total if total > 0 else torch.full_like(scores, 1.0 / len(scores))

    def allocate(self, budget: int) -> torch.Tensor:
        """Kept entries per layer: the budget shared by score, capped at each layer's size, excess re-shared."""
        shares, volume = self.layer_scores(), torch.zeros_like(self.sizes)
        remaining, open_ = float(budget), torch.ones_like(self.sizes, dtype=torch.bool)
        while remaining > 0.5 and bool(open_.any()):
            weights = shares * open_
            if weights.sum() <= 0:
                weights = open_.double()
            volume = volume + remaining * weights / weights.sum()
            excess = (volume - self.sizes).clamp(min=0)
            volume = volume.minimum(self.sizes)
            open_ = volume < self.sizes
            remaining = float(excess.sum())
        return volume

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        if global_step < self.total_steps - self.final_warmup:
            self.ema.update()
        budget, mask_now = cubic_budget(
            global_step,
            self.total_steps,
            self.initial,
            self.target,
            self.init_warmup,
            self.final_warmup,
            self.mask_interval,
        )
        if mask_now:
            volume = self.allocate(budget)
            for layer, v, size in zip(self.layers, volume.tolist(), self.sizes.tolist(), strict=True):
                layer.set_sparsity(1.0 - v / size)


def snell_count(weight: torch.Tensor, config: Mapping[str, Any]) -> int:
    """r (in + out) for in_q and out_q, plus SNELLA's three kernel scalars."""
    return lora_count(weight, config) + (3 if config["learnable_kernel"] else 0)


register_adapter(
    AdapterSpec(
        name="snell",
        paper=SNELL_PAPER,
        summary="sparse ΔW from a distance-kernel merge of two low-rank matrices (full rank), largest entries kept; "
        "layers compete for the kept budget (training callback)",
        # r=32 (low_rank_dim), keep 10% (init_thres 0.9), H=2: the official VTAB scripts.
        fields={
            "r": Field(32, 1, 4096, integer=True),
            "heads": Field(2, 1, 64, integer=True),
            "sparsity": Field(0.9, 0.0, 0.9999),
            "drop_path": Field(0.1, 0.0, 0.99),
            "learnable_kernel": Field(False, choices=(False, True)),
        },
        layer_class=SnellLayer,
        layer_types=("linear", "conv1d", "conv2d"),
        count=snell_count,
        identity_at_init=False,
        callback=SnellCallback,
        # SNELLA FGVC scripts: target_ratio 0.3, no warmups, allocation every step, β 0.85.
        callback_fields={
            "total_steps": Field(None, 1, 10**9, integer=True, optional=True),
            "target_ratio": Field(0.3, 0.0, 1.0),
            "init_warmup": Field(0, 0, 10**9, integer=True),
            "final_warmup": Field(0, 0, 10**9, integer=True),
            "mask_interval": Field(1, 1, 10**9, integer=True),
            "beta1": Field(0.85, 0.0, 0.9999),
            "beta2": Field(0.85, 0.0, 0.9999),
        },
    )
)
