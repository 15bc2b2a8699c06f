"""Second-order recipes: AdaHessian, M-FAC and MKOR, on the curvature toolkit.

- ``adahessian`` needs one Hessian-vector product per step, so it must see the loss: call
  ``optimizer.step(closure)`` with the standard closure (zero grads, compute the loss, ``loss.backward()``,
  return it). While the closure runs, `AdaHessian` turns that ``loss.backward()`` into
  ``torch.autograd.grad(loss, params, create_graph=True)`` (through a ``TorchFunctionMode``), fills
  ``.grad`` of its own parameters with the result, and differentiates the graph-carrying gradients once
  more with a Rademacher probe. The user never writes ``create_graph=True``; other tensors the loss
  depends on get no ``.grad`` during that step. The closure runs with PyTorch's math attention kernel,
  since the fused ``scaled_dot_product_attention`` kernels have no double backward.
- ``mfac`` keeps a window of ``ngrads`` gradients: its state is ``ngrads`` times the model (1024× by
  default, the paper's setting), which is why it suits small models or pruning, not LLM training.
- ``mkor`` preconditions nn.Linear and nn.Conv2d layers, which it finds through a global forward hook
  (an optimizer is given parameters, not modules); everything else (embeddings, norm gains, grouped
  convolutions) gets the declared first-order fallback, the SGD-momentum chain that follows the
  preconditioner. Factors are kept in the parameter's dtype (mkor.py defaults to float16 factors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from trainlab.curvature import LayerObserver, hvp_from_gradients, rademacher_like, twice_differentiable
from trainlab.optim.optimizer import ChainOptimizer
from trainlab.optim.registry import register_optimizer
from trainlab.optim.transform import chain
from trainlab.optim.transforms import add_weight_decay, decoupled_weight_decay, trace_momentum
from trainlab.optim.transforms.curvature import CurvatureFeed, PreconditionMKOR, ScaleByAdaHessian, ScaleByMFAC

ADAHESSIAN_PAPER = "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning (Yao et al., 2021)"
MFAC_PAPER = "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information (Frantar et al., 2021)"
MKOR_PAPER = "MKOR: Momentum-Enabled Kronecker-Factor-Based Optimizer Using Rank-1 Updates (Mozaffari et al., 2023)"


def _check(name: str, value: Any, low: float, high: float, *, integer: bool = False) -> None:
    kind = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} in [{low}, {high}], got {value!r}")


def _check_betas(betas: Any) -> None:
    if not (isinstance(betas, tuple | list) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        _check(f"betas[{i}]", b, 0.0, 0.999999)


class _BackwardWithGraph(TorchFunctionMode):
    """Within the closure, ``loss.backward()`` becomes ``autograd.grad(..., create_graph=True)`` over
    ``params``: ``.grad`` is filled (accumulated) with detached copies and the graph-carrying gradients
    are kept (summed over several backward calls) for the Hessian-vector product."""

    def __init__(self, params: list[Tensor]) -> None:
        super().__init__()
        self.params = params
        self.grads: list[Tensor | None] | None = None

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not Tensor.backward:
            return func(*args, **kwargs)
        if kwargs.get("inputs") is not None:
            raise ValueError("adahessian's step(closure) does not support loss.backward(inputs=...)")
        grads = torch.autograd.grad(
            args[0], self.params, grad_outputs=kwargs.get("gradient"), create_graph=True, allow_unused=True
        )
        for p, g in zip(self.params, grads, strict=True):
            if g is not None:  # a copy: in-place edits of .grad must not touch the graph's tensors
                p.grad = g.detach().clone() if p.grad is None else p.grad.add_(g.detach())
        if self.grads is None:
            self.grads = list(grads)
        else:
            self.grads = [a if b is None else b if a is None else a + b for a, b in zip(self.grads, grads, strict=True)]
        return None


class AdaHessian(ChainOptimizer):
    """A `ChainOptimizer` whose ``step(closure)`` also estimates ``|Hz|`` for the AdaHessian transform.

    ``seed`` seeds the Rademacher probes (None: torch's global RNG).
    """

    def __init__(self, params: Any, seed: int | None = None, **hp: Any) -> None:
        self.feed = CurvatureFeed(
            "Hessian-diagonal estimate",
            "adahessian gets it from a Hessian-vector product: call optimizer.step(closure)",
        )
        super().__init__(params, chain(decoupled_weight_decay(), ScaleByAdaHessian(self.feed)), **hp)
        self.seed = seed
        self.generator: torch.Generator | None = None

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        if closure is None:
            raise ValueError(
                "adahessian needs the loss to compute a Hessian-vector product: pass a closure, "
                "optimizer.step(closure), that zeroes the gradients, computes the loss, calls "
                "loss.backward() and returns the loss"
            )
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        capture = _BackwardWithGraph(params)
        with torch.enable_grad(), twice_differentiable(), capture:
            loss = closure()
        if capture.grads is None:
            raise RuntimeError("adahessian's closure must call loss.backward() on the loss it returns")
        live = [(p, g) for p, g in zip(params, capture.grads, strict=True) if g is not None]
        ps, gs = [p for p, _ in live], [g for _, g in live]
        probes = rademacher_like(ps, None if self.seed is None else self._probe_generator(ps[0].device))
        hz = hvp_from_gradients(gs, ps, probes, retain_graph=False)
        self.feed.put(ps, [h.detach() for h in hz])
        super().step()
        return loss

    def _probe_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def state_dict(self) -> dict[str, Any]:
        """Adds the probe generator's state, so a resumed run draws the probes the original would have."""
        state = super().state_dict()
        if self.generator is not None:
            state["probe_rng"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop("probe_rng", None)
        super().load_state_dict(state_dict)
        if rng is not None:
            if self.seed is None:
                raise ValueError("this state_dict holds a probe generator state; create adahessian with a seed")
            self._probe_generator(rng.device).set_state(rng)


@register_optimizer(
    "adahessian",
    paper=ADAHESSIAN_PAPER,
    summary="Adam whose second moment tracks a Hutchinson Hessian diagonal |Hz| (spatially averaged for conv)",
    # amirgholami/adahessian (image classification): lr 0.15, eps 1e-4, k 1. Its main.py passes
    # weight_decay/lr = 5e-4/0.15 so the per-step decay is 5e-4·p; ours is lr·weight_decay·p, hence the value.
    defaults={
        "lr": 0.15,
        "betas": (0.9, 0.999),
        "eps": 1e-4,
        "hessian_power": 1.0,
        "weight_decay": 5e-4 / 0.15,
        "seed": None,
    },
)
def adahessian(params: Any, **hp: Any) -> AdaHessian:
    _check_betas(hp["betas"])
    _check("eps", hp["eps"], 0.0, float("inf"))
    _check("hessian_power", hp["hessian_power"], 1e-12, 1.0)
    _check("weight_decay", hp["weight_decay"], 0.0, float("inf"))
    if hp["seed"] is not None and not isinstance(hp["seed"], int):
        raise ValueError(f"seed must be an integer or None, got {hp['seed']!r}")
    return AdaHessian(params, **hp)


@register_optimizer(
    "mfac",
    paper=MFAC_PAPER,
    summary="Dynamic M-FAC: inverse of λI + GᵀG/m over a window of m gradients (Woodbury); state m× params",
    # IST-DASLab/M-FAC optim.py MFAC defaults. Pitfall: with damp 1e-5, directions outside span(G) are
    # scaled by 1/damp = 1e5, so lr must stay tiny (or damp larger).
    defaults={"lr": 1e-3, "ngrads": 1024, "damp": 1e-5, "momentum": 0.0, "weight_decay": 0.0},
)
def mfac(params: Any, **hp: Any) -> ChainOptimizer:
    _check("ngrads", hp["ngrads"], 1, 1 << 20, integer=True)
    _check("damp", hp["damp"], 1e-30, float("inf"))
    _check("momentum", hp["momentum"], 0.0, 0.999999)
    _check("weight_decay", hp["weight_decay"], 0.0, float("inf"))
    transforms = [add_weight_decay(), ScaleByMFAC()]
    if hp["momentum"] > 0:
        # M-FAC's v = μv + (1−μ)u: an EMA, i.e. SGD momentum with dampening μ (started at u, not at 0).
        transforms.append(trace_momentum())
        hp["dampening"] = hp["momentum"]
    else:
        del hp["momentum"]
    return ChainOptimizer(params, chain(*transforms), **hp)


@register_optimizer(
    "mkor",
    paper=MKOR_PAPER,
    summary="Kronecker factors of Linear/Conv2d layers inverted by rank-1 Sherman-Morrison updates, then SGD-m",
    # Mohammad-Mozaffari/mkor mkor.py: inv_freq 10, stabilization 0.1, clipping 100, warmup 0; the factor
    # decay 0.95 is hard-coded there (stat_decay is unused) and is our stat_decay. Inner optimizer 'sgd'
    # whose lr/momentum the user gives; ours are trainlab's SGD defaults.
    defaults={
        "lr": 0.1,
        "momentum": 0.9,
        "dampening": 0.0,
        "nesterov": False,
        "weight_decay": 0.0,
        "inv_freq": 10,
        "stat_decay": 0.95,
        "stabilization_factor": 0.1,
        "warmup_steps": 0,
        "clipping_value": 100.0,
    },
)
def mkor(params: Any, **hp: Any) -> ChainOptimizer:
    _check("inv_freq", hp["inv_freq"], 1, 1 << 30, integer=True)
    _check("warmup_steps", hp["warmup_steps"], 0, 1 << 30, integer=True)
    _check("stat_decay", hp["stat_decay"], 0.0, 1.0)
    _check("stabilization_factor", hp["stabilization_factor"], 0.0, 1.0)
    _check("clipping_value", hp["clipping_value"], 1e-12, float("inf"))
    observer = LayerObserver(clipping=hp.pop("clipping_value"))
    optimizer = ChainOptimizer(params, chain(PreconditionMKOR(observer), add_weight_decay(), trace_momentum()), **hp)
    observer.watch(p for g in optimizer.param_groups for p in g["params"])
    return optimizer
