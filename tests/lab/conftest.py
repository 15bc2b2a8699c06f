"""A tiny synthetic workload, so runner tests do not depend on the built-in data."""

import pytest
import torch
from torch import nn

from trainlab.lab.workloads.base import Workload


def _tiny() -> Workload:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(256, 8, generator=g)
    y = (x @ torch.randn(8, generator=g) > 0).long()

    def make_batch(batch_size: int, gen: torch.Generator):
        idx = torch.randint(0, 200, (batch_size,), generator=gen)
        return x[idx], y[idx]

    def loss(model: nn.Module, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        return (model(x[200:]).argmax(-1) == y[200:]).float().mean().item()

    return Workload(
        name="tiny",
        description="linearly separable toy data",
        make_model=lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)),
        make_batch=make_batch,
        loss=loss,
        evaluate=evaluate,
        metric="accuracy",
        higher_is_better=True,
        target=0.9,
        steps=60,
        batch_size=16,
        eval_every=10,
        hyperparameters={"adamw": {"lr": 1e-2}},
    )


@pytest.fixture
def tiny() -> Workload:
    return _tiny()
