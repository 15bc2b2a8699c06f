"""AdamW and SGD as chains, plus torch.optim's own implementations as reference baselines."""

from typing import Annotated, Any

import torch

from trainlab.optim.checks import BETAS, FLAG, LR, NON_NEGATIVE, POSITIVE, unit_interval
from trainlab.optim.optimizer import ChainOptimizer
from trainlab.optim.registry import checked, ranges_of, register_optimizer
from trainlab.optim.transform import chain
from trainlab.optim.transforms import add_weight_decay, decoupled_weight_decay, scale_by_adam, trace_momentum

ADAMW_PAPER = "Decoupled Weight Decay Regularization (Loshchilov & Hutter, 2019)"
SGD_PAPER = "On the importance of initialization and momentum in deep learning (Sutskever et al., 2013)"


@register_optimizer(
    "adamw",
    paper=ADAMW_PAPER,
    summary="Adam moments with decoupled weight decay, as a transform chain (matches torch.optim.AdamW)",
)
def adamw(
    params: Any,
    *,
    lr: Annotated[float, LR] = 1e-3,
    betas: Annotated[tuple[float, float], BETAS] = (0.9, 0.999),
    eps: Annotated[float, POSITIVE] = 1e-8,
    weight_decay: Annotated[float, NON_NEGATIVE] = 1e-2,
) -> ChainOptimizer:
    """AdamW: ``p -= lr·(wd·p + m̂/(√v̂ + eps))``, equal to ``torch.optim.AdamW``.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups (any of these keys per group).
        lr: learning rate (a number or a one-element tensor).
        betas: decay rates of the first and second moments.
        eps: added to √v̂.
        weight_decay: decoupled weight decay, multiplied by lr.
    """
    hp = checked(adamw, locals())
    return ChainOptimizer(params, chain(decoupled_weight_decay(), scale_by_adam()), ranges=ranges_of(adamw), **hp)


@register_optimizer(
    "sgd",
    paper=SGD_PAPER,
    summary="SGD with heavy-ball or Nesterov momentum and L2 weight decay, as a transform chain",
)
def sgd(
    params: Any,
    *,
    lr: Annotated[float, LR] = 0.1,
    momentum: Annotated[float, unit_interval()] = 0.9,
    dampening: Annotated[float, unit_interval(closed=True)] = 0.0,
    nesterov: Annotated[bool, FLAG] = False,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
) -> ChainOptimizer:
    """SGD with momentum, equal to ``torch.optim.SGD``: ``b = μb + (1−dampening)(g + wd·p)``, ``p -= lr·b``
    (Nesterov: ``p -= lr·(g + μb)``).

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups (any of these keys per group).
        lr: learning rate.
        momentum: momentum factor μ (0 disables momentum).
        dampening: dampening of the gradient added to the momentum buffer.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        weight_decay: L2 penalty added to the gradient.
    """
    hp = checked(sgd, locals())
    return ChainOptimizer(params, chain(add_weight_decay(), trace_momentum()), ranges=ranges_of(sgd), **hp)


@register_optimizer(
    "torch-adamw", paper=ADAMW_PAPER, summary="torch.optim.AdamW (foreach), the reference implementation"
)
def torch_adamw(
    params: Any,
    *,
    lr: Annotated[float, LR] = 1e-3,
    betas: Annotated[tuple[float, float], BETAS] = (0.9, 0.999),
    eps: Annotated[float, POSITIVE] = 1e-8,
    weight_decay: Annotated[float, NON_NEGATIVE] = 1e-2,
) -> torch.optim.Optimizer:
    """``torch.optim.AdamW(params, foreach=True, ...)``, the baseline for `adamw`.

    Args: as `adamw` (a tensor lr needs ``capturable=True`` in torch, which this baseline does not set).
    """
    return torch.optim.AdamW(params, foreach=True, **checked(torch_adamw, locals()))


@register_optimizer("torch-sgd", paper=SGD_PAPER, summary="torch.optim.SGD (foreach), the reference implementation")
def torch_sgd(
    params: Any,
    *,
    lr: Annotated[float, LR] = 0.1,
    momentum: Annotated[float, unit_interval()] = 0.9,
    dampening: Annotated[float, unit_interval(closed=True)] = 0.0,
    nesterov: Annotated[bool, FLAG] = False,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
) -> torch.optim.Optimizer:
    """``torch.optim.SGD(params, foreach=True, ...)``, the baseline for `sgd`.

    Args: as `sgd`.
    """
    return torch.optim.SGD(params, foreach=True, **checked(torch_sgd, locals()))
