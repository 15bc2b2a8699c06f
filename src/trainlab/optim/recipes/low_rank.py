"""Memory-efficient optimizers for matrices: GaLore, FRUGAL, COSMOS and GradNormLoRP.

Routing is declared, as for Muon: ``matrices_to(<method>, "adamw", exclude=...)`` sends every parameter
with 2+ dimensions to the method unless its name matches ``exclude`` (embeddings, output heads and
norms by default); everything else, and every 1-D parameter, gets AdamW with the *same* lr, betas, eps
and weight decay, as in each official optimizer (one optimizer, a group without ``rank``). ``rank`` is an
int (capped at min(m, n)) or a float in (0, 1], the fraction of min(m, n) of each matrix.
"""

from __future__ import annotations

from typing import Any

from trainlab.optim import checks
from trainlab.optim.optimizer import ChainOptimizer
from trainlab.optim.recipes.orthogonal import EMBEDDINGS_AND_HEADS
from trainlab.optim.registry import register_optimizer
from trainlab.optim.routing import matrices_to, partition
from trainlab.optim.transform import GradientTransform, chain
from trainlab.optim.transforms import decoupled_weight_decay, scale_by_adam
from trainlab.optim.transforms.cosmos import scale_by_cosmos
from trainlab.optim.transforms.projection import (
    INACTIVE_RULES,
    ScaleByWeightNormProjection,
    project_subspace,
    scale_by_adam_raw_eps,
)

GALORE_PAPER = "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection (Zhao et al., 2024)"
FRUGAL_PAPER = "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead (Zmushko et al., 2025)"
COSMOS_PAPER = "COSMOS: A Hybrid Adaptive Optimizer for Memory-Efficient Training of LLMs (Liu et al., 2025)"
GRADNORM_LORP_PAPER = "Gradient Weight-normalized Low-rank Projection for Efficient LLM Training (Huang et al., 2025)"

# Embeddings and heads (as for Muon) plus normalization layers (LayerNorm/RMSNorm gains are 1-D anyway;
# this also catches 2-D norm parameters): the tensors GaLore and FRUGAL leave to full AdamW.
NORMS = r"(^|\.)(\w*norm\w*|ln(_\w+|\d*))(\.|$)"
LOW_RANK_EXCLUDE = f"{EMBEDDINGS_AND_HEADS}|{NORMS}"
PROJECTIONS = ("svd", "random", "blocks")


def _check_rank(rank: Any) -> None:
    ok_int = isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1
    ok_frac = isinstance(rank, float) and 0 < rank <= 1
    if not (ok_int or ok_frac):
        raise ValueError(f"rank must be an int >= 1 or a float in (0, 1] (fraction of min(m, n)), got {rank!r}")


def _check_common(hp: dict[str, Any]) -> None:
    checks.betas("betas", hp["betas"])
    checks.in_range("eps", hp["eps"], 0.0, float("inf"))
    checks.in_range("weight_decay", hp["weight_decay"], 0.0, float("inf"))
    checks.regex_or_none("exclude", hp["exclude"])


def _routed(
    params: Any, method: str, matrices: GradientTransform, others: GradientTransform, hp: dict[str, Any]
) -> ChainOptimizer:
    """``matrices`` on the routed matrices, decoupled-decay ``others`` (Adam) on the rest; shared hp.

    Integer state (coordinate indices, seeds) survives `load_state_dict`: `ChainOptimizer` restores state
    tensors whose dtype differs from their parameter's as they were saved."""
    _check_common(hp)
    hp = dict(hp)
    groups = partition(params, matrices_to(method, "adamw", exclude=hp.pop("exclude")))
    chains = {method: matrices, "adamw": chain(decoupled_weight_decay(), others)}
    return ChainOptimizer(groups, chains, **hp)


def _check_projected(hp: dict[str, Any]) -> None:
    _check_rank(hp["rank"])
    checks.positive_int("update_proj_gap", hp["update_proj_gap"])
    checks.in_range("scale", hp["scale"], 0.0, float("inf"))


def _galore_chain(projection: str) -> GradientTransform:
    return project_subspace(projection, scale_by_adam_raw_eps())


# GaLore's pretraining defaults (60M: rank 128), eps 1e-6 and galore_torch.AdamW's transformers-style
# eps placement (on the uncorrected sqrt(v)), also used for the AdamW-routed tensors. Moments are kept
# when the projector is refreshed (reset_statistics=False), as in the official code.
GALORE_DEFAULTS = {
    "lr": 0.01,
    "rank": 128,
    "scale": 0.25,
    "update_proj_gap": 200,
    "betas": (0.9, 0.999),
    "eps": 1e-6,
    "weight_decay": 0.0,
    "reset_statistics": False,
    "exclude": LOW_RANK_EXCLUDE,
}


@register_optimizer(
    "galore",
    paper=GALORE_PAPER,
    summary="Adam moments in a rank-r SVD subspace of each matrix's gradient, refreshed every T steps",
    defaults=GALORE_DEFAULTS,
)
def galore(params: Any, **hp: Any) -> ChainOptimizer:
    _check_projected(hp)
    matrices = chain(decoupled_weight_decay(), _galore_chain("svd"))
    return _routed(params, "galore", matrices, scale_by_adam_raw_eps(), hp)


# FRUGAL's defaults (density 0.25, update_gap 200, reset, signSGD residual at lr scale 1, lr 1e-3). The
# default projection is SVD (FRUGAL's GaLore-style mode); see CoordinateProjector for "blocks".
@register_optimizer(
    "frugal",
    paper=FRUGAL_PAPER,
    summary="AdamW on a density-rho subspace of each matrix, state-free signSGD on the residual",
    defaults={
        "lr": 1e-3,
        "density": 0.25,
        "projection": "svd",
        "update_gap": 200,
        "reset_statistics": True,
        "inactive_update_rule": "sign_sgd",
        "inactive_lr_scale": 1.0,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "exclude": LOW_RANK_EXCLUDE,
    },
)
def frugal(params: Any, **hp: Any) -> ChainOptimizer:
    density, projection = hp.pop("density"), hp.pop("projection")
    if isinstance(density, bool) or not (isinstance(density, int | float) and 0 <= density <= 1):
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if hp["inactive_update_rule"] not in INACTIVE_RULES:
        raise ValueError(f"inactive_update_rule must be one of {INACTIVE_RULES}, got {hp['inactive_update_rule']!r}")
    checks.positive_int("update_gap", hp["update_gap"])
    checks.in_range("inactive_lr_scale", hp["inactive_lr_scale"], 0.0, float("inf"))
    hp["rank"], hp["update_proj_gap"] = float(density), hp.pop("update_gap")
    matrices = chain(decoupled_weight_decay(), project_subspace(projection, scale_by_adam()))
    return _routed(params, "frugal", matrices, scale_by_adam(), hp)


# COSMOS: the COSMOS class defaults (rank 64, gamma 0.2, lr_ratio 0.1, betas (0.9, 0.999), eps 1e-8) with
# the README's lr 2e-3; no weight decay. The AdamW-routed tensors use the given betas (the official
# fallback hard-codes beta1 = 0.9).
@register_optimizer(
    "cosmos",
    paper=COSMOS_PAPER,
    summary="SOAP on a tracked rank-r eigenbasis of the input covariance, Muon on the residual subspace",
    defaults={
        "lr": 2e-3,
        "rank": 64,
        "gamma": 0.2,
        "lr_ratio": 0.1,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "exclude": LOW_RANK_EXCLUDE,
    },
)
def cosmos(params: Any, **hp: Any) -> ChainOptimizer:
    _check_rank(hp["rank"])
    checks.in_range("gamma", hp["gamma"], 0.0, float("inf"))
    if not (isinstance(hp["lr_ratio"], int | float) and hp["lr_ratio"] > 0):
        raise ValueError(f"lr_ratio must be a positive number, got {hp['lr_ratio']!r}")
    matrices = chain(decoupled_weight_decay(), scale_by_cosmos())
    return _routed(params, "cosmos", matrices, scale_by_adam(), hp)


# GradNormLoRP: GaLore's pretraining settings on V (README: lr 0.01, scale 0.25, rank 128, T 250) and
# Adam with the same betas/eps on the gains g. The official code also weight-normalizes (unprojected) the
# tensors outside the attn/mlp groups; here they get plain AdamW by the same declared routing as GaLore.
# The parameter keeps W itself (no copy of V: see ScaleByWeightNormProjection).
@register_optimizer(
    "gradnorm-lorp",
    paper=GRADNORM_LORP_PAPER,
    summary="Weight-normalized W = g*V/|V|_row; GaLore-projected Adam on V, Adam on g; no copy of V kept",
    defaults={**GALORE_DEFAULTS, "update_proj_gap": 250},
)
def gradnorm_lorp(params: Any, **hp: Any) -> ChainOptimizer:
    _check_projected(hp)
    matrices = chain(ScaleByWeightNormProjection(_galore_chain("svd"), scale_by_adam_raw_eps()))
    return _routed(params, "gradnorm-lorp", matrices, scale_by_adam_raw_eps(), hp)
