"""WeLore: compress each layer to the rank its own spectrum allows (one global threshold on normalized singular
values), then fine-tune only the low-rank factors.

Follows the official code (VITA-Group/WeLore, ``adaptive_rank_pruning``): per target layer σ̃ = (σ − min σ)/(max σ −
min σ); ``pruned = #{σ̃ < θ}``; ``k = min(out, in) − pruned``. A layer with ``pruned / min(out, in) > min_ratio`` becomes
a low-rank component ``y = U'(V' x) + b`` with ``U' = U_k √S_k`` and ``V' = √S_k V_kᵀ`` (both trainable, the dense
weight dropped); the others stay dense and frozen. θ is set by bisection so that the rank removed over all targets is
``reduction`` of the total (default 0.5, the paper's 50% compression headline), or given directly as ``threshold``.
Merging materializes ``U'V'``; ``merged_copy`` gives plain ``nn.Linear`` layers. Not the paper's bf16 factors: they
keep the base dtype. A Conv2d (groups 1; the paper has none) is factored on its out x (in·kh·kw) matrix into a rank-k
convolution followed by a 1x1 convolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.adapters.layer import AdapterLayer, weight_matrix
from trainlab.adapters.registry import AdapterSpec, Field, register_adapter

WELORE_PAPER = (
    "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients (Jaiswal et al., 2024)"
)


def normalized_spectrum(weight: torch.Tensor) -> torch.Tensor:
    s = torch.linalg.svdvals(weight.detach().double())
    span = s.max() - s.min()
    return (s - s.min()) / span if span > 0 else torch.ones_like(s)


def pruned_ranks(spectra: Mapping[str, torch.Tensor], threshold: float) -> dict[str, int]:
    """Ranks removed per layer by one global threshold θ on normalized spectra (at least rank 1 stays)."""
    return {n: min(int((s < threshold).sum()), len(s) - 1) for n, s in spectra.items()}


def threshold_for_reduction(spectra: Mapping[str, torch.Tensor], reduction: float) -> float:
    """The global θ whose pruned ranks come closest to ``reduction`` of the total rank (bisection, 60 halvings)."""
    total = sum(len(s) for s in spectra.values())
    low, high = 0.0, 1.0 + 1e-9
    for _ in range(60):
        mid = (low + high) / 2
        if sum(pruned_ranks(spectra, mid).values()) < reduction * total:
            low = mid
        else:
            high = mid
    candidates = (low, high)
    return min(candidates, key=lambda t: abs(sum(pruned_ranks(spectra, t).values()) - reduction * total))


def welore_plan(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per layer ``{"rank": k}`` for low-rank components; dense layers are left out (not swapped, stay frozen)."""
    spectra = {n: normalized_spectrum(w) for n, w in weights.items()}
    theta = config["threshold"]
    if theta is None:
        theta = threshold_for_reduction(spectra, config["reduction"])
    plan = {}
    for name, pruned in pruned_ranks(spectra, theta).items():
        full = len(spectra[name])
        if pruned / full > config["min_ratio"]:
            plan[name] = {"rank": full - pruned}
    if not plan:
        raise ValueError(f"welore: threshold {theta:g} leaves every target layer dense; raise reduction or threshold")
    return plan


class WeLoreLayer(AdapterLayer):
    """A low-rank component: y = U'(V' x) + b. Holds no dense weight; ``base`` is an empty module of the same kind."""

    def __init__(
        self, base: nn.Module, *, rank: int, reduction: float, threshold: float | None, min_ratio: float
    ) -> None:
        w = base.weight
        super().__init__(base)
        if self.kind == "conv2d":  # a rank-k conv (k x in x kh x kw) then a 1x1 conv (out x k): the standard split
            if base.groups != 1 or base.padding_mode != "zeros":
                raise ValueError("welore factors a Conv2d only with groups=1 and padding_mode='zeros'")
            self.conv_shape = tuple(base.weight.shape)
            self.conv_args = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        original = weight_matrix(base)
        u, s, vh = torch.linalg.svd(original.detach().double(), full_matrices=False)
        root = s[:rank].sqrt()
        self.welore_U = nn.Parameter((u[:, :rank] * root).to(w.dtype))
        self.welore_V = nn.Parameter((root[:, None] * vh[:rank]).to(w.dtype))
        bias = getattr(base, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.base = nn.Identity()  # the dense weight is dropped: this is the compression
        self.register_buffer("merged_weight", None, persistent=False)

    def layer_kwargs(self) -> dict[str, Any]:
        return {"rank": int(self.welore_U.shape[1])}

    def base_weight(self) -> torch.Tensor:
        raise TypeError("a WeLore layer has no dense base weight; its weight is welore_U @ welore_V")

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise TypeError("a WeLore layer replaces its weight instead of adding to it")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv2d":
            if self.merged_weight is not None:
                return F.conv2d(x, self.merged_weight.view(self.conv_shape), self.bias, **self.conv_args)
            rank = self.welore_V.shape[0]
            h = F.conv2d(x, self.welore_V.view(rank, *self.conv_shape[1:]), None, **self.conv_args)
            return F.conv2d(h, self.welore_U[:, :, None, None], self.bias)
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight, self.bias)
        return F.linear(F.linear(x, self.welore_V), self.welore_U, self.bias)

    @torch.no_grad()
    def merge(self) -> None:
        self.merged_weight = self.welore_U @ self.welore_V
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self.merged_weight = None
        self.merged = False

    @torch.no_grad()
    def merged_module(self) -> nn.Module:
        has_bias = self.bias is not None
        if self.kind == "conv2d":
            out_ch, in_ch, *kernel = self.conv_shape
            plain: nn.Module = nn.Conv2d(in_ch, out_ch, tuple(kernel), bias=has_bias, **self.conv_args)
        else:
            plain = nn.Linear(self.in_features, self.out_features, bias=has_bias)
        plain = plain.to(dtype=self.welore_U.dtype, device=self.welore_U.device)
        plain.weight.copy_((self.welore_U @ self.welore_V).view(plain.weight.shape))
        if has_bias:
            plain.bias.copy_(self.bias)
        return plain


def welore_count(weight: torch.Tensor, config: Mapping[str, Any]) -> int:
    """Trainable entries of the layers the plan makes low-rank (k (out + in)); dense layers contribute 0."""
    out_features, in_features = weight.shape
    return config["rank"] * (out_features + in_features)


register_adapter(
    AdapterSpec(
        name="welore",
        paper=WELORE_PAPER,
        summary="non-uniform low-rank compression by one global threshold on normalized spectra; only the "
        "low-rank factors U'V' train",
        fields={
            "reduction": Field(0.5, 0.0, 1.0),
            "threshold": Field(None, 0.0, 1.0, optional=True),
            "min_ratio": Field(0.0, 0.0, 1.0),  # the official reduction script's default
        },
        layer_class=WeLoreLayer,
        layer_types=("linear", "conv1d", "conv2d"),
        count=welore_count,
        identity_at_init=False,
        plan=welore_plan,
    )
)
