"""GBNN (Emami & Martínez-Muñoz): a one-hidden-layer network trained as a gradient-boosted sum of small stages.

``F_0 = 0`` (multiclass). Stage ``t`` fits a network of ``J`` logistic units (``x → σ(x W_tᵀ + b_t) → C``) by
L-BFGS to the pseudo-residuals ``r = Y − softmax(F)`` on a random half of the rows (squared error with L2
``alpha``, as scikit-learn's MLPRegressor that the official code calls), predicts ``f_t`` on all rows, and
adds ``ρ_t f_t`` with the Newton step ``ρ_t = η·Σ f r / Σ f² P(1 − P)``. The stages are one network: hidden
units are the stages' units in order, output weights ``ρ_t × (stage output weights)``, output bias
``Σ_t ρ_t × (stage output bias)``. Units trained last contribute least, so they can be switched off at test
time (``truncated``). Defaults: the official code's (200 units, one per stage, η = 1, subsample 0.5, L-BFGS
with at most 200 iterations, logistic units; alpha 1e-4 is MLPRegressor's default).

The model's leading parameter-free layers (``nn.Flatten``) are kept as the input transform; its layers with
parameters are replaced by the boosted network (a warning says so).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.localtrain.core import LocalTrainer
from trainlab.localtrain.registry import register_method
from trainlab.ranges import Between

PAPER = "Sequential Training of Neural Networks with Gradient Boosting (Emami & Martínez-Muñoz, 2023)"


def newton_step(f: torch.Tensor, residual: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``ρ = Σ f r / Σ f² P(1 − P)``: one Newton step of the multiclass log-loss along ``f``."""
    return (f * residual).sum() / (f.pow(2) * probs * (1 - probs)).sum().clamp_min(1e-12)


class BoostedNetwork(nn.Module):
    """``prefix → Linear(d, units) → Sigmoid → Linear(units, C)``; ``active`` units are used, the rest off."""

    def __init__(self, prefix: nn.Module, in_features: int, units: int, classes: int, like: torch.Tensor) -> None:
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.prefix = prefix
        self.hidden = nn.Linear(in_features, units, **kw)
        self.output = nn.Linear(units, classes, **kw)
        for p in self.parameters():
            nn.init.zeros_(p)
        self.register_buffer("active", torch.zeros((), dtype=torch.long, device=like.device))
        # Each unit's share of the output bias (its stage's ρ_t × intercept_t, on the stage's first unit), so a
        # truncated network drops the bias of the stages it drops.
        self.register_buffer("unit_bias", torch.zeros(units, classes, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(self.active)
        h = torch.sigmoid(F.linear(self.prefix(x).flatten(1), self.hidden.weight[:k], self.hidden.bias[:k]))
        return F.linear(h, self.output.weight[:, :k], self.output.bias)

    def truncated(self, units: int) -> BoostedNetwork:
        """A copy that uses only the first ``units`` hidden units (the stages trained first) and their biases."""
        if not 0 <= units <= int(self.active):
            raise ValueError(f"units must be in [0, {int(self.active)}], got {units}")
        copy = BoostedNetwork(
            self.prefix, self.hidden.in_features, self.hidden.out_features, self.output.out_features, self.hidden.weight
        )
        copy.load_state_dict(self.state_dict())
        copy.active.fill_(units)
        copy.output.bias.copy_(self.unit_bias[:units].sum(0))
        return copy


class GBNN(LocalTrainer):
    """Each ``step(inputs, labels)`` (the whole training set) fits one boosting stage of ``units_per_stage`` units."""

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        total_units: int,
        units_per_stage: int,
        eta: float,
        subsample: float,
        max_iter: int,
        alpha: float,
        seed: int,
    ) -> None:
        super().__init__()
        if total_units % units_per_stage:
            raise ValueError(f"units_per_stage={units_per_stage} must divide total_units={total_units}")
        layers = list(model) if isinstance(model, nn.Sequential) else [model]
        prefix: list[nn.Module] = []
        for layer in layers:
            if any(True for _ in layer.parameters()):
                break
            prefix.append(layer)
        if len(prefix) < len(layers):
            warnings.warn(
                f"gbnn: the model's layers with parameters are replaced by a boosted one-hidden-layer network of "
                f"{total_units} logistic units; only its leading parameter-free layers ({prefix}) are kept",
                stacklevel=4,  # the caller of localtrain.create
            )
        self.prefix = nn.Sequential(*prefix)
        self.num_classes, self.total_units, self.units_per_stage = num_classes, total_units, units_per_stage
        self.eta, self.subsample, self.max_iter, self.alpha = eta, subsample, max_iter, alpha
        self.generator = torch.Generator().manual_seed(seed)
        self.network: BoostedNetwork | None = None
        self.predictor: nn.Module = nn.Identity()

    def _trained(self) -> nn.Module:
        return self.network

    def _prepare(self, inputs: Any) -> list[torch.optim.Optimizer]:
        with torch.no_grad():
            features = self.prefix(inputs).flatten(1)
        self.network = BoostedNetwork(self.prefix, features.shape[1], self.total_units, self.num_classes, features)
        self.predictor = self.network
        return []

    def fit_stage(self, x: torch.Tensor, residual: torch.Tensor) -> nn.Sequential:
        """L-BFGS fit of ``J`` logistic units to ``residual`` (MLPRegressor's loss: ½·MSE + ½·alpha·‖W‖²/n)."""
        j, d = self.units_per_stage, x.shape[1]
        kw = {"dtype": x.dtype, "device": x.device}
        stage = nn.Sequential(nn.Linear(d, j, **kw), nn.Sigmoid(), nn.Linear(j, self.num_classes, **kw))
        with torch.no_grad():  # Glorot-uniform with factor 2 for logistic units, as scikit-learn initializes
            for linear in (stage[0], stage[2]):
                bound = math.sqrt(2.0 / (linear.in_features + linear.out_features))
                for p in linear.parameters():
                    p.copy_((torch.rand(p.shape, generator=self.generator) * 2 - 1).to(**kw) * bound)
        optimizer = torch.optim.LBFGS(stage.parameters(), max_iter=self.max_iter, line_search_fn="strong_wolfe")
        n = x.shape[0]

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            penalty = stage[0].weight.pow(2).sum() + stage[2].weight.pow(2).sum()
            loss = 0.5 * (stage(x) - residual).pow(2).mean() + 0.5 * self.alpha * penalty / n
            loss.backward()
            return loss

        optimizer.step(closure)
        return stage

    def _step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        network = self.network
        done = int(network.active)
        if done >= self.total_units:
            raise RuntimeError(
                f"gbnn: all {self.total_units} units are trained ({done // self.units_per_stage} stages)"
            )
        keep = labels != -100
        x = self.prefix(inputs[keep]).flatten(1).detach()
        labels = labels[keep]
        targets = F.one_hot(labels, self.num_classes).to(x.dtype)
        with torch.no_grad():
            probs = torch.softmax(network(inputs[keep]), dim=1)
        residual = targets - probs
        rows = torch.randperm(x.shape[0], generator=self.generator)[: max(1, round(self.subsample * x.shape[0]))]
        stage = self.fit_stage(x[rows], residual[rows])
        with torch.no_grad():
            f = stage(x)
            rho = self.eta * newton_step(f, residual, probs)
            units = slice(done, done + self.units_per_stage)
            network.hidden.weight[units] = stage[0].weight
            network.hidden.bias[units] = stage[0].bias
            network.output.weight[:, units] = rho * stage[2].weight
            network.unit_bias[done] = rho * stage[2].bias
            network.output.bias += rho * stage[2].bias
            network.active += self.units_per_stage
            return F.cross_entropy(network(inputs[keep]), labels)


@register_method(
    "gbnn",
    paper=PAPER,
    summary="hidden units trained J at a time by gradient boosting on the pseudo-residuals; the last can be dropped",
    supports="sequential (its layers with parameters are replaced by the boosted one-hidden-layer network)",
    defaults={
        "total_units": 200,
        "units_per_stage": 1,
        "eta": 1.0,
        "subsample": 0.5,
        "max_iter": 200,
        "alpha": 1e-4,
        "seed": 0,
    },
    ranges={
        "total_units": Between(1, 1 << 20, integer=True),
        "units_per_stage": Between(1, 1 << 20, integer=True),
        "eta": Between(1e-6, 10.0),
        "subsample": Between(1e-3, 1.0),
        "max_iter": Between(1, 100_000, integer=True),
        "alpha": Between(0.0, 1e3),
        "seed": Between(0, 2**63 - 1, integer=True),
    },
    full_batch=True,
    steps=lambda hp: hp["total_units"] // hp["units_per_stage"],
)
def gbnn(model: nn.Module, *, num_classes: int, **hp: Any) -> GBNN:
    return GBNN(model, num_classes=num_classes, **hp)
