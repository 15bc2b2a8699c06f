"""ForwardGNN (Park et al., ICLR 2024): graph layers trained one by one from a single forward pass, no negatives.

The graph gains one *virtual node* per class with fixed random features (drawn once, N(0, 1)), linked both
ways to every training node of its class; the augmented adjacency is renormalized as a GCN's,
``D^-1/2 (A + I) D^-1/2``, from the sparsity pattern of the one given. Layer ``l`` sees the row-normalized,
detached output of the layer below, ``x/(‖x‖₂ + 1e-8)``, and its local loss is the cross-entropy of the
training nodes' similarity to the virtual nodes, ``H[train] H[virtual]ᵀ/τ``. A prediction sums
``softmax(H_l[node] H_l[virtual]ᵀ/τ)`` over the layers. Every layer, the last included, is followed by a ReLU
(the official code's layers are conv + ReLU). The paper's layers all have the hidden width (its backprop
baseline ends in a C-wide layer instead); a model whose last layer is C wide still trains, with a C-dimensional
embedding for its last similarity.

``variant="top-down"`` feeds every layer, besides the layer below, the row-normalized output of the layer
above as computed in the previous step (the top layer: the labels, one-hot for training and virtual nodes and
uniform ``1/C`` for the others), as the official "top-to-input" variant concatenates the two inputs of one
graph convolution. Here the second input goes through a trainable map ``D_l`` and the augmented adjacency,
``layer(x̂, Â) + Â (t̂ D_lᵀ)``, before the ReLU: for a GCN layer that is exactly the convolution of the
concatenated input. The first step has no signal from above yet (zeros, as the paper's bottom-up
initialization); a prediction runs a bottom-up pass, then one pass with the top-down signals, and sums the
second pass's layers.

The paper trains layers greedily, layer l to early stopping on validation accuracy, then l+1. With
``steps_per_layer=k`` layer l trains alone during steps ``[l·k, (l+1)·k)`` (the last keeps training after);
there is no early stopping inside a step budget. The default, ``steps_per_layer=0``, steps every layer on its
detached input at every ``step``: the losses are the same, layer l's input keeps moving while those below train.
On sbm-gnn with 32-64-64 convolutions, all layers together reach 0.874 ± 0.010 after 200 steps (seeds 0-4;
the claim ``forward-gnn/sbm-near-backprop-gcn``).
Defaults: Adam lr 1e-3 and τ = 1 (the official scripts).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.localtrain.core import LocalTrainer
from trainlab.localtrain.registry import register_method
from trainlab.ranges import Between

PAPER = "Forward Learning of Graph Neural Networks (Park et al., ICLR 2024)"
_EPS = 1e-8


def row_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=1, keepdim=True) + _EPS)


def augment_with_virtual_nodes(adjacency: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The GCN-normalized adjacency of the graph plus ``C`` virtual nodes (indices ``N..N+C−1``).

    Virtual node ``c`` links both ways to every node labelled ``c``; nodes labelled -100 get no link.
    """
    n = adjacency.shape[0]
    pattern = adjacency.coalesce().indices() if adjacency.is_sparse else adjacency.nonzero().T
    labelled = (labels != -100).nonzero().flatten()
    virtual = n + labels[labelled]
    loops = torch.arange(n + num_classes, device=pattern.device).expand(2, -1)
    index = torch.cat([pattern, torch.stack([labelled, virtual]), torch.stack([virtual, labelled]), loops], dim=1)
    size = n + num_classes
    ones = torch.ones(index.shape[1], dtype=adjacency.dtype, device=index.device)
    binary = torch.sparse_coo_tensor(index, ones, (size, size), check_invariants=True).coalesce()
    index = binary.indices()
    degree = torch.bincount(index[0], minlength=size).to(ones.dtype)  # duplicates merged: the pattern counts once
    norm = degree.rsqrt()
    values = norm[index[0]] * norm[index[1]]
    return torch.sparse_coo_tensor(index, values, (size, size), check_invariants=True).coalesce()


class ForwardGNNClassifier(nn.Module):
    """Scores ``Σ_l softmax(H_l H_l[virtual]ᵀ/τ)`` for the real nodes of the graph it is given."""

    def __init__(self, trainer: ForwardGNN) -> None:
        super().__init__()
        self.trainer = trainer

    def forward(self, features: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        t = self.trainer
        outputs = t.forward_layers(features, adjacency, t.labels, top_down=None)
        if t.variant == "top-down":  # a second pass with the first pass's outputs as the top-down signal
            outputs = t.forward_layers(features, adjacency, t.labels, top_down=t.from_above(outputs, t.labels))
        n = features.shape[0]
        return sum(torch.softmax(t.similarity(h)[:n], dim=1) for h in outputs)


class ForwardGNN(LocalTrainer):
    """Single-forward (SF) layer-local training of graph layers called as ``layer(x, adjacency)``.

    ``model``'s child modules, in order, are the layers (a GCN's graph convolutions). A resumed run starts its
    top-down signal afresh (zeros at its first step), as a new run does.
    """

    _counters = ("steps_done",)

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        variant: str,
        lr: float,
        temperature: float,
        steps_per_layer: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(model.children())
        if not self.layers:
            raise ValueError("model has no child layers; ForwardGNN trains its children as graph layers")
        self.num_classes, self.variant, self.lr, self.temperature = num_classes, variant, lr, temperature
        self.steps_per_layer, self.steps_done = steps_per_layer, 0
        self.generator = torch.Generator().manual_seed(seed)
        self.top_down = nn.ModuleList()
        self.virtual: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self._previous: list[torch.Tensor] | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.predictor = ForwardGNNClassifier(self)

    def _trained(self) -> nn.Module:
        return nn.ModuleList([self.layers, self.top_down])

    def _prepare(self, inputs: Any) -> list[torch.optim.Optimizer]:
        features, adjacency = inputs
        self.virtual = torch.randn(self.num_classes, features.shape[1], generator=self.generator).to(features)
        if self.variant == "top-down":
            self.labels = torch.full((features.shape[0],), -100, dtype=torch.long, device=features.device)
            with torch.no_grad():
                widths = [h.shape[1] for h in self.forward_layers(features, adjacency, self.labels, None)]
            for below, above in zip(widths, [*widths[1:], self.num_classes], strict=True):
                self.top_down.append(nn.Linear(above, below, bias=False, dtype=features.dtype, device=features.device))
        return [torch.optim.Adam(self._trained().parameters(), lr=self.lr, foreach=True)]

    def augmented(self, adjacency: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The augmented adjacency, rebuilt only when the graph or the labels change."""
        if self._cache is None or self._cache[0] is not adjacency or not torch.equal(self._cache[1], labels):
            self._cache = (adjacency, labels.clone(), augment_with_virtual_nodes(adjacency, labels, self.num_classes))
        return self._cache[2]

    def similarity(self, h: torch.Tensor) -> torch.Tensor:
        """``H H[virtual]ᵀ/τ`` for every node of the augmented graph."""
        return h @ h[-self.num_classes :].T / self.temperature

    def label_signal(self, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The top layer's signal from above: one-hot labels of the labelled and virtual nodes, ``1/C`` elsewhere."""
        c = self.num_classes
        signal = torch.full((labels.shape[0] + c, c), 1.0 / c, dtype=like.dtype, device=like.device)
        labelled = (labels != -100).nonzero().flatten()
        signal[labelled] = F.one_hot(labels[labelled], c).to(like.dtype)
        signal[-c:] = torch.eye(c, dtype=like.dtype, device=like.device)
        return signal

    def from_above(self, outputs: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's top-down input: the next layer's output, and the label signal for the last."""
        return [*outputs[1:], self.label_signal(labels, outputs[0])]

    def _layer(self, l: int, x: torch.Tensor, adjacency: torch.Tensor, top: torch.Tensor | None) -> torch.Tensor:
        h = self.layers[l](row_normalize(x).detach(), adjacency)
        if top is not None:
            down = self.top_down[l](row_normalize(top).detach())
            h = h + (torch.sparse.mm(adjacency, down) if adjacency.is_sparse else adjacency @ down)
        return torch.relu(h)

    def forward_layers(
        self, features: torch.Tensor, adjacency: torch.Tensor, labels: torch.Tensor, top_down: list | None
    ) -> list[torch.Tensor]:
        """Every layer's output on the augmented graph (virtual nodes last), without training."""
        a = self.augmented(adjacency, labels)
        x = torch.cat([features, self.virtual])
        outputs = []
        for l in range(len(self.layers)):
            x = self._layer(l, x, a, None if top_down is None else top_down[l])
            outputs.append(x)
        return outputs

    def _step(self, inputs: Any, labels: torch.Tensor) -> torch.Tensor:
        (optimizer,) = self._optimizers
        features, adjacency = inputs
        self.labels = labels
        a = self.augmented(adjacency, labels)
        train = (labels != -100).nonzero().flatten()
        optimizer.zero_grad(set_to_none=True)
        x = torch.cat([features, self.virtual])
        total = torch.zeros(())
        outputs = []
        # Greedy (steps_per_layer > 0): only layer steps_done // steps_per_layer trains, the last one keeps on.
        training = (
            None if not self.steps_per_layer else min(self.steps_done // self.steps_per_layer, len(self.layers) - 1)
        )
        for l in range(len(self.layers)):
            top = None
            if self.variant == "top-down" and self._previous is not None:
                top = self._previous[l]
            if training is not None and l != training:
                with torch.no_grad():
                    x = self._layer(l, x, a, top)
                outputs.append(x)
                continue
            h = self._layer(l, x, a, top)
            loss = F.cross_entropy(self.similarity(h)[train], labels[train])
            loss.backward()  # the layer's graph is freed before the next layer runs
            total = total + loss.detach()
            x = h.detach()
            outputs.append(x)
        self.steps_done += 1
        optimizer.step()
        self._previous = self.from_above(outputs, labels) if self.variant == "top-down" else None
        return total


@register_method(
    "forward-gnn",
    paper=PAPER,
    summary="graph layers trained by a local loss against per-class virtual nodes (single forward, no negatives)",
    supports="graph-layers (the model's children, each called as layer(x, adjacency))",
    defaults={"variant": "single-forward", "lr": 1e-3, "temperature": 1.0, "steps_per_layer": 0, "seed": 0},
    ranges={
        "variant": ("single-forward", "top-down"),
        "lr": Between(1e-6, 1.0),
        "temperature": Between(1e-3, 1e3),
        "steps_per_layer": Between(0, 1 << 30, integer=True),
        "seed": Between(0, 2**63 - 1, integer=True),
    },
)
def forward_gnn(model: nn.Module, *, num_classes: int, **hp: Any) -> ForwardGNN:
    return ForwardGNN(model, num_classes=num_classes, **hp)
