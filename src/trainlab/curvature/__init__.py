"""Curvature toolkit: Hessian-vector products, Hutchinson diagonal and trace, top eigenvalues, an
empirical-Fisher window with Woodbury inverse products, and MKOR's rank-1 Kronecker factors.

Shared by the second-order optimizers (AdaHessian, M-FAC, MKOR) and Hessian-aware compression. Every
function takes ``loss_fn``, a zero-argument callable returning a scalar loss, and builds the
double-backward graph itself.
"""

from trainlab.curvature.eigen import top_eigenvalues
from trainlab.curvature.fisher import FisherWindow, woodbury_coefficients
from trainlab.curvature.hutchinson import hutchinson_diagonal, hutchinson_trace
from trainlab.curvature.hvp import (
    gradients_with_graph,
    hvp,
    hvp_from_gradients,
    rademacher_like,
    twice_differentiable,
)
from trainlab.curvature.kronecker import LayerObserver, LayerStatistics, sherman_morrison

__all__ = [
    "FisherWindow",
    "LayerObserver",
    "LayerStatistics",
    "gradients_with_graph",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hvp",
    "hvp_from_gradients",
    "rademacher_like",
    "sherman_morrison",
    "top_eigenvalues",
    "twice_differentiable",
    "woodbury_coefficients",
]
