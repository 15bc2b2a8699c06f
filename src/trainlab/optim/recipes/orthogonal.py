"""Muon and AuON (matrices, with AdamW for the rest by a declared rule) and the ⊥Grad wrapper.

Muon and AuON only make sense for hidden weight matrices. Both recipes route with
``matrices_to(<method>, "adamw", exclude=...)``: parameters with 2+ dimensions go to the matrix chain
unless their name matches ``exclude`` (embeddings and output heads by default); everything else (biases,
norm gains, excluded matrices) goes to an AdamW chain with its own ``adamw_*`` hyperparameters. Names are
only known when parameters come from ``model.named_parameters()``; with plain tensors only the
dimensionality rule applies.
"""

from __future__ import annotations

from typing import Any

from trainlab.optim import checks
from trainlab.optim.optimizer import ChainOptimizer
from trainlab.optim.registry import create, get_spec, register_optimizer
from trainlab.optim.routing import matrices_to, partition
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


def _check_adamw(hp: dict[str, Any]) -> None:
    checks.betas("adamw_betas", hp["adamw_betas"])
    checks.in_range("adamw_eps", hp["adamw_eps"], 0.0, float("inf"))
    checks.in_range("adamw_weight_decay", hp["adamw_weight_decay"], 0.0, float("inf"))
    checks.in_range("adamw_lr", hp["adamw_lr"], 0.0, float("inf"))
    checks.regex_or_none("exclude", hp["exclude"])


def _matrices_with_adamw(params: Any, method: str, transform: GradientTransform, hp: dict[str, Any]) -> ChainOptimizer:
    """One optimizer: ``method``'s chain on the routed matrices, AdamW (own lr/betas/eps/wd) on the rest."""
    _check_adamw(hp)
    checks.in_range("momentum", hp["momentum"], 0.0, 1.0)
    checks.in_range("weight_decay", hp["weight_decay"], 0.0, float("inf"))
    hp = dict(hp)
    adamw = {
        "lr": hp.pop("adamw_lr"),
        "betas": tuple(hp.pop("adamw_betas")),
        "eps": hp.pop("adamw_eps"),
        "weight_decay": hp.pop("adamw_weight_decay"),
    }
    groups = partition(params, matrices_to(method, "adamw", exclude=hp.pop("exclude")), {"adamw": adamw})
    chains = {
        method: chain(decoupled_weight_decay(), transform),
        "adamw": chain(decoupled_weight_decay(), scale_by_adam()),
    }
    return ChainOptimizer(groups, chains, **hp)


# The auxiliary AdamW of muon.py's MuonWithAuxAdam: lr 3e-4, betas (0.9, 0.95), wd 0; its eps is 1e-10.
MUON_ADAMW = {"adamw_lr": 3e-4, "adamw_betas": (0.9, 0.95), "adamw_eps": 1e-10, "adamw_weight_decay": 0.0}


@register_optimizer(
    "muon",
    paper=MUON_SOURCE,
    summary="Nesterov momentum orthogonalized by 5 Newton-Schulz steps on hidden matrices; AdamW elsewhere",
    defaults={
        "lr": 0.02,
        "momentum": 0.95,
        "nesterov": True,
        "ns_steps": 5,
        "weight_decay": 0.0,
        **MUON_ADAMW,
        "exclude": EMBEDDINGS_AND_HEADS,
    },
)
def muon(params: Any, **hp: Any) -> ChainOptimizer:
    checks.positive_int("ns_steps", hp["ns_steps"])
    return _matrices_with_adamw(params, "muon", scale_by_muon(), hp)


# AuON: lr 0.24 (package default and the c87b862 script), momentum 0.95, gamma 1.5, wd 0 (package
# AuON). The AdamW for the other parameters follows the c87b862 script: lr = 0.1 * 0.24, torch's
# default betas and eps, weight decay 0.1 (the README suggests Adam(8e-3, betas=(0.8, 0.95)) instead).
AUON_ADAMW = {"adamw_lr": 0.024, "adamw_betas": (0.9, 0.999), "adamw_eps": 1e-8, "adamw_weight_decay": 0.1}


@register_optimizer(
    "auon",
    paper=AUON_PAPER,
    summary="Nesterov momentum, Frobenius-normalized and cosh-braked (linear time) on matrices; AdamW else",
    defaults={
        "lr": 0.24,
        "momentum": 0.95,
        "nesterov": True,
        "gamma": 1.5,
        "weight_decay": 0.0,
        **AUON_ADAMW,
        "exclude": EMBEDDINGS_AND_HEADS,
    },
)
def auon(params: Any, **hp: Any) -> ChainOptimizer:
    gamma = hp["gamma"]
    if not (isinstance(gamma, int | float) and 0 < gamma <= 20):  # 2γ|x| ≤ 40 keeps e^{2γx} finite in fp32
        raise ValueError(f"gamma must be a number in (0, 20], got {gamma!r}")
    return _matrices_with_adamw(params, "auon", scale_by_auon(), hp)


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
ORTHOGRAD_DEFAULTS = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-25, "weight_decay": 0.0}


@register_optimizer(
    "orthograd",
    paper=ORTHOGRAD_PAPER,
    summary="⊥Grad: remove the gradient component along each weight tensor, then step a base recipe",
    defaults={"base": "adamw", **ORTHOGRAD_DEFAULTS},
)
def orthograd_optimizer(params: Any, *, base: str, **hp: Any) -> ChainOptimizer:
    """⊥``base``; the defaults are ⊥AdamW's. For another base, ``lr`` and ``weight_decay`` carry over and
    ``betas``/``eps`` do if it reads them; use `orthogonalized(base, params, ...)` to set any other of the
    base's hyperparameters (e.g. SGD's momentum)."""
    accepted = get_spec(base).defaults
    ignored = sorted(k for k, v in hp.items() if k not in accepted and v != ORTHOGRAD_DEFAULTS[k])
    if ignored:
        raise ValueError(f"base={base!r} does not accept {ignored}; it accepts {sorted(accepted)}")
    return orthogonalized(base, params, **{k: v for k, v in hp.items() if k in accepted})
