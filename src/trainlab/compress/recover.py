"""PERP (Zimmer et al., "PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs"): after pruning,
retrain only biases, normalization parameters and a sparsity-preserving LoRA, then merge.

MaskLoRA (official ``customLayers.MaskLoRALayer``): ``W_eff = W + s * (B A ⊙ M)`` with ``M = 1[W != 0]``
(the layer's pruning mask), so the update never touches pruned entries, and merging ``W += s (B A ⊙ M)``
keeps the sparsity pattern exactly: no densify-then-re-prune step. ``lora_r``/``lora_alpha`` are not
confirmed from the paper; the default here is rank 4 with scale ``alpha / r = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.compress.masks import apply_mask, get_mask

METHODS = ("perp",)  # recovery after pruning
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


class MaskLoRALinear(nn.Module):
    """A frozen (pruned) ``nn.Linear`` plus a LoRA update masked by the layer's sparsity pattern."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        self.base = base
        mask = get_mask(base)
        self.register_buffer("mask", base.weight.detach() != 0 if mask is None else mask.clone(), persistent=False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # standard LoRA init: B = 0, so W_eff = W at start
        self.scale = alpha / rank

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A) * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight + self.delta(), self.base.bias)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update merged in; its mask (and so its zeros) is unchanged."""
        self.base.weight.add_(self.delta())
        if get_mask(self.base) is None:  # pattern came from the zeros: arm a mask so retraining keeps it
            apply_mask(self.base, self.mask)
        return self.base


def attach_perp(model: nn.Module, rank: int = 4, alpha: float | None = None) -> list[nn.Parameter]:
    """Freeze ``model`` except biases and norm parameters; wrap every Linear (lm_head included) in a
    MaskLoRALinear. Conv layers get no LoRA (only their biases train). Returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, MaskLoRALinear(child, rank, float(rank if alpha is None else alpha)))
    for module in model.modules():
        if isinstance(module, NORMS):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            bias.requires_grad_(True)
        if isinstance(module, MaskLoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def merge_perp(model: nn.Module) -> None:
    """Merge every MaskLoRALinear back into a plain (masked) ``nn.Linear``; all parameters trainable again."""
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, MaskLoRALinear):
                setattr(parent, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)


def retrain(
    model: nn.Module,
    batches: Iterable[Any],
    loss: Callable[[nn.Module, Any], torch.Tensor],
    params: Iterable[nn.Parameter],
    lr: float,
) -> None:
    """One AdamW step (no weight decay) on ``params`` per batch of ``batches`` (any objects ``loss(model, batch)``
    takes: tensors, tuples, Hugging Face dicts); the model is left in train mode. Masked layers keep their zeros
    throughout (see :mod:`trainlab.compress.masks`)."""
    optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=0.0)
    model.train()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss(model, batch).backward()
        optimizer.step()


def recover_perp(
    model: nn.Module,
    batches: Iterable[Any],
    loss: Callable[[nn.Module, Any], torch.Tensor],
    lr: float = 1e-3,
    rank: int = 4,
) -> float:
    """PERP in place: attach, retrain one step per batch with ``loss(model, batch)``, merge. Returns the fraction
    of parameters trained (LoRA factors counted against the model's own parameter count)."""
    total = sum(p.numel() for p in model.parameters())
    params = attach_perp(model, rank)
    retrain(model, batches, loss, params, lr)
    trained = sum(p.numel() for p in params)
    merge_perp(model)
    return trained / total
