"""AdamW and SGD as chains, plus torch.optim's own implementations as reference baselines."""

from __future__ import annotations

from typing import Any

import torch

from trainlab.optim.optimizer import ChainOptimizer
from trainlab.optim.registry import register_optimizer
from trainlab.optim.transform import chain
from trainlab.optim.transforms import add_weight_decay, decoupled_weight_decay, scale_by_adam, trace_momentum

ADAMW_PAPER = "Decoupled Weight Decay Regularization (Loshchilov & Hutter, 2019)"
SGD_PAPER = "On the importance of initialization and momentum in deep learning (Sutskever et al., 2013)"


@register_optimizer(
    "adamw",
    paper=ADAMW_PAPER,
    summary="Adam moments with decoupled weight decay, as a transform chain (matches torch.optim.AdamW)",
    defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
)
def adamw(params: Any, **hp: Any) -> ChainOptimizer:
    return ChainOptimizer(params, chain(decoupled_weight_decay(), scale_by_adam()), **hp)


@register_optimizer(
    "sgd",
    paper=SGD_PAPER,
    summary="SGD with heavy-ball or Nesterov momentum and L2 weight decay, as a transform chain",
    defaults={"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
)
def sgd(params: Any, **hp: Any) -> ChainOptimizer:
    return ChainOptimizer(params, chain(add_weight_decay(), trace_momentum()), **hp)


@register_optimizer(
    "torch-adamw",
    paper=ADAMW_PAPER,
    summary="torch.optim.AdamW (foreach), the reference implementation",
    defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
)
def torch_adamw(params: Any, **hp: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, foreach=True, **hp)


@register_optimizer(
    "torch-sgd",
    paper=SGD_PAPER,
    summary="torch.optim.SGD (foreach), the reference implementation",
    defaults={"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
)
def torch_sgd(params: Any, **hp: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, foreach=True, **hp)
