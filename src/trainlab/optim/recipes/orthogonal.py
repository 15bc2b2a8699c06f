"""Muon and AuON (matrices, with AdamW for the rest by a declared rule) and the ⊥Grad wrapper.

Muon and AuON only make sense for hidden weight matrices. Both recipes route with
``matrices_to(<method>, "adamw", exclude=...)``: parameters with 2+ dimensions go to the matrix chain
unless their name matches ``exclude`` (embeddings and output heads by default); everything else (biases,
norm gains, excluded matrices) goes to an AdamW chain with its own ``adamw_*`` hyperparameters. Names are
only known when parameters come from ``model.named_parameters()``; with plain tensors only the
dimensionality rule applies. The rule routes groups added later with ``add_param_group`` too, and in
each group ``lr``, ``momentum`` and ``weight_decay`` drive the matrices while the ``adamw_*`` keys drive
the AdamW-routed members.
"""

from typing import Annotated, Any

import torch

from trainlab.optim.checks import (
    BETAS,
    FLAG,
    LR,
    NON_NEGATIVE,
    POSITIVE,
    REGEX_OR_NONE,
    FloatingDtypeOrNone,
    Interval,
    integer_at_least,
    unit_interval,
)
from trainlab.optim.optimizer import ChainOptimizer
from trainlab.optim.registry import Registered, checked, create, get_spec, ranges_of, register_optimizer
from trainlab.optim.routing import matrices_to
from trainlab.optim.transform import GradientTransform, chain
from trainlab.optim.transforms import (
    decoupled_weight_decay,
    orthogonalize_gradient,
    scale_by_adam,
    scale_by_auon,
    scale_by_muon,
)

MUON_SOURCE = "Muon: MomentUm Orthogonalized by Newton-Schulz (Keller Jordan, 2024 blog; KellerJordan/Muon)"
AUON_PAPER = "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates (Maity, 2025)"
ORTHOGRAD_PAPER = "Grokking at the Edge of Numerical Stability (Prieto, Barsbey, Mediano, Birdal, 2025)"

# Any name component containing "embed" (embed, token_embedding, word_embeddings, pos_embed), output heads
# and GPT-2's wte/wpe: the tensors muon.py's MuonWithAuxAdam example hands to Adam even though they are 2-D.
EMBEDDINGS_AND_HEADS = r"(^|\.)(\w*embed\w*|lm_head|head|wte|wpe)(\.|$)"


# A matrix's real view is a 3-D tensor whose orthogonalization mixes real and imaginary parts
# meaninglessly; no paper defines these methods for complex weights.
MATRIX_METHODS_ARE_REAL = "orthogonalized and low-rank matrix updates are defined for real matrices"

# The AdamW keys of a routed recipe, as the AdamW chain's own keys.
ADAMW_KEYS = {"adamw_lr": "lr", "adamw_betas": "betas", "adamw_eps": "eps", "adamw_weight_decay": "weight_decay"}


def _matrices_with_adamw(
    params: Any, method: str, transform: GradientTransform, hp: dict[str, Any], ranges: dict[str, Any]
) -> ChainOptimizer:
    """One optimizer: ``method``'s chain on the routed matrices, AdamW (its own ``adamw_*`` keys) on the rest."""
    return ChainOptimizer(
        params,
        {method: chain(decoupled_weight_decay(), transform), "adamw": chain(decoupled_weight_decay(), scale_by_adam())},
        rule=matrices_to(method, "adamw", exclude=hp.pop("exclude")),
        renames={"adamw": ADAMW_KEYS},
        ranges=ranges,
        refuse_complex=MATRIX_METHODS_ARE_REAL,
        **hp,
    )


# The auxiliary AdamW of muon.py's MuonWithAuxAdam: lr 3e-4, betas (0.9, 0.95), wd 0; its eps is 1e-10.
@register_optimizer(
    "muon",
    paper=MUON_SOURCE,
    summary="Nesterov momentum orthogonalized by 5 Newton-Schulz steps on hidden matrices; AdamW elsewhere",
)
def muon(
    params: Any,
    *,
    lr: Annotated[float, LR] = 0.02,
    momentum: Annotated[float, unit_interval()] = 0.95,
    nesterov: Annotated[bool, FLAG] = True,
    ns_steps: Annotated[int, integer_at_least(1)] = 5,
    ns_dtype: Annotated[torch.dtype | None, FloatingDtypeOrNone()] = None,
    ns_compile: Annotated[bool, FLAG] = False,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
    adamw_lr: Annotated[float, LR] = 3e-4,
    adamw_betas: Annotated[tuple[float, float], BETAS] = (0.9, 0.95),
    adamw_eps: Annotated[float, POSITIVE] = 1e-10,
    adamw_weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
    exclude: Annotated[str | None, REGEX_OR_NONE] = EMBEDDINGS_AND_HEADS,
) -> ChainOptimizer:
    """Muon on hidden matrices (Nesterov momentum, orthogonalized by Newton-Schulz, scaled by
    ``max(1, rows/cols)^½``), AdamW on everything else.

    Args:
        params: parameters, ``(name, parameter)`` pairs (for ``exclude``) or param groups (any key below
            but ``exclude`` per group; each group is routed by the same rule).
        lr: learning rate of the matrices.
        momentum: momentum of the matrices.
        nesterov: Nesterov momentum.
        ns_steps: Newton-Schulz iterations.
        ns_dtype: dtype of the Newton-Schulz iterations; None: float32 on the CPU, bfloat16 elsewhere
            (muon.py always iterates in bfloat16).
        ns_compile: run the Newton-Schulz iteration through torch.compile (one compiled function per matrix
            shape and dtype; eager, with a RuntimeWarning naming the reason, where compiling fails).
        weight_decay: decoupled weight decay of the matrices.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW of the other parameters.
        exclude: regular expression of parameter names that go to AdamW although they have 2+ dimensions
            (embeddings and output heads by default); None routes by dimensionality alone.
    """
    hp = checked(muon, locals())
    return _matrices_with_adamw(params, "muon", scale_by_muon(), hp, ranges_of(muon))


# AuON: lr 0.24 (package default and the c87b862 script), momentum 0.95, gamma 1.5, wd 0 (package
# AuON). The AdamW for the other parameters follows the c87b862 script: lr = 0.1 * 0.24, torch's
# default betas and eps, weight decay 0.1 (the README suggests Adam(8e-3, betas=(0.8, 0.95)) instead).
@register_optimizer(
    "auon",
    paper=AUON_PAPER,
    summary="Nesterov momentum, Frobenius-normalized and cosh-braked (linear time) on matrices; AdamW else",
)
def auon(
    params: Any,
    *,
    lr: Annotated[float, LR] = 0.24,
    momentum: Annotated[float, unit_interval()] = 0.95,
    nesterov: Annotated[bool, FLAG] = True,
    # 2γ|x| <= 40 keeps e^{2γx} finite in float32.
    gamma: Annotated[float, Interval(0.0, 20.0, low_open=True)] = 1.5,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
    adamw_lr: Annotated[float, LR] = 0.024,
    adamw_betas: Annotated[tuple[float, float], BETAS] = (0.9, 0.999),
    adamw_eps: Annotated[float, POSITIVE] = 1e-8,
    adamw_weight_decay: Annotated[float, NON_NEGATIVE] = 0.1,
    exclude: Annotated[str | None, REGEX_OR_NONE] = EMBEDDINGS_AND_HEADS,
) -> ChainOptimizer:
    """AuON on hidden matrices (Nesterov momentum, Frobenius-normalized, then a cosh brake of strength
    ``gamma``: linear time, no Newton-Schulz), AdamW on everything else.

    Args:
        params: parameters, ``(name, parameter)`` pairs (for ``exclude``) or param groups (any key below
            but ``exclude`` per group; each group is routed by the same rule).
        lr: learning rate of the matrices.
        momentum: momentum of the matrices.
        nesterov: Nesterov momentum.
        gamma: strength of the hyperbolic brake.
        weight_decay: decoupled weight decay of the matrices.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW of the other parameters.
        exclude: regular expression of parameter names that go to AdamW although they have 2+ dimensions.
    """
    hp = checked(auon, locals())
    return _matrices_with_adamw(params, "auon", scale_by_auon(), hp, ranges_of(auon))


def orthograd(transform: GradientTransform) -> GradientTransform:
    """``transform`` applied to ⊥Grad-projected gradients (the projection comes first in the chain)."""
    return chain(orthogonalize_gradient(), transform)


def orthogonalized(base: str, params: Any, **hyperparameters: Any) -> ChainOptimizer:
    """The registered transform-chain optimizer ``base`` with ⊥Grad in front of every one of its chains."""
    optimizer = create(base, params, **hyperparameters)
    if not isinstance(optimizer, ChainOptimizer):
        raise ValueError(
            f"base={base!r} is not a transform-chain recipe ({type(optimizer).__name__}); ⊥Grad wraps "
            "chain recipes such as 'adamw', 'sgd', 'muon'"
        )
    # Safe before the first step: ⊥Grad has no hyperparameters and no state.
    optimizer.chains = {name: orthograd(t) for name, t in optimizer.chains.items()}
    return optimizer


# ⊥AdamW of the paper's Fig. 1: lr 1e-2, beta2 0.99, eps 1e-25, no weight decay.
@register_optimizer(
    "orthograd",
    paper=ORTHOGRAD_PAPER,
    summary="⊥Grad: remove the gradient component along each weight tensor, then step a base recipe",
)
def orthograd_optimizer(
    params: Any,
    *,
    base: Annotated[str, Registered()] = "adamw",
    lr: Annotated[float, LR] = 1e-2,
    betas: Annotated[tuple[float, float], BETAS] = (0.9, 0.99),
    eps: Annotated[float, POSITIVE] = 1e-25,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
) -> ChainOptimizer:
    """⊥``base``: the base recipe stepping ``g − (⟨w, g⟩/⟨w, w⟩)·w`` (rescaled to ‖g‖) instead of ``g``.

    The defaults are ⊥AdamW's. For another base, ``lr`` and ``weight_decay`` carry over and ``betas``/``eps``
    do if it reads them; use `orthogonalized(base, params, ...)` to set any other of the base's
    hyperparameters (e.g. SGD's momentum).

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups (the base's keys per group).
        base: the registered chain recipe to wrap.
        lr: learning rate.
        betas: the base's betas (if it reads them).
        eps: the base's eps (if it reads it).
        weight_decay: the base's weight decay.
    """
    hp = checked(orthograd_optimizer, locals())
    base = hp.pop("base")
    accepted = get_spec(base).defaults
    defaults = get_spec("orthograd").defaults
    ignored = sorted(k for k, v in hp.items() if k not in accepted and v != defaults[k])
    if ignored:
        raise ValueError(f"base={base!r} does not accept {ignored}; it accepts {sorted(accepted)}")
    return orthogonalized(base, params, **{k: v for k, v in hp.items() if k in accepted})


# ⊥AdamW's hyperparameters (the recipe's defaults but ``base``), for comparisons at equal settings.
ORTHOGRAD_DEFAULTS = {k: v for k, v in get_spec("orthograd").defaults.items() if k != "base"}
