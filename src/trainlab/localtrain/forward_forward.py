"""Forward-Forward (Hinton, 2022): every layer learns to give high goodness to positive data and low to negative.

Block i sees its input length-normalized and detached, ``x̂ = x/(‖x‖ + 1e-8)`` (so only the direction of the
layer below reaches it, not its goodness), and its goodness is ``G = Σ_j h_j²``. With threshold ``θ`` the
local loss is ``softplus(−(G_pos − θ)) + softplus(G_neg − θ)``, averaged over the batch (a logistic loss on
``G − θ``). Positive data carry the true label one-hot in their first ``C`` input features (Hinton's MNIST
embedding; ``embedding="append"`` concatenates it instead, for a first layer that takes ``d + C`` inputs),
negative data the same inputs with a uniformly drawn wrong label. A prediction embeds every label in turn and
picks the one with the largest goodness summed over the layers, the first layer left out when there are
several (Hinton's choice). Defaults: θ = 2 and Adam at lr 0.03, those of the widely used PyTorch re-creation
(Hinton gives no code).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.localtrain.core import LocalTrainer, split_blocks, train_blocks_locally
from trainlab.localtrain.registry import register_method
from trainlab.ranges import Between

PAPER = "The Forward-Forward Algorithm: Some Preliminary Investigations (Hinton, 2022)"
_EPS = 1e-8


def goodness(h: torch.Tensor) -> torch.Tensor:
    """``G = Σ_j h_j²`` per row."""
    return h.flatten(1).pow(2).sum(dim=1)


def ff_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, threshold: float) -> torch.Tensor:
    """``mean softplus(θ − G_pos) + mean softplus(G_neg − θ)``."""
    return F.softplus(threshold - g_pos).mean() + F.softplus(g_neg - threshold).mean()


def length_normalize(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    return (flat / (flat.norm(dim=1, keepdim=True) + _EPS)).view_as(x)


def embed_labels(x: torch.Tensor, labels: torch.Tensor, num_classes: int, embedding: str) -> torch.Tensor:
    """Flattened inputs carrying ``labels`` one-hot: over the first ``C`` features, or appended after them."""
    flat = x.flatten(1)
    onehot = F.one_hot(labels, num_classes).to(flat.dtype)
    if embedding == "append":
        return torch.cat([flat, onehot], dim=1)
    if flat.shape[1] <= num_classes:
        raise ValueError(f"embedding='overwrite' needs more than {num_classes} input features, got {flat.shape[1]}")
    return torch.cat([onehot, flat[:, num_classes:]], dim=1)


class _Normalized(nn.Module):
    """A block that sees its input length-normalized."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(length_normalize(x))


class ForwardForwardClassifier(nn.Module):
    """Scores every label by the goodness it earns, summed over the scoring layers; one batched pass over labels."""

    def __init__(self, blocks: nn.ModuleList, num_classes: int, embedding: str) -> None:
        super().__init__()
        self.blocks, self.num_classes, self.embedding = blocks, num_classes, embedding
        self.first_scored = 1 if len(blocks) > 1 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], self.num_classes
        labels = torch.arange(c, device=x.device).repeat_interleave(n)
        h = embed_labels(x.repeat(c, *([1] * (x.dim() - 1))), labels, c, self.embedding)
        score = h.new_zeros(c * n)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i >= self.first_scored:
                score = score + goodness(h)
        return score.view(c, n).T


class ForwardForward(LocalTrainer):
    """Forward-Forward training of the hidden blocks of an ``nn.Sequential``."""

    def __init__(
        self,
        model: nn.Sequential,
        *,
        num_classes: int,
        threshold: float,
        lr: float,
        embedding: str,
        seed: int,
    ) -> None:
        super().__init__()
        blocks = split_blocks(model)
        # A last block without an activation is a classifier head: goodness has no use for it.
        if len(blocks) > 1 and all(any(True for _ in m.parameters()) or isinstance(m, nn.Flatten) for m in blocks[-1]):
            warnings.warn(
                f"forward-forward: the final block {blocks[-1]} has no activation; it is a classifier head that "
                "Forward-Forward does not use (it classifies by goodness), so it stays untrained",
                stacklevel=4,  # the caller of localtrain.create
            )
            blocks = blocks[:-1]
        self.model = model
        self.blocks = nn.ModuleList(_Normalized(b) for b in blocks)
        self.num_classes, self.threshold, self.lr, self.embedding = num_classes, threshold, lr, embedding
        self.generator = torch.Generator().manual_seed(seed)
        self.predictor = ForwardForwardClassifier(self.blocks, num_classes, embedding)

    def _trained(self) -> nn.Module:
        return self.blocks

    def _prepare(self, inputs: Any) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.blocks.parameters(), lr=self.lr, foreach=True)]

    def negative_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """A uniformly drawn wrong label for every row."""
        shift = torch.randint(1, self.num_classes, labels.shape, generator=self.generator).to(labels.device)
        return (labels + shift) % self.num_classes

    def _step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        (optimizer,) = self._optimizers
        keep = labels != -100
        inputs, labels = inputs[keep], labels[keep]
        n = labels.shape[0]
        pos = embed_labels(inputs, labels, self.num_classes, self.embedding)
        neg = embed_labels(inputs, self.negative_labels(labels), self.num_classes, self.embedding)
        optimizer.zero_grad(set_to_none=True)

        def local_loss(i: int, h: torch.Tensor) -> torch.Tensor:
            g = goodness(h)
            return ff_loss(g[:n], g[n:], self.threshold)

        total, _ = train_blocks_locally(self.blocks, torch.cat([pos, neg]), local_loss)
        optimizer.step()
        return total


@register_method(
    "forward-forward",
    paper=PAPER,
    summary="goodness (sum of squares) high on label-embedded positives, low on wrong-label negatives, per layer",
    supports="sequential",
    defaults={"threshold": 2.0, "lr": 0.03, "embedding": "overwrite", "seed": 0},
    ranges={
        "threshold": Between(0.0, 1e4),
        "lr": Between(1e-6, 1.0),
        "embedding": ("overwrite", "append"),
        "seed": Between(0, 2**63 - 1, integer=True),
    },
)
def forward_forward(model: nn.Module, *, num_classes: int, **hp: Any) -> ForwardForward:
    return ForwardForward(model, num_classes=num_classes, **hp)
