"""SaRA: re-train the pretrained weights of smallest magnitude, with a nuclear-norm low-rank penalty and a
progressive freeze of weights that grow out of the small set.

Follows the official code (sjtuplayer/SaRA, ``optim/adamw2.py`` semantics, memory layout of ``adamw.py``): the
trainable set is ``M = {|W| < τ}`` (τ = 2e-3, absolute, per tensor); only those entries are stored as trainable
values (a vector of |M| numbers, zero at init, scattered into ΔW), so optimizer state exists only for them. The
callback adds ``λ‖(W + ΔW) ⊙ M‖_*`` for one random large layer per step (official: min side > 64, |M| > 100,
λ = 5e-4) and, from step ``progressive_iter`` (2500) on, freezes the entries whose |W + ΔW| has reached τ by writing
back their values after every optimizer step (adamw2's ``θ = M θ + (1 − M) θ_old``). ``fraction`` (an option, not the
paper's) chooses the smallest fraction of each layer instead of an absolute τ, for models whose weight scale differs.
The official lr default is 1e-3·exp(−350 τ); pass it to the optimizer yourself.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from trainlab.adapters.attach import TrainingCallback, adapter_layers
from trainlab.adapters.layer import AdapterLayer
from trainlab.adapters.registry import AdapterSpec, Field, register_adapter

SARA_PAPER = (
    "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank Adaptation (Hu et al., 2024)"
)


def small_weights(weight: torch.Tensor, threshold: float, fraction: float | None) -> tuple[torch.Tensor, float]:
    """Flat indices of the trainable small weights and the τ they lie below (the k+1-th magnitude for fraction)."""
    magnitude = weight.detach().abs().flatten()
    if fraction is None:
        return torch.nonzero(magnitude < threshold).flatten(), threshold
    k = max(1, round(fraction * magnitude.numel()))
    values, order = magnitude.sort()
    tau = float(values[k]) if k < magnitude.numel() else float("inf")
    return order[:k].sort().values, tau


class SaRALayer(AdapterLayer):
    fused_forward = True

    def __init__(self, base: nn.Module, *, threshold: float, fraction: float | None) -> None:
        super().__init__(base)
        w = self.base_weight().detach()
        index, tau = small_weights(w, threshold, fraction)
        if index.numel() == 0:
            raise ValueError(
                f"sara: no weight of this {tuple(w.shape)} layer is below the threshold {tau:g}; "
                "raise threshold or pass fraction"
            )
        self.register_buffer("index", index)
        self.register_buffer("threshold", torch.tensor(tau, dtype=w.dtype, device=w.device))
        self.sara_values = nn.Parameter(torch.zeros(index.numel(), dtype=w.dtype, device=w.device))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        flat = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        return flat.index_put((self.index,), self.sara_values).view_as(weight)

    def masked_weight(self) -> torch.Tensor:
        """(W + ΔW) ⊙ M: the trained small weights in place, zero elsewhere (what the nuclear norm sees)."""
        w = self.base_weight()
        values = w.detach().flatten()[self.index] + self.sara_values
        return torch.zeros(w.numel(), dtype=w.dtype, device=w.device).index_put((self.index,), values).view_as(w)


class SaRACallback(TrainingCallback):
    def __init__(self, model: nn.Module, *, lambda_rank: float, progressive_iter: int, min_dim: int, seed: int) -> None:
        super().__init__(model)
        self.layers = list(adapter_layers(model).values())
        self.lambda_rank, self.progressive_iter = lambda_rank, progressive_iter
        self.large = [
            la for la in self.layers if min(la.in_features, la.out_features) > min_dim and la.sara_values.numel() > 100
        ]
        if lambda_rank and not self.large:
            warnings.warn(
                f"sara: no adapted layer has min(in, out) > {min_dim} and over 100 trainable entries, so "
                "the nuclear-norm penalty is off; lower min_dim to apply it",
                stacklevel=2,
            )
        self.generator = torch.Generator().manual_seed(seed)
        self.frozen: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def regularizer(self) -> torch.Tensor | float:
        if not self.lambda_rank or not self.large:
            return 0.0
        layer = self.large[int(torch.randint(len(self.large), (), generator=self.generator))]
        return self.lambda_rank * torch.linalg.matrix_norm(layer.masked_weight(), ord="nuc")

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        if global_step == self.progressive_iter:
            self.frozen = []
            for la in self.layers:
                grown = (la.base_weight().flatten()[la.index] + la.sara_values).abs() >= la.threshold
                self.frozen.append((grown, la.sara_values[grown].clone()))
        if self.frozen is not None and global_step >= self.progressive_iter:
            for la, (grown, values) in zip(self.layers, self.frozen, strict=True):
                la.sara_values[grown] = values


def sara_count(weight: torch.Tensor, config: Mapping[str, Any]) -> int:
    if config["fraction"] is not None:
        return max(1, round(config["fraction"] * weight.numel()))
    return int((weight.abs() < config["threshold"]).sum())


register_adapter(
    AdapterSpec(
        name="sara",
        paper=SARA_PAPER,
        summary="re-trains the weights with |W| < τ (sparse values, zero at init) under a nuclear-norm penalty, "
        "progressively freezing those that grow past τ",
        fields={"threshold": Field(2e-3, 0.0, 1e6), "fraction": Field(None, 0.0, 1.0, optional=True)},
        layer_class=SaRALayer,
        layer_types=("linear", "conv1d", "conv2d"),
        count=sara_count,
        callback=SaRACallback,
        callback_fields={
            "lambda_rank": Field(5e-4, 0.0, 1e6),
            "progressive_iter": Field(2500, 0, 10**9, integer=True),
            "min_dim": Field(64, 0, 10**9, integer=True),
            "seed": Field(0, 0, 2**63 - 1, integer=True),
        },
    )
)
