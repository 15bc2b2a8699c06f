"""Mono-Forward (Gong, Li & Abdulla, 2025): each hidden layer learns from a local cross-entropy through its own
projection to the classes.

Block i computes ``a_i = block_i(a_{i-1}.detach())`` and its goodness ``G_i = a_i M_iᵀ`` with a trainable
``M_i ∈ R^{C×d_i}``; ``CE(G_i, y)`` updates block i and ``M_i`` only. A last block that already outputs ``C``
features (a classifier head) uses its output as ``G`` directly, so the trained model predicts as it is.
Inference is the argmax of the last block's goodness (the paper's default; its "BP-pred" alternative is not
offered). "Beyond Backpropagation" (Spyra, 2025) finds MF matches or beats backprop on its native MLPs with
less energy and time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.localtrain.core import LocalTrainer, split_blocks, train_blocks_locally
from trainlab.localtrain.registry import register_method
from trainlab.ranges import Between

PAPER = "Mono-Forward: Backpropagation-Free Algorithm for Efficient Neural Network Training (Gong et al., 2025)"


class MonoForward(LocalTrainer):
    """Mono-Forward training of an ``nn.Sequential`` classifier; Adam per the paper's experiments."""

    def __init__(self, model: nn.Sequential, *, num_classes: int, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.model = model
        self.blocks = split_blocks(model)
        self.num_classes, self.lr, self.weight_decay = num_classes, lr, weight_decay
        self.projections = nn.ModuleList()
        self.predictor = model

    def _trained(self) -> nn.Module:
        return nn.ModuleList([self.model, self.projections])

    def _prepare(self, inputs: Any) -> list[torch.optim.Optimizer]:
        x = inputs
        for i, block in enumerate(self.blocks):
            with torch.no_grad():
                x = block(x)
            width = x.flatten(1).shape[1]
            is_head = i == len(self.blocks) - 1 and width == self.num_classes
            projection = nn.Linear(width, self.num_classes, bias=False, dtype=x.dtype, device=x.device)
            self.projections.append(nn.Identity() if is_head else projection)
        if not isinstance(self.projections[-1], nn.Identity):
            self.predictor = nn.Sequential(self.model, nn.Flatten(), self.projections[-1])
        params = list(self.model.parameters()) + list(self.projections.parameters())
        return [torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, foreach=True)]

    def goodness(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """``G_i = a_i M_iᵀ``: block ``i``'s scores for the classes."""
        return self.projections[i](h.flatten(1))

    def _step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        (optimizer,) = self._optimizers
        optimizer.zero_grad(set_to_none=True)
        total, _ = train_blocks_locally(
            self.blocks, inputs, lambda i, h: F.cross_entropy(self.goodness(i, h), labels, ignore_index=-100)
        )
        optimizer.step()
        return total


@register_method(
    "mono-forward",
    paper=PAPER,
    summary="per-layer projection to the classes, local cross-entropy; no gradient crosses layers",
    supports="sequential",
    defaults={"lr": 1e-3, "weight_decay": 0.0},
    ranges={"lr": Between(1e-6, 1.0), "weight_decay": Between(0.0, 1.0)},
)
def mono_forward(model: nn.Module, *, num_classes: int, **hp: Any) -> MonoForward:
    return MonoForward(model, num_classes=num_classes, **hp)
