"""N:M sparse training: SR-STE and Progressive Gradient Flow (MDGF / SDGF), for any model's ``nn.Linear`` layers.

Sources. SR-STE: Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch".
PGF: Bambhaniya et al., "Progressive Gradient Flow for Robust N:M Sparsity Training in Transformers", read in its
official code (``abhibambhaniya/progressive_gradient_flow_nm_sparsity``, ``timm/sparse_pruning/sparse_functions.py``).

Every variant is one autograd function with two knobs per step: the forward weight is ``W ⊙ (m + (1-m)·α)`` and the
backward gradient is ``g + λ(1-m)⊙W`` where ``g = dL/dW_eff`` and ``m`` is the N:M magnitude mask recomputed from
the dense ``W`` at every forward (groups of M consecutive inputs). The methods only choose (N:M, α, λ) per step:

* ``ste``:    α = 0, λ = 0 (plain straight-through, the official ``StepDecay``);
* ``sr-ste``: α = 0, λ = 2e-4 (sparse-refined STE);
* ``mdgf``:   α_t = max(0, 1 - c·t) (``linear``) or exp(-c·t) (``exp``), c = 2e-4 per step (official default),
  t counted from the end of the dense phase; hard mask (STE) in the last ``fine_tune_steps``;
* ``sdgf``:   hard masks whose pattern tightens over equal time frames between the dense and fine-tune phases,
  ``sparsify`` = (M-1):M, M/2:M, M/4:M, ... (official code), ``fine`` = (N·2^k):(M·2^k), ..., (2N):(2M)
  (geometric, same density, coarser groups); the target N:M from the fine-tune phase on.

Decision (the spec's pitfall): the official backward returns ``g`` unscaled for pruned weights, so the decay acts on
the pruned weights' *contribution* and the gradient they receive is the straight-through one. That is the default
(``pruned_grad="straight"``); ``pruned_grad="scaled"`` is the chain-rule alternative (pruned gradients × α).

The training loop sets the global step with :func:`set_step`, or passes :class:`NMStepper` to the runner as its
scheduler (the layers never count forwards themselves, so a closure evaluated twice or an extra evaluation forward
cannot skew the schedule). :func:`finalize` swaps the layers back to plain ``nn.Linear`` with the hard target mask.
Only ``nn.Linear`` layers are converted (the official code also has a Conv2d variant, not ported here).

Entry points: ``sparsify_linears(model, NMSchedule(...))`` -> names; ``NMStepper(model).step()`` or
``set_step(model, t)``; ``finalize(model)`` -> masks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.compress.masks import apply_mask
from trainlab.compress.prune import nm_mask

METHODS = ("ste", "sr-ste", "mdgf", "sdgf")
DECAYS = ("linear", "exp")
STRUCTURES = ("sparsify", "fine")
PRUNED_GRADS = ("straight", "scaled")


@dataclass(frozen=True)
class Phase:
    """What one step does: the N:M pattern, the forward share α of pruned weights, the SR-STE λ."""

    n: int
    m: int
    alpha: float
    lam: float


@dataclass(frozen=True)
class NMSchedule:
    """Per-step N:M pattern, decay α and SR-STE λ of one sparse-training method (defaults: official code)."""

    n: int = 2
    m: int = 4
    method: str = "sr-ste"
    total_steps: int | None = None  # needed by sdgf and by a fine-tune phase
    dense_steps: int = 0
    fine_tune_steps: int = 0
    decay: str = "exp"
    decay_coef: float = 2e-4
    srste_lambda: float = 2e-4
    structure: str = "sparsify"
    pruned_grad: str = "straight"

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("method", self.method, METHODS),
            ("decay", self.decay, DECAYS),
            ("structure", self.structure, STRUCTURES),
            ("pruned_grad", self.pruned_grad, PRUNED_GRADS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ValueError(f"n and m need integers 0 < n < m (N:M sparsity), got n={self.n!r}, m={self.m!r}")
        for name in ("dense_steps", "fine_tune_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        for name in ("decay_coef", "srste_lambda"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        needs_total = self.method == "sdgf" or self.fine_tune_steps > 0
        if needs_total and (self.total_steps is None or self.total_steps <= self.dense_steps + self.fine_tune_steps):
            raise ValueError(
                f"total_steps must exceed dense_steps + fine_tune_steps ({self.dense_steps} + "
                f"{self.fine_tune_steps}) for method {self.method!r} with a fine-tune phase, got {self.total_steps!r}"
            )
        if self.method == "sdgf" and self.fine_tune_steps == 0:
            raise ValueError("fine_tune_steps must be > 0 for sdgf: the target N:M is trained in the fine-tune phase")

    def patterns(self) -> list[tuple[int, int]]:
        """Every N:M this schedule uses, the target last (sdgf: the intermediate frames before it)."""
        if self.method != "sdgf":
            return [(self.n, self.m)]
        if self.structure == "sparsify":  # official: (M-1):M, then M/2^i:M while still denser than the target
            frames = [self.m - 1] + [self.m >> i for i in range(1, self.m.bit_length())]
            return [(k, self.m) for k in frames if k > self.n] + [(self.n, self.m)]
        halvings = max(1, math.ceil(math.log2(self.m / self.n)))
        return [(self.n << k, self.m << k) for k in range(halvings, 0, -1)] + [(self.n, self.m)]

    def alpha(self, step: int) -> float:
        """MDGF's decay value α_t, t = steps since the dense phase ended (official LinearDecay/ExponentialDecay)."""
        t = step - self.dense_steps
        if self.decay == "linear":
            return max(0.0, 1.0 - self.decay_coef * t)
        return math.exp(-self.decay_coef * t)

    def at(self, step: int) -> Phase | None:
        """The phase of global ``step`` (0-based), or None in the dense phase."""
        if step < self.dense_steps:
            return None
        fine_tune = self.fine_tune_steps > 0 and step >= self.total_steps - self.fine_tune_steps
        if self.method == "sr-ste":
            return Phase(self.n, self.m, 0.0, self.srste_lambda)
        if self.method == "ste" or fine_tune:
            return Phase(self.n, self.m, 0.0, 0.0)
        if self.method == "mdgf":
            return Phase(self.n, self.m, self.alpha(step), 0.0)
        frames = self.patterns()[:-1] or self.patterns()  # 1:2 has no intermediate pattern
        span = self.total_steps - self.fine_tune_steps - self.dense_steps
        n, m = frames[min(len(frames) - 1, (step - self.dense_steps) * len(frames) // span)]
        return Phase(n, m, 0.0, 0.0)


class _NMWeight(torch.autograd.Function):
    """forward W ⊙ (m + (1-m)α); backward g (× α on pruned if scaled) + λ(1-m)⊙W."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, n: int, m: int, alpha: float, lam: float, scaled: bool) -> torch.Tensor:
        keep = nm_mask(weight, n, m).to(weight.dtype)
        ctx.save_for_backward(weight, keep)
        ctx.alpha, ctx.lam, ctx.scaled = alpha, lam, scaled
        return weight * (keep + (1.0 - keep) * alpha)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, keep = ctx.saved_tensors
        if ctx.scaled:
            grad = grad * (keep + (1.0 - keep) * ctx.alpha)
        if ctx.lam:
            grad = grad + ctx.lam * (1.0 - keep) * weight
        return grad, None, None, None, None, None


class NMSparseLinear(nn.Linear):
    """``nn.Linear`` whose forward weight follows an :class:`NMSchedule`; the dense weight is what trains."""

    def __init__(self, in_features: int, out_features: int, schedule: NMSchedule, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        for n, m in schedule.patterns():
            if in_features % m:
                raise ValueError(f"N:M pattern {n}:{m} needs in_features ({in_features}) divisible by M={m}")
        self.schedule = schedule
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # persistent: resumes mid-schedule

    @classmethod
    def from_linear(cls, linear: nn.Linear, schedule: NMSchedule) -> NMSparseLinear:
        """Wrap ``linear`` sharing its Parameters, so an optimizer built earlier keeps training them."""
        layer = cls(linear.in_features, linear.out_features, schedule, bias=linear.bias is not None)
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer.to(linear.weight.device)

    def sparse_weight(self) -> torch.Tensor:
        phase = self.schedule.at(int(self.step))
        if phase is None:
            return self.weight
        scaled = self.schedule.pruned_grad == "scaled"
        return _NMWeight.apply(self.weight, phase.n, phase.m, phase.alpha, phase.lam, scaled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sparse_weight(), self.bias)

    def extra_repr(self) -> str:
        s = self.schedule
        return f"{super().extra_repr()}, {s.method} {s.n}:{s.m}"


def sparsify_linears(
    model: nn.Module, schedule: NMSchedule, include: str | None = None, exclude_head: bool = True
) -> list[str]:
    """Replace ``model``'s ``nn.Linear`` layers by :class:`NMSparseLinear` in place; returns their names.

    ``include`` is a regex matched (``re.fullmatch``) against module names, all layers when None. The output head
    (the last ``nn.Linear`` in module order) stays dense unless ``exclude_head=False``: it holds the class scores,
    and N:M recipes (SR-STE, PGF) leave the classifier dense.
    """
    linears = [name for name, mod in model.named_modules() if type(mod) is nn.Linear]
    if exclude_head and linears:
        linears = linears[:-1]
    chosen = [name for name in linears if include is None or re.fullmatch(include, name)]
    if not chosen:
        raise ValueError(f"include={include!r} matches no nn.Linear layer (candidates: {linears})")
    for name in chosen:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, NMSparseLinear.from_linear(getattr(owner, child), schedule))
    return chosen


def set_step(model: nn.Module, step: int) -> None:
    """Tell every N:M layer of ``model`` the global training step (0-based) its next forward belongs to."""
    for mod in model.modules():
        if isinstance(mod, NMSparseLinear):
            mod.step.fill_(step)


class NMStepper:
    """Scheduler-shaped step counter: :meth:`step` after every optimizer step advances each N:M layer's global step.

    Pass it to the runner as ``make_scheduler=lambda opt: NMStepper(model)``. The count lives in the layers' ``step``
    buffers (saved with the model), so its own state is empty and a resumed run continues mid-schedule.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [mod for mod in model.modules() if isinstance(mod, NMSparseLinear)]
        if not self.layers:
            raise ValueError("model has no NMSparseLinear layer to step (call sparsify_linears first)")

    def step(self) -> None:
        for layer in self.layers:
            layer.step.add_(1)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"NMStepper has no state (the step is in the model's buffers), got keys {list(state)}")


def finalize(model: nn.Module, keep_masks: bool = True) -> dict[str, torch.Tensor]:
    """Swap every N:M layer back to ``nn.Linear`` holding the hard-masked (target N:M) weight; returns the masks.

    Masks map module name -> bool (True = kept) with the target pattern. With ``keep_masks`` the layers also carry
    the ``trainlab.compress.masks`` mechanism tagged ``"N:M"``, so further training keeps the zeros and the sparse
    exporter stores them compactly.
    """
    masks: dict[str, torch.Tensor] = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, NMSparseLinear):
            continue
        n, m = mod.schedule.n, mod.schedule.m
        mask = nm_mask(mod.weight, n, m)
        linear = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None).to(mod.weight)
        with torch.no_grad():
            linear.weight.copy_(mod.weight * mask)
            if mod.bias is not None:
                linear.bias.copy_(mod.bias)
        if keep_masks:
            apply_mask(linear, mask, pattern=f"{n}:{m}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
        masks[name] = mask
    if not masks:
        raise ValueError("model has no NMSparseLinear layer to finalize (call sparsify_linears first)")
    return masks
