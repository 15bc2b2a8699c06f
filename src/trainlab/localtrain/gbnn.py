"""GBNN (Emami & Martínez-Muñoz): a one-hidden-layer network trained as a gradient-boosted sum of small stages.

The paper (and its official code: a classifier and a regressor) covers three tasks, ``task=``:

- ``"multiclass"``: ``F_0 = 0``, pseudo-residuals ``r = Y − softmax(F)``, Newton step
  ``ρ = Σ f r / Σ f² P(1 − P)``; the network outputs the C logits.
- ``"binary"`` (labels 0/1, taken as ``y = ±1``; the loss is ``log(1 + exp(−2yF))``): ``F_0 = ½ log((1 + ȳ)/(1 − ȳ))``,
  ``r = 2y/(1 + exp(2yF))``, ``ρ = Σ r f / Σ f² r(2y − r)``; the network's logit is ``2F`` (``×2`` on its
  output layer, as the official ``to_NN``), returned as the two class scores ``[0, 2F]``.
- ``"regression"`` (float targets of shape ``(n,)``): ``F_0 = mean(y)``, ``r = y − F``, ``ρ = 1``; the network
  returns ``F``, shape ``(n,)``. ``num_classes`` is not used.

``"auto"`` (the default) is binary for two classes and multiclass otherwise, as the official classifier.
Stage ``t`` fits a network of ``J`` logistic units (``x → σ(x W_tᵀ + b_t) → K``) by L-BFGS to the
pseudo-residuals on a random half of the rows (squared error with L2 ``alpha``, as scikit-learn's MLPRegressor
that the official code calls), predicts ``f_t`` on all rows, and adds ``η ρ_t f_t``. The stages are one
network: hidden units are the stages' units in order, output weights ``η ρ_t × (stage output weights)``, output
bias ``F_0 + Σ_t η ρ_t × (stage output bias)``. Units trained last contribute least, so they can be switched off at
test time (``truncated``). Defaults: the official code's (200 units, one per stage, η = 1, subsample 0.5, L-BFGS
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


def binary_residual(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``r = 2y/(1 + exp(2yF))``, the negative gradient of ``log(1 + exp(−2yF))`` (``y = ±1``)."""
    return 2 * y * torch.sigmoid(-2 * y * f)


def binary_newton_step(f: torch.Tensor, residual: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``ρ = Σ r f / Σ f² r(2y − r)``: one Newton step of the binomial deviance along ``f``."""
    return (f * residual).sum() / (f.pow(2) * residual * (2 * y - residual)).sum().clamp_min(1e-12)


TASKS = ("auto", "multiclass", "binary", "regression")


class BoostedNetwork(nn.Module):
    """``prefix → Linear(d, units) → Sigmoid → Linear(units, K)``; ``active`` units are used, the rest off.

    ``task`` shapes the output: multiclass the K = C logits, binary ``[0, z]`` from its one logit ``z``,
    regression the one output as a vector.
    """

    def __init__(
        self,
        prefix: nn.Module,
        in_features: int,
        units: int,
        classes: int,
        like: torch.Tensor,
        task: str = "multiclass",
    ) -> None:
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.prefix, self.task = prefix, task
        self.hidden = nn.Linear(in_features, units, **kw)
        self.output = nn.Linear(units, classes, **kw)
        for p in self.parameters():
            nn.init.zeros_(p)
        self.register_buffer("active", torch.zeros((), dtype=torch.long, device=like.device))
        # Each unit's share of the output bias (its stage's ρ_t × intercept_t, on the stage's first unit), so a
        # truncated network drops the bias of the stages it drops.
        self.register_buffer("unit_bias", torch.zeros(units, classes, **kw))
        self.register_buffer("base", torch.zeros(classes, **kw))  # F_0 (×2 for binary): kept when truncated

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The output layer's values, ``(n, K)``."""
        k = int(self.active)
        h = torch.sigmoid(F.linear(self.prefix(x).flatten(1), self.hidden.weight[:k], self.hidden.bias[:k]))
        return F.linear(h, self.output.weight[:, :k], self.output.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.raw(x)
        if self.task == "binary":
            return torch.cat([torch.zeros_like(z), z], dim=1)
        return z.squeeze(1) if self.task == "regression" else z

    def truncated(self, units: int) -> BoostedNetwork:
        """A copy that uses only the first ``units`` hidden units (the stages trained first) and their biases."""
        if not 0 <= units <= int(self.active):
            raise ValueError(f"units must be in [0, {int(self.active)}], got {units}")
        copy = BoostedNetwork(
            self.prefix,
            self.hidden.in_features,
            self.hidden.out_features,
            self.output.out_features,
            self.hidden.weight,
            self.task,
        )
        copy.load_state_dict(self.state_dict())
        copy.active.fill_(units)
        with torch.no_grad():
            copy.output.bias.copy_(self.base + self.unit_bias[:units].sum(0))
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
        task: str = "auto",
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
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
        self.task = task if task != "auto" else ("binary" if num_classes == 2 else "multiclass")
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
        outputs = self.num_classes if self.task == "multiclass" else 1
        self.network = BoostedNetwork(self.prefix, features.shape[1], self.total_units, outputs, features, self.task)
        self.predictor = self.network
        return []

    def fit_stage(self, x: torch.Tensor, residual: torch.Tensor) -> nn.Sequential:
        """L-BFGS fit of ``J`` logistic units to ``residual`` (MLPRegressor's loss: ½·MSE + ½·alpha·‖W‖²/n)."""
        j, d = self.units_per_stage, x.shape[1]
        kw = {"dtype": x.dtype, "device": x.device}
        stage = nn.Sequential(nn.Linear(d, j, **kw), nn.Sigmoid(), nn.Linear(j, residual.shape[1], **kw))
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
        if self.task == "regression":
            if labels.dtype == torch.long or labels.dim() != 1:
                raise ValueError(f"regression targets must be a float vector (n,), got {labels.dtype} {labels.shape}")
            keep = torch.ones_like(labels, dtype=torch.bool)
        else:
            keep = labels != -100
        x = self.prefix(inputs[keep]).flatten(1).detach()
        labels = labels[keep]
        mult = 2.0 if self.task == "binary" else 1.0  # the network's output is 2F for binary (the logit)
        with torch.no_grad():
            if done == 0:
                network.base.copy_(mult * self._initial(labels.to(x.dtype)))
                network.output.bias.copy_(network.base)
            boosted = network.raw(inputs[keep]) / mult  # F
            residual, y = self._residual(labels, boosted)
        rows = torch.randperm(x.shape[0], generator=self.generator)[: max(1, round(self.subsample * x.shape[0]))]
        stage = self.fit_stage(x[rows], residual[rows])
        with torch.no_grad():
            f = stage(x)
            if self.task == "multiclass":
                rho = newton_step(f, residual, torch.softmax(boosted, dim=1))
            elif self.task == "binary":
                rho = binary_newton_step(f, residual, y)
            else:
                rho = torch.ones((), dtype=x.dtype, device=x.device)
            scale = mult * self.eta * rho
            units = slice(done, done + self.units_per_stage)
            network.hidden.weight[units] = stage[0].weight
            network.hidden.bias[units] = stage[0].bias
            network.output.weight[:, units] = scale * stage[2].weight
            network.unit_bias[done] = scale * stage[2].bias
            network.output.bias += scale * stage[2].bias
            network.active += self.units_per_stage
            out = network(inputs[keep])
            if self.task == "multiclass":
                return F.cross_entropy(out, labels)
            if self.task == "binary":
                return F.binary_cross_entropy_with_logits(out[:, 1], labels.to(out.dtype))
            return F.mse_loss(out, labels.to(out.dtype))

    def _initial(self, labels: torch.Tensor) -> torch.Tensor:
        """``F_0``: 0 (multiclass), ``½ log((1 + ȳ)/(1 − ȳ))`` with ``y = ±1`` (binary), ``mean(y)`` (regression)."""
        if self.task == "multiclass":
            return torch.zeros(self.num_classes, dtype=labels.dtype, device=labels.device)
        if self.task == "binary":
            mean = (2 * labels - 1).mean().clamp(-1 + 1e-6, 1 - 1e-6)
            return (0.5 * torch.log((1 + mean) / (1 - mean))).reshape(1)
        return labels.mean().reshape(1)

    def _residual(self, labels: torch.Tensor, boosted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pseudo-residuals at ``F = boosted`` (and the ±1 labels for binary)."""
        if self.task == "multiclass":
            return F.one_hot(labels, self.num_classes).to(boosted.dtype) - torch.softmax(boosted, dim=1), None
        if self.task == "binary":
            if labels.min() < 0 or labels.max() > 1:
                raise ValueError("binary labels must be 0 or 1 (or -100 for unlabelled rows)")
            y = (2 * labels - 1).to(boosted.dtype)[:, None]
            return binary_residual(y, boosted), y
        return labels.to(boosted.dtype)[:, None] - boosted, None


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
        "task": "auto",
    },
    ranges={
        "total_units": Between(1, 1 << 20, integer=True),
        "units_per_stage": Between(1, 1 << 20, integer=True),
        "eta": Between(1e-6, 10.0),
        "subsample": Between(1e-3, 1.0),
        "max_iter": Between(1, 100_000, integer=True),
        "alpha": Between(0.0, 1e3),
        "seed": Between(0, 2**63 - 1, integer=True),
        "task": TASKS,
    },
    full_batch=True,
    steps=lambda hp: hp["total_units"] // hp["units_per_stage"],
)
def gbnn(model: nn.Module, *, num_classes: int, **hp: Any) -> GBNN:
    return GBNN(model, num_classes=num_classes, **hp)
