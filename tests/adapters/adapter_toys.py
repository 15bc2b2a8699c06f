"""Toy float64 models and small per-method configurations shared by the adapter tests (a plain module, not
conftest: another tests/ folder's conftest would shadow `from conftest import ...` in a whole-suite run)."""

from __future__ import annotations

import torch
from torch import nn

import trainlab.adapters as adapters

# Small settings that fit the toy layers (16 <-> 32); every registered method must have one.
TOY_CONFIGS = {
    "lora": {"r": 4},
    "lora-ga": {"r": 4},
    "adalora": {"r": 4},
    "bone": {"r": 8},
    "hut": {"r": 4},
    "s2ft": {"ratio": 0.25},
    "sara": {"fraction": 0.2},
    "snell": {"r": 4, "sparsity": 0.5, "drop_path": 0.0},  # DropPath makes train-mode outputs random
    "welore": {"reduction": 0.5},
}
# Training-callback options that make every phase happen within a few steps.
TOY_CALLBACKS = {
    "adalora": {"total_steps": 6, "init_warmup": 1, "final_warmup": 2, "mask_interval": 1, "target_rank": 2},
    "sara": {"progressive_iter": 2, "min_dim": 0},
    "snell": {"total_steps": 6},
}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)).double()


def regression_batch(seed: int = 0, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g, dtype=torch.float64), torch.randn(n, 16, generator=g, dtype=torch.float64)


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


def adapted(method: str, model: nn.Module | None = None, **extra) -> tuple[nn.Module, nn.Module]:
    """(plain model, adapted copy), prepared when the method needs data."""
    torch.manual_seed(0)
    plain = model if model is not None else mlp()
    model = adapters.attach(plain, method, targets=[nn.Linear], **{**TOY_CONFIGS[method], **extra})
    adapters.prepare(model, [regression_batch(1), regression_batch(2)], loss=mse)
    return plain, model


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.1, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in adapters.trainable_parameters(model):
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
