"""Memory-efficient optimizers for matrices: GaLore, FRUGAL, COSMOS and GradNormLoRP.

Routing is declared, as for Muon: ``matrices_to(<method>, "adamw", exclude=...)`` sends every parameter
with 2+ dimensions to the method unless its name matches ``exclude`` (embeddings, output heads and
norms by default); everything else, and every 1-D parameter, gets AdamW with the *same* lr, betas, eps
and weight decay, as in each official optimizer (one optimizer, a group without ``rank``). ``rank`` is an
int (capped at min(m, n)) or a float in (0, 1], the fraction of min(m, n) of each matrix. Groups added
later with ``add_param_group`` are routed by the same rule.
"""

from collections.abc import Mapping
from typing import Annotated, Any

from trainlab.optim.checks import BETAS, FLAG, LR, NON_NEGATIVE, POSITIVE, REGEX_OR_NONE, Check, Interval, OneOf
from trainlab.optim.checks import integer_at_least as at_least_int
from trainlab.optim.optimizer import ChainOptimizer, Rename
from trainlab.optim.recipes.orthogonal import EMBEDDINGS_AND_HEADS, MATRIX_METHODS_ARE_REAL
from trainlab.optim.registry import checked, ranges_of, register_optimizer
from trainlab.optim.routing import matrices_to
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


class Rank(Check):
    """An int >= 1 (capped at min(m, n)) or a float in (0, 1], the fraction of min(m, n)."""

    allowed = "an int >= 1 or a float in (0, 1] (fraction of min(m, n))"

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        return (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value <= 1)

    def __repr__(self) -> str:
        return "int >= 1 or fraction in (0, 1]"


RANK = Rank()


def _routed(
    params: Any,
    method: str,
    matrices: GradientTransform,
    others: GradientTransform,
    hp: dict[str, Any],
    ranges: Mapping[str, Check],
    renames: Mapping[str, Rename] | None = None,
) -> ChainOptimizer:
    """``matrices`` on the routed matrices, decoupled-decay ``others`` (Adam) on the rest; shared hp.

    Integer state (coordinate indices, seeds) survives `load_state_dict`: `ChainOptimizer` restores
    non-floating state in its own dtype."""
    return ChainOptimizer(
        params,
        {method: matrices, "adamw": chain(decoupled_weight_decay(), others)},
        rule=matrices_to(method, "adamw", exclude=hp.pop("exclude")),
        renames={method: renames} if renames else None,
        ranges=ranges,
        refuse_complex=MATRIX_METHODS_ARE_REAL,
        **hp,
    )


def _galore_chain(projection: str) -> GradientTransform:
    return project_subspace(projection, scale_by_adam_raw_eps())


# GaLore's pretraining defaults (60M: rank 128), eps 1e-6 and galore_torch.AdamW's transformers-style
# eps placement (on the uncorrected sqrt(v)), also used for the AdamW-routed tensors. Moments are kept
# when the projector is refreshed (reset_statistics=False), as in the official code.
@register_optimizer(
    "galore",
    paper=GALORE_PAPER,
    summary="Adam moments in a rank-r SVD subspace of each matrix's gradient, refreshed every T steps",
)
def galore(
    params: Any,
    *,
    lr: Annotated[float, LR] = 0.01,
    rank: Annotated[int | float, RANK] = 128,
    scale: Annotated[float, NON_NEGATIVE] = 0.25,
    update_proj_gap: Annotated[int, at_least_int(1)] = 200,
    betas: Annotated[tuple[float, float], BETAS] = (0.9, 0.999),
    eps: Annotated[float, NON_NEGATIVE] = 1e-6,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
    reset_statistics: Annotated[bool, FLAG] = False,
    exclude: Annotated[str | None, REGEX_OR_NONE] = LOW_RANK_EXCLUDE,
) -> ChainOptimizer:
    """GaLore: Adam on ``R = Pᵀ G`` (P: top-``rank`` singular vectors of G, refreshed every
    ``update_proj_gap`` steps), stepped as ``scale · P·update``; AdamW on the other parameters.

    Args:
        params: parameters, ``(name, parameter)`` pairs (for ``exclude``) or param groups (any key below
            but ``exclude`` per group; each group is routed by the same rule).
        lr: learning rate (all parameters).
        rank: subspace rank: an int, or a float fraction of min(m, n).
        scale: multiplies the projected update (GaLore's α).
        update_proj_gap: steps between projector refreshes (T).
        betas: Adam's moment decay rates.
        eps: added to the uncorrected √v (galore_torch's placement).
        weight_decay: decoupled weight decay.
        reset_statistics: zero the moments at each refresh (the official code keeps them).
        exclude: regular expression of 2-D parameter names left to AdamW (embeddings, heads, norms).
    """
    hp = checked(galore, locals())
    matrices = chain(decoupled_weight_decay(), _galore_chain("svd"))
    return _routed(params, "galore", matrices, scale_by_adam_raw_eps(), hp, ranges_of(galore))


# FRUGAL's defaults (density 0.25, update_gap 200, reset, signSGD residual at lr scale 1, lr 1e-3). The
# default projection is SVD (FRUGAL's GaLore-style mode); see CoordinateProjector for "blocks".
@register_optimizer(
    "frugal",
    paper=FRUGAL_PAPER,
    summary="AdamW on a density-rho subspace of each matrix, state-free signSGD on the residual",
)
def frugal(
    params: Any,
    *,
    lr: Annotated[float, LR] = 1e-3,
    density: Annotated[float, Interval(0.0, 1.0)] = 0.25,
    projection: Annotated[str, OneOf(PROJECTIONS)] = "svd",
    update_gap: Annotated[int, at_least_int(1)] = 200,
    reset_statistics: Annotated[bool, FLAG] = True,
    inactive_update_rule: Annotated[str, OneOf(INACTIVE_RULES)] = "sign_sgd",
    inactive_lr_scale: Annotated[float, NON_NEGATIVE] = 1.0,
    betas: Annotated[tuple[float, float], BETAS] = (0.9, 0.999),
    eps: Annotated[float, NON_NEGATIVE] = 1e-8,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
    exclude: Annotated[str | None, REGEX_OR_NONE] = LOW_RANK_EXCLUDE,
) -> ChainOptimizer:
    """FRUGAL: AdamW on a ``density`` share of each matrix (an SVD, random or coordinate-block subspace,
    refreshed every ``update_gap`` steps) and a state-free rule on the residual; AdamW elsewhere.

    Args:
        params: parameters, ``(name, parameter)`` pairs (for ``exclude``) or param groups (any key below
            but ``projection`` and ``exclude`` per group; each group is routed by the same rule).
        lr: learning rate.
        density: share of each matrix in the stateful subspace (0: all signSGD, 1: all AdamW).
        projection: ``"svd"``, ``"random"`` or ``"blocks"`` (fixed at construction).
        update_gap: steps between subspace refreshes.
        reset_statistics: zero the moments at each refresh.
        inactive_update_rule: the residual's rule (``"sign_sgd"``, ``"sgd"`` or ``"no"``).
        inactive_lr_scale: multiplies lr on the residual.
        betas, eps: Adam's.
        weight_decay: decoupled weight decay.
        exclude: regular expression of 2-D parameter names left to AdamW (embeddings, heads, norms).
    """
    hp = checked(frugal, locals())
    matrices = chain(decoupled_weight_decay(), project_subspace(hp.pop("projection"), scale_by_adam()))
    renames: dict[str, Rename] = {"density": ("rank", float), "update_gap": "update_proj_gap"}
    return _routed(params, "frugal", matrices, scale_by_adam(), hp, ranges_of(frugal), renames)


# COSMOS: the COSMOS class defaults (rank 64, gamma 0.2, lr_ratio 0.1, betas (0.9, 0.999), eps 1e-8) with
# the README's lr 2e-3; no weight decay. The AdamW-routed tensors use the given betas (the official
# fallback hard-codes beta1 = 0.9).
@register_optimizer(
    "cosmos",
    paper=COSMOS_PAPER,
    summary="SOAP on a tracked rank-r eigenbasis of the input covariance, Muon on the residual subspace",
)
def cosmos(
    params: Any,
    *,
    lr: Annotated[float, LR] = 2e-3,
    rank: Annotated[int | float, RANK] = 64,
    gamma: Annotated[float, NON_NEGATIVE] = 0.2,
    lr_ratio: Annotated[float, POSITIVE] = 0.1,
    betas: Annotated[tuple[float, float], BETAS] = (0.9, 0.999),
    eps: Annotated[float, NON_NEGATIVE] = 1e-8,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
    exclude: Annotated[str | None, REGEX_OR_NONE] = LOW_RANK_EXCLUDE,
) -> ChainOptimizer:
    """COSMOS: SOAP-style Adam in a tracked rank-``rank`` eigenbasis of each matrix's input covariance,
    Muon (Newton-Schulz) on the residual, scaled by ``gamma``; AdamW elsewhere.

    Args:
        params: parameters, ``(name, parameter)`` pairs (for ``exclude``) or param groups (any key below
            but ``exclude`` per group; each group is routed by the same rule).
        lr: learning rate.
        rank: rank of the tracked basis: an int, or a float fraction of min(m, n).
        gamma: scale of the residual (Muon) part.
        lr_ratio: the official code's ratio of the residual's step normalization.
        betas, eps: Adam's.
        weight_decay: decoupled weight decay.
        exclude: regular expression of 2-D parameter names left to AdamW (embeddings, heads, norms).
    """
    hp = checked(cosmos, locals())
    matrices = chain(decoupled_weight_decay(), scale_by_cosmos())
    return _routed(params, "cosmos", matrices, scale_by_adam(), hp, ranges_of(cosmos))


# GradNormLoRP: GaLore's pretraining settings on V (README: lr 0.01, scale 0.25, rank 128, T 250) and
# Adam with the same betas/eps on the gains g. The official code also weight-normalizes (unprojected) the
# tensors outside the attn/mlp groups; here they get plain AdamW by the same declared routing as GaLore.
# The parameter keeps W itself (no copy of V: see ScaleByWeightNormProjection).
@register_optimizer(
    "gradnorm-lorp",
    paper=GRADNORM_LORP_PAPER,
    summary="Weight-normalized W = g*V/|V|_row; GaLore-projected Adam on V, Adam on g; no copy of V kept",
)
def gradnorm_lorp(
    params: Any,
    *,
    lr: Annotated[float, LR] = 0.01,
    rank: Annotated[int | float, RANK] = 128,
    scale: Annotated[float, NON_NEGATIVE] = 0.25,
    update_proj_gap: Annotated[int, at_least_int(1)] = 250,
    betas: Annotated[tuple[float, float], BETAS] = (0.9, 0.999),
    eps: Annotated[float, NON_NEGATIVE] = 1e-6,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
    reset_statistics: Annotated[bool, FLAG] = False,
    exclude: Annotated[str | None, REGEX_OR_NONE] = LOW_RANK_EXCLUDE,
) -> ChainOptimizer:
    """GradNormLoRP: each routed matrix as ``W = g·V/‖V‖_row``; GaLore-projected Adam on V, Adam on the
    gains g, without keeping a copy of V; AdamW elsewhere.

    Args: as `galore` (the same keys, ``update_proj_gap`` 250 by default).
    """
    hp = checked(gradnorm_lorp, locals())
    matrices = chain(ScaleByWeightNormProjection(_galore_chain("svd"), scale_by_adam_raw_eps()))
    return _routed(params, "gradnorm-lorp", matrices, scale_by_adam_raw_eps(), hp, ranges_of(gradnorm_lorp))
