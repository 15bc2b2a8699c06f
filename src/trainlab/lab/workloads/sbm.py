"""Node classification on a generated stochastic-block-model graph with a 2-layer GCN.

Nodes link mostly within their class and carry noisy class-correlated features, so neighbours' features
help: the GCN (Kipf & Welling, 2017) clearly beats a model that sees each node's own features only.

Measured (seeds 0 and 1, full batch, ~4 ms a step): AdamW lr 1e-2 (Kipf & Welling's) passes 0.85
validation accuracy at step 10-11, peaks at 0.92-0.925 and, overfitting the 200 training nodes, ends
at 0.885-0.89 after 200 steps; SGD with Nesterov momentum passes 0.85 at step 10-12 with lr 0.3 and
21-23 with lr 0.1. The same network with the identity as adjacency (a feature-only MLP) peaks at
0.625-0.65.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainlab.lab.workloads.base import Workload, register_workload
from trainlab.lab.workloads.supervised import accuracy_evaluator

NODES = 1000
CLASSES = 5
FEATURES = 32
_P_IN, _P_OUT = 0.02, 0.002  # expected degree: 4 within the class, 1.6 across
_FEATURE_NOISE = 4.0  # std of the per-node noise around unit-variance class means, before standardizing
_TRAIN, _VAL = 200, 200  # node counts; the remaining 600 are the test nodes


@dataclass(frozen=True)
class Graph:
    """Features (n, d), the normalized adjacency D^-1/2 (A + I) D^-1/2 (sparse), labels and node splits."""

    features: torch.Tensor
    adjacency: torch.Tensor
    labels: torch.Tensor
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    test_idx: torch.Tensor


def normalized_adjacency(edges: torch.Tensor, n: int) -> torch.Tensor:
    """D^-1/2 (A + I) D^-1/2 as a coalesced sparse tensor, from undirected ``edges`` (2, m) listed once."""
    loops = torch.arange(n).expand(2, n)
    index = torch.cat([edges, edges.flip(0), loops], dim=1)
    degree = torch.bincount(index[0], minlength=n).float()
    norm = degree.rsqrt()
    values = norm[index[0]] * norm[index[1]]
    return torch.sparse_coo_tensor(index, values, (n, n), check_invariants=True).coalesce()


@functools.cache
def sbm_graph(seed: int = 0) -> Graph:
    """The stochastic-block-model graph, its features and its 200/200/600 train/val/test split."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(NODES) % CLASSES)
    same = labels[:, None] == labels[None, :]
    upper = np.triu(rng.random((NODES, NODES)) < np.where(same, _P_IN, _P_OUT), k=1)
    edges = torch.from_numpy(np.stack(np.nonzero(upper)))
    means = rng.normal(size=(CLASSES, FEATURES))
    noisy = means[labels] + _FEATURE_NOISE * rng.normal(size=(NODES, FEATURES))
    features = noisy / np.sqrt(1.0 + _FEATURE_NOISE**2)  # unit variance, as features are usually scaled
    order = torch.from_numpy(rng.permutation(NODES))
    return Graph(
        features=torch.tensor(features, dtype=torch.float32),
        adjacency=normalized_adjacency(edges, NODES),
        labels=torch.from_numpy(labels),
        train_idx=order[:_TRAIN],
        val_idx=order[_TRAIN : _TRAIN + _VAL],
        test_idx=order[_TRAIN + _VAL :],
    )


class GraphConv(nn.Module):
    """One GCN layer: adjacency @ (x W) + b, the bias added after propagation as in Kipf & Welling."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(adjacency, self.linear(x)) + self.bias


class GCN(nn.Module):
    """Two graph convolutions with a ReLU between; logits for every node."""

    def __init__(self, in_features: int = FEATURES, hidden: int = 64, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv1 = GraphConv(in_features, hidden)
        self.conv2 = GraphConv(hidden, classes)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x, adjacency)), adjacency)


def gcn_loss(model: nn.Module, graph: Graph) -> torch.Tensor:
    """Cross-entropy on the training nodes of a full-graph forward pass."""
    logits = model(graph.features, graph.adjacency)
    return F.cross_entropy(logits[graph.train_idx], graph.labels[graph.train_idx])


@register_workload("sbm-gnn")
def sbm_gnn() -> Workload:
    """Full batch: ``make_batch`` ignores its arguments and returns the whole graph."""
    return Workload(
        name="sbm-gnn",
        description="node classification on a 1000-node 5-class SBM graph, 2-layer GCN, full batch",
        make_model=GCN,
        make_batch=lambda batch_size, generator: sbm_graph(),
        loss=gcn_loss,
        evaluate=accuracy_evaluator(
            lambda: (sbm_graph(), sbm_graph().labels[sbm_graph().val_idx]),
            lambda model, g: model(g.features, g.adjacency)[g.val_idx],
        ),
        metric="accuracy",
        higher_is_better=True,
        target=0.85,
        steps=100,
        batch_size=NODES,
        eval_every=2,
        hyperparameters={
            "adamw": {"lr": 1e-2, "weight_decay": 5e-4},
            "sgd": {"lr": 0.3, "momentum": 0.9, "nesterov": True},
        },
    )
