"""Reusable gradient transforms. Each paper's optimizer is a short chain of these."""

from trainlab.optim.transforms.adam import ScaleByAdam, adam_ratio, bias_corrections, scale_by_adam, update_moments_
from trainlab.optim.transforms.cosmos import ScaleByCOSMOS, scale_by_cosmos
from trainlab.optim.transforms.curvature import CurvatureFeed, PreconditionMKOR, ScaleByAdaHessian, ScaleByMFAC
from trainlab.optim.transforms.diffgrad import ScaleByDiffGrad, scale_by_diffgrad
from trainlab.optim.transforms.lion import ScaleByLion, scale_by_lion
from trainlab.optim.transforms.momentum import TraceMomentum, trace_momentum
from trainlab.optim.transforms.orthogonal import (
    OrthogonalizeGradient,
    ScaleByAuON,
    ScaleByMuon,
    newton_schulz,
    orthogonalize_gradient,
    scale_by_auon,
    scale_by_muon,
)
from trainlab.optim.transforms.projection import (
    CoordinateProjector,
    Projector,
    ProjectSubspace,
    ScaleByAdamRawEps,
    ScaleByWeightNormProjection,
    SVDProjector,
    project_subspace,
    scale_by_adam_raw_eps,
)
from trainlab.optim.transforms.spam import (
    ClipSpikes,
    ClipSpikesAdaptive,
    NormalizeGradientNorm,
    ScaleByAdamWithResets,
    ScaleBySpamAdam,
    clip_spikes,
    clip_spikes_adaptive,
    normalize_gradient_norm,
    scale_by_adam_with_resets,
    scale_by_spam_adam,
    spam_warmup,
)
from trainlab.optim.transforms.weight_decay import (
    AddWeightDecay,
    DecoupledWeightDecay,
    add_weight_decay,
    decoupled_weight_decay,
)

__all__ = [
    "AddWeightDecay",
    "ClipSpikes",
    "ClipSpikesAdaptive",
    "CoordinateProjector",
    "CurvatureFeed",
    "DecoupledWeightDecay",
    "NormalizeGradientNorm",
    "OrthogonalizeGradient",
    "PreconditionMKOR",
    "ProjectSubspace",
    "Projector",
    "SVDProjector",
    "ScaleByAdaHessian",
    "ScaleByAdam",
    "ScaleByAdamRawEps",
    "ScaleByAdamWithResets",
    "ScaleByAuON",
    "ScaleByCOSMOS",
    "ScaleByDiffGrad",
    "ScaleByLion",
    "ScaleByMFAC",
    "ScaleByMuon",
    "ScaleBySpamAdam",
    "ScaleByWeightNormProjection",
    "TraceMomentum",
    "adam_ratio",
    "add_weight_decay",
    "bias_corrections",
    "clip_spikes",
    "clip_spikes_adaptive",
    "decoupled_weight_decay",
    "newton_schulz",
    "normalize_gradient_norm",
    "orthogonalize_gradient",
    "project_subspace",
    "scale_by_adam",
    "scale_by_adam_raw_eps",
    "scale_by_adam_with_resets",
    "scale_by_auon",
    "scale_by_cosmos",
    "scale_by_diffgrad",
    "scale_by_lion",
    "scale_by_muon",
    "scale_by_spam_adam",
    "spam_warmup",
    "trace_momentum",
    "update_moments_",
]
