"""First-order recipes: Lion, Lion-𝒦, diffGrad, SPAM and Stable-SPAM, each a short chain of shared transforms.

Each recipe declares its hyperparameters' ranges in its signature; `ChainOptimizer` holds every param group
(those added later too) to them.
"""

from typing import Annotated, Any

from trainlab.optim.checks import BETAS, LR, NON_NEGATIVE, POSITIVE, OneOf, integer_at_least, unit_interval
from trainlab.optim.optimizer import ChainOptimizer
from trainlab.optim.registry import checked, ranges_of, register_optimizer
from trainlab.optim.transform import chain
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
from trainlab.optim.transforms.lion import LION_K

LION_PAPER = "Symbolic Discovery of Optimization Algorithms (Chen et al., 2023)"
LION_K_PAPER = "Lion Secretly Solves Constrained Optimization: As Lyapunov Predicts (Chen et al., 2024)"
DIFFGRAD_PAPER = "diffGrad: An Optimization Method for Convolutional Neural Networks (Dubey et al., 2019)"
SPAM_PAPER = "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training (Huang et al., 2025)"
STABLE_SPAM_PAPER = "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam (Huang et al., 2025)"

LION_BETAS = (0.9, 0.99)


@register_optimizer(
    "lion",
    paper=LION_PAPER,
    summary="sign of an interpolated momentum with decoupled weight decay; 1x state (lr 3-10x below AdamW's)",
)
def lion(
    params: Any,
    *,
    lr: Annotated[float, LR] = 1e-4,
    betas: Annotated[tuple[float, float], BETAS] = LION_BETAS,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
) -> ChainOptimizer:
    """Lion: ``p -= lr·(sign(β1·m + (1−β1)·g) + wd·p)``, ``m ← β2·m + (1−β2)·g`` (the paper's defaults).

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups (any of these keys per group).
        lr: learning rate (3-10x smaller than AdamW's, per the paper).
        betas: (β1 of the update's interpolation, β2 of the momentum).
        weight_decay: decoupled weight decay, multiplied by lr.
    """
    hp = checked(lion, locals())
    return ChainOptimizer(params, chain(decoupled_weight_decay(), scale_by_lion("l1")), ranges=ranges_of(lion), **hp)


@register_optimizer(
    "lion-k",
    paper=LION_K_PAPER,
    summary="Lion-K: grad K of the interpolated momentum; k='l1' (Lion) keeps ||x||_inf <= 1/wd, 'l2' ||x||_2 <= 1/wd",
)
def lion_k(
    params: Any,
    *,
    lr: Annotated[float, LR] = 1e-4,
    betas: Annotated[tuple[float, float], BETAS] = LION_BETAS,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
    k: Annotated[str, OneOf(LION_K)] = "l1",
) -> ChainOptimizer:
    """Lion-𝒦: Lion with ``sign`` replaced by ∇𝒦 of the interpolated momentum.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups (lr, betas, weight_decay per group).
        lr: learning rate.
        betas: (β1 of the update's interpolation, β2 of the momentum).
        weight_decay: decoupled weight decay λ; the iterates stay in {𝒦*(x) <= 1/λ}.
        k: ``"l1"`` (𝒦 = ‖·‖₁, ∇𝒦 = sign: Lion) or ``"l2"`` (𝒦 = ‖·‖₂, ∇𝒦 = x/‖x‖₂). Fixed at construction.
    """
    hp = checked(lion_k, locals())
    transform = chain(decoupled_weight_decay(), scale_by_lion(hp.pop("k")))
    return ChainOptimizer(params, transform, ranges=ranges_of(lion_k), **hp)


@register_optimizer(
    "diffgrad",
    paper=DIFFGRAD_PAPER,
    summary="Adam with the first moment damped by sigmoid(|g_prev - g|) (v2 code: coupled L2 decay, copied g_prev)",
)
def diffgrad(
    params: Any,
    *,
    lr: Annotated[float, LR] = 1e-3,
    betas: Annotated[tuple[float, float], BETAS] = (0.9, 0.999),
    eps: Annotated[float, POSITIVE] = 1e-8,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
) -> ChainOptimizer:
    """diffGrad: Adam whose m̂ is multiplied by the friction ``sigmoid(|g_prev − g|)``.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups (any of these keys per group).
        lr: learning rate.
        betas: decay rates of the first and second moments.
        eps: added to √v̂.
        weight_decay: L2 penalty added to the gradient (the official v2 code's coupled decay).
    """
    hp = checked(diffgrad, locals())
    transform = chain(add_weight_decay(), scale_by_diffgrad())
    return ChainOptimizer(params, transform, ranges=ranges_of(diffgrad), **hp)


@register_optimizer(
    "spam",
    paper=SPAM_PAPER,
    summary="Adam with spike-aware clipping (g^2 > theta*v), momentum reset every reset_interval and cosine warmup",
)
def spam(
    params: Any,
    *,
    lr: Annotated[float, LR] = 1e-3,
    betas: Annotated[tuple[float, float], BETAS] = (0.9, 0.999),
    eps: Annotated[float, POSITIVE] = 1e-6,
    theta: Annotated[float, POSITIVE] = 5000.0,
    reset_interval: Annotated[int, integer_at_least(1)] = 500,
    warmup_steps: Annotated[int, integer_at_least(0)] = 150,
    # v is zero at the first step, and clipping against a zero v zeroes the gradient for good.
    n_acc: Annotated[int, integer_at_least(2)] = 20,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
) -> ChainOptimizer:
    """SPAM: Adam whose moments reset every ``reset_interval`` steps (with a cosine lr warmup of
    ``warmup_steps`` after each reset), and whose gradient entries with ``g² > θ·v`` are clipped to
    ``sign(g)·√(θ·v)`` once ``n_acc`` steps have filled v.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups (any of these keys per group).
        lr: learning rate.
        betas: decay rates of the first and second moments.
        eps: added to √v.
        theta: spike threshold θ.
        reset_interval: steps between momentum resets.
        warmup_steps: cosine warmup after each reset.
        n_acc: steps before spike clipping starts (>= 2: the second moment is zero at the first step).
        weight_decay: decoupled weight decay, multiplied by lr.
    """
    # Weight decay shrinks the parameters before the step (as AdamW); SPAM.py decays after it, which
    # differs by a factor (1 − lr·wd) on the step, O(lr²·wd).
    hp = checked(spam, locals())
    transform = chain(decoupled_weight_decay(), clip_spikes(scale_by_spam_adam()))
    return ChainOptimizer(params, transform, ranges=ranges_of(spam), **hp)


@register_optimizer(
    "stable-spam",
    paper=STABLE_SPAM_PAPER,
    summary="adaptive spike clip, gradient-norm normalization, Adam with momentum reset, decoupled weight decay",
)
def stable_spam(
    params: Any,
    *,
    lr: Annotated[float, LR] = 1e-3,
    betas: Annotated[tuple[float, float], BETAS] = (0.9, 0.999),
    eps: Annotated[float, POSITIVE] = 1e-8,
    gamma1: Annotated[float, unit_interval()] = 0.7,
    gamma2: Annotated[float, unit_interval()] = 0.9,
    gamma3: Annotated[float, unit_interval()] = 0.999,
    reset_interval: Annotated[int, integer_at_least(1)] = 1000,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
) -> ChainOptimizer:
    """Stable-SPAM: adaptive spike clipping (threshold: an EMA with rate γ3 of max|g|), gradient-norm
    normalization (EMAs γ1, γ2 of ‖g‖ and ‖g‖²), Adam with momentum reset, decoupled weight decay.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups (any of these keys per group).
        lr: learning rate.
        betas: decay rates of the first and second moments.
        eps: added to √v̂.
        gamma1: EMA rate of the gradient norm.
        gamma2: EMA rate of the squared gradient norm.
        gamma3: EMA rate of the spike threshold.
        reset_interval: steps between momentum resets.
        weight_decay: decoupled weight decay, multiplied by lr.
    """
    # The official class can also scale β1 and γ1 by a cosine from 1 to 0.5 over a given total step count
    # (`t_max`); it is off by default there and absent from the paper's algorithm, so it is left out.
    hp = checked(stable_spam, locals())
    transform = chain(
        decoupled_weight_decay(), clip_spikes_adaptive(), normalize_gradient_norm(), scale_by_adam_with_resets()
    )
    return ChainOptimizer(params, transform, ranges=ranges_of(stable_spam), **hp)
