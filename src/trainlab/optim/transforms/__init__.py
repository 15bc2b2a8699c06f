"""Reusable gradient transforms. Each paper's optimizer is a short chain of these."""

from trainlab.optim.transforms.adam import ScaleByAdam, scale_by_adam
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
from trainlab.optim.transforms.weight_decay import (
    AddWeightDecay,
    DecoupledWeightDecay,
    add_weight_decay,
    decoupled_weight_decay,
)

__all__ = [
    "AddWeightDecay",
    "DecoupledWeightDecay",
    "OrthogonalizeGradient",
    "ScaleByAdam",
    "ScaleByAuON",
    "ScaleByMuon",
    "TraceMomentum",
    "add_weight_decay",
    "decoupled_weight_decay",
    "newton_schulz",
    "orthogonalize_gradient",
    "scale_by_adam",
    "scale_by_auon",
    "scale_by_muon",
    "trace_momentum",
]
