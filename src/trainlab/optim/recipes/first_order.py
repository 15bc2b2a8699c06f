"""First-order recipes: Lion, Lion-𝒦, diffGrad, SPAM and Stable-SPAM, each a short chain of shared transforms.

Hyperparameters are checked on every param group when the optimizer is built, so a per-group override
is held to the same ranges as the defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from trainlab.optim.optimizer import ChainOptimizer
from trainlab.optim.registry import register_optimizer
from trainlab.optim.transform import GradientTransform, chain
from trainlab.optim.transforms import (
    add_weight_decay,
    clip_spikes,
    clip_spikes_adaptive,
    decoupled_weight_decay,
    normalize_gradient_norm,
    scale_by_adam_with_resets,
    scale_by_diffgrad,
    scale_by_lion,
    scale_by_spam_adam,
)

LION_PAPER = "Symbolic Discovery of Optimization Algorithms (Chen et al., 2023)"
LION_K_PAPER = "Lion Secretly Solves Constrained Optimization: As Lyapunov Predicts (Chen et al., 2024)"
DIFFGRAD_PAPER = "diffGrad: An Optimization Method for Convolutional Neural Networks (Dubey et al., 2019)"
SPAM_PAPER = "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training (Huang et al., 2025)"
STABLE_SPAM_PAPER = "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam (Huang et al., 2025)"

Check = Callable[[Mapping[str, Any]], None]


def _fail(name: str, allowed: str, value: Any) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _unit_interval(*names: str) -> Check:
    def check(group: Mapping[str, Any]) -> None:
        for name in names:
            value = group[name]
            if not isinstance(value, int | float) or not 0 <= value < 1:
                _fail(name, "a number in [0, 1)", value)

    return check


def _positive(*names: str) -> Check:
    def check(group: Mapping[str, Any]) -> None:
        for name in names:
            value = group[name]
            if not isinstance(value, int | float) or not value > 0:
                _fail(name, "a number > 0", value)

    return check


def _integer_at_least(name: str, low: int, why: str = "") -> Check:
    def check(group: Mapping[str, Any]) -> None:
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            _fail(name, f"an integer >= {low}{why}", value)

    return check


def _betas(group: Mapping[str, Any]) -> None:
    betas = group["betas"]
    if (
        not isinstance(betas, tuple | list)
        or len(betas) != 2
        or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas)
    ):
        _fail("betas", "a pair of numbers in [0, 1)", betas)


def _weight_decay(group: Mapping[str, Any]) -> None:
    wd = group["weight_decay"]
    if not isinstance(wd, int | float) or wd < 0:
        _fail("weight_decay", "a number >= 0", wd)


def _build(params: Any, transform: GradientTransform, checks: list[Check], hp: Mapping[str, Any]) -> ChainOptimizer:
    optimizer = ChainOptimizer(params, transform, **hp)
    for group in optimizer.param_groups:
        for check in [_betas, _weight_decay, *checks]:
            check(group)
    return optimizer


LION_DEFAULTS = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0}


@register_optimizer(
    "lion",
    paper=LION_PAPER,
    summary="sign of an interpolated momentum with decoupled weight decay; 1x state (lr 3-10x below AdamW's)",
    defaults=LION_DEFAULTS,
)
def lion(params: Any, **hp: Any) -> ChainOptimizer:
    return _build(params, chain(decoupled_weight_decay(), scale_by_lion("l1")), [], hp)


@register_optimizer(
    "lion-k",
    paper=LION_K_PAPER,
    summary="Lion-K: grad K of the interpolated momentum; k='l1' (Lion) keeps ||x||_inf <= 1/wd, 'l2' ||x||_2 <= 1/wd",
    defaults={**LION_DEFAULTS, "k": "l1"},
)
def lion_k(params: Any, *, k: str, **hp: Any) -> ChainOptimizer:
    return _build(params, chain(decoupled_weight_decay(), scale_by_lion(k)), [], hp)


@register_optimizer(
    "diffgrad",
    paper=DIFFGRAD_PAPER,
    summary="Adam with the first moment damped by sigmoid(|g_prev - g|) (v2 code: coupled L2 decay, copied g_prev)",
    defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
)
def diffgrad(params: Any, **hp: Any) -> ChainOptimizer:
    return _build(params, chain(add_weight_decay(), scale_by_diffgrad()), [_positive("eps")], hp)


@register_optimizer(
    "spam",
    paper=SPAM_PAPER,
    summary="Adam with spike-aware clipping (g^2 > theta*v), momentum reset every reset_interval and cosine warmup",
    defaults={
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-6,
        "theta": 5000.0,
        "reset_interval": 500,
        "warmup_steps": 150,
        "n_acc": 20,
        "weight_decay": 0.0,
    },
)
def spam(params: Any, **hp: Any) -> ChainOptimizer:
    # Weight decay shrinks the parameters before the step (as AdamW); SPAM.py decays after it, which
    # differs by a factor (1 − lr·wd) on the step, O(lr²·wd).
    checks = [
        _positive("eps", "theta"),
        _integer_at_least("reset_interval", 1),
        _integer_at_least("warmup_steps", 0),
        # v is zero at the first step, and clipping against a zero v zeroes the gradient for good.
        _integer_at_least("n_acc", 2, " (clipping against the zero second moment of step 1 zeroes it)"),
    ]
    return _build(params, chain(decoupled_weight_decay(), clip_spikes(scale_by_spam_adam())), checks, hp)


@register_optimizer(
    "stable-spam",
    paper=STABLE_SPAM_PAPER,
    summary="adaptive spike clip, gradient-norm normalization, Adam with momentum reset, decoupled weight decay",
    defaults={
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "gamma1": 0.7,
        "gamma2": 0.9,
        "gamma3": 0.999,
        "reset_interval": 1000,
        "weight_decay": 0.0,
    },
)
def stable_spam(params: Any, **hp: Any) -> ChainOptimizer:
    # The official class can also scale β1 and γ1 by a cosine from 1 to 0.5 over a given total step count
    # (`t_max`); it is off by default there and absent from the paper's algorithm, so it is left out.
    checks = [_positive("eps"), _unit_interval("gamma1", "gamma2", "gamma3"), _integer_at_least("reset_interval", 1)]
    transform = chain(
        decoupled_weight_decay(), clip_spikes_adaptive(), normalize_gradient_norm(), scale_by_adam_with_resets()
    )
    return _build(params, transform, checks, hp)
