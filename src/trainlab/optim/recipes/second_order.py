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
- ``mkor`` preconditions nn.Linear, Hugging Face Conv1D and nn.Conv2d layers, found through a global forward hook
  (an optimizer is given parameters, not modules); everything else (embeddings, norm gains, grouped
  convolutions) gets the declared first-order fallback, the SGD-momentum chain that follows the
  preconditioner. Factors are kept in the parameter's dtype (mkor.py defaults to float16 factors).
"""

import weakref
from collections.abc import Callable
from typing import Annotated, Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from trainlab.curvature import hvp_from_gradients, rademacher_like, twice_differentiable
from trainlab.optim.checks import BETAS, FLAG, LR, NON_NEGATIVE, SEED, Interval, integer_at_least, unit_interval
from trainlab.optim.optimizer import ChainOptimizer
from trainlab.optim.registry import checked, ranges_of, register_optimizer
from trainlab.optim.sharding import is_sharded
from trainlab.optim.transform import chain
from trainlab.optim.transforms import add_weight_decay, decoupled_weight_decay, trace_momentum
from trainlab.optim.transforms.curvature import (
    CurvatureFeed,
    PreconditionMKOR,
    ScaleByAdaHessian,
    ScaleByMFAC,
    ShardAwareLayerObserver,
)

ADAHESSIAN_PAPER = "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning (Yao et al., 2021)"
MFAC_PAPER = "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information (Frantar et al., 2021)"
MKOR_PAPER = "MKOR: Momentum-Enabled Kronecker-Factor-Based Optimizer Using Rank-1 Updates (Mozaffari et al., 2023)"


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


# A Rademacher probe and an observed nn.Linear are real; their complex analogues are not these papers' methods.
CURVATURE_IS_REAL = "the Hessian probes and layer statistics of this method are defined for real parameters"


class AdaHessian(ChainOptimizer):
    """A `ChainOptimizer` whose ``step(closure)`` also estimates ``|Hz|`` for the AdaHessian transform.

    ``seed`` seeds the Rademacher probes (None: torch's global RNG). A parameter the loss does not reach is
    skipped that step, as one whose gradient is None (with ``zero_grad(set_to_none=False)`` its gradient is
    a zero tensor, but it has no Hessian-vector product).
    """

    def __init__(self, params: Any, seed: int | None = None, **hp: Any) -> None:
        self.feed = CurvatureFeed(
            "Hessian-diagonal estimate",
            "adahessian gets it from a Hessian-vector product: call optimizer.step(closure)",
        )
        chains = chain(decoupled_weight_decay(), ScaleByAdaHessian(self.feed))
        super().__init__(params, chains, refuse_complex=CURVATURE_IS_REAL, **hp)
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
        if ps:
            probes = rademacher_like(ps, None if self.seed is None else self._probe_generator(ps[0].device))
            hz = hvp_from_gradients(gs, ps, probes, retain_graph=False)
            self.feed.put(ps, [h.detach() for h in hz])
        reached = {id(p) for p in ps}
        self._apply_chains(skip=frozenset(id(p) for p in params if id(p) not in reached))
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
)
def adahessian(
    params: Any,
    *,
    # amirgholami/adahessian (image classification): lr 0.15, eps 1e-4, k 1. Its main.py passes
    # weight_decay/lr = 5e-4/0.15 so the per-step decay is 5e-4·p; ours is lr·weight_decay·p, hence the value.
    lr: Annotated[float, LR] = 0.15,
    betas: Annotated[tuple[float, float], BETAS] = (0.9, 0.999),
    eps: Annotated[float, NON_NEGATIVE] = 1e-4,
    hessian_power: Annotated[float, Interval(0.0, 1.0, low_open=True)] = 1.0,
    weight_decay: Annotated[float, NON_NEGATIVE] = 5e-4 / 0.15,
    seed: Annotated[int | None, SEED] = None,
) -> AdaHessian:
    """AdaHessian: Adam with the second moment of ``D = |Hz|`` (Hutchinson, Rademacher z; spatially averaged
    over conv kernels) instead of g², ``u = m̂ / ((√v̂)^k + eps)``. Needs ``optimizer.step(closure)``.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups (any key but ``seed`` per group).
        lr: learning rate.
        betas: decay rates of the gradient and Hessian-diagonal moments.
        eps: added to the denominator.
        hessian_power: k.
        weight_decay: decoupled weight decay, multiplied by lr.
        seed: seed of the Rademacher probes (None: torch's global RNG); kept in ``state_dict``.
    """
    hp = checked(adahessian, locals())
    return AdaHessian(params, seed=hp.pop("seed"), ranges=ranges_of(adahessian), **hp)


@register_optimizer(
    "mfac",
    paper=MFAC_PAPER,
    summary="Dynamic M-FAC: inverse of λI + GᵀG/m over a window of m gradients (Woodbury); state m× params",
)
def mfac(
    params: Any,
    *,
    # IST-DASLab/M-FAC optim.py MFAC defaults. Pitfall: with damp 1e-5, directions outside span(G) are
    # scaled by 1/damp = 1e5, so lr must stay tiny (or damp larger).
    lr: Annotated[float, LR] = 1e-3,
    ngrads: Annotated[int, Interval(1, 1 << 20, integer=True)] = 1024,
    damp: Annotated[float, Interval(0.0, low_open=True)] = 1e-5,
    momentum: Annotated[float, unit_interval()] = 0.0,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
) -> ChainOptimizer:
    """M-FAC (dynamic algorithm): ``u = (damp·I + GᵀG/m)⁻¹ g`` over a window G of the last ``ngrads``
    gradients of all of a group's parameters, by Woodbury; state ``ngrads`` × the parameter count.

    Args:
        params: parameters or param groups (any key per group; every parameter of a group needs a
            gradient at every step).
        lr: learning rate.
        ngrads: window length m (fixed after the first step).
        damp: the dampening λ.
        momentum: μ of ``v ← μv + (1−μ)u``.
        weight_decay: L2 penalty added to the gradient.
    """
    hp = checked(mfac, locals())
    # M-FAC's momentum v = μv + (1−μ)u (v from zero, as optim.py) lives in ScaleByMFAC.
    return ChainOptimizer(params, chain(add_weight_decay(), ScaleByMFAC()), ranges=ranges_of(mfac), **hp)


class MKOR(ChainOptimizer):
    """A `ChainOptimizer` that preconditions observed layers before its chain runs.

    A layer's weight and bias are preconditioned together, ``[U_W | U_b] = R⁻¹ [∇W | ∇b] L⁻¹``, wherever
    they sit: in one group, in two (e.g. no decay on biases), or with the bias frozen or left out of the
    optimizer (then ∇b counts as zero and U_b is dropped). Parameters added with ``add_param_group`` are
    watched too. With a `GradScaler`, the layer statistics are unscaled by the same factor as the
    gradients (the ratio of each weight's gradient norm at step time to the one its backward produced).
    """

    def __init__(self, params: Any, clipping_value: float, **hp: Any) -> None:
        self.clipping_value = clipping_value
        self.preconditioner = PreconditionMKOR(ShardAwareLayerObserver(clipping=clipping_value))
        self._start_observing()
        chains = chain(self.preconditioner, add_weight_decay(), trace_momentum())
        super().__init__(params, chains, refuse_complex=CURVATURE_IS_REAL, **hp)

    def _start_observing(self) -> None:
        """This process's hooks: the observer's global forward hook and a gradient-norm hook per matrix (a
        copy of the optimizer gets its own, on the copied parameters). They go with the optimizer."""
        if self.preconditioner.observer is None:
            self.preconditioner.observer = ShardAwareLayerObserver(clipping=self.clipping_value)
        self.observer = self.preconditioner.observer
        self._backward_norms: dict[int, Tensor] = {}
        self._hooks: list[RemovableHandle] = []
        weakref.finalize(self, _remove_all, self._hooks)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        first = len(self.param_groups)
        super().add_param_group(param_group)
        self._observe([p for g in self.param_groups[first:] for p in g["params"]])

    def _observe(self, params: list[Tensor]) -> None:
        self.observer.watch(params)
        norms = self._backward_norms

        def record(p: Tensor) -> None:  # ‖∇W‖ as backward leaves it, before any unscaling
            norms[id(p)] = torch.linalg.vector_norm(p.grad)

        # Not on FSDP2's sharded parameters: they are stepped without a GradScaler (see PreconditionMKOR)
        watched = [p for p in params if p.ndim >= 2 and p.requires_grad and not is_sharded(p)]
        self._hooks.extend(p.register_post_accumulate_grad_hook(record) for p in watched)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._precondition()
        self._apply_chains()
        return loss

    def _precondition(self) -> None:
        ours = {id(p) for g in self.param_groups for p in g["params"]}
        layers = []
        for group in self.param_groups:
            chain_ = self.chains[group["chain"]]
            for w in group["params"]:
                stats = self.observer.layers.get(id(w))
                if stats is None or w.grad is None:
                    continue
                if not self.state[w]:
                    self.state[w].update(chain_.init(w, group))
                prefix = chain_.prefixes[0]
                own = {k[len(prefix) :]: v for k, v in self.state[w].items() if k.startswith(prefix)}
                layers.append((w, stats, own, group))
        # FSDP2: the ranks' layer statistics averaged in one all-reduce (only on a step that refreshes factors)
        self.preconditioner.share_statistics([(w, own, group) for w, _, own, group in layers])
        for w, stats, own, group in layers:
            bias = stats.bias
            if bias is None or id(bias) not in ours or bias.grad is None:
                bias = None
            backward = self._backward_norms.pop(id(w), None)
            ratio = None if backward is None else torch.linalg.vector_norm(w.grad) / backward
            unscale = None if ratio is None else torch.nan_to_num(ratio, nan=1.0, posinf=1.0)
            self.preconditioner.precondition(w, bias, own, group, unscale)

    def __getstate__(self) -> dict[str, Any]:
        # Hooks belong to this process's parameters (the preconditioner drops its observer likewise).
        return {k: v for k, v in super().__getstate__().items() if k not in ("observer", "_backward_norms", "_hooks")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "chains" in state:  # a copy or an unpickled optimizer (not load_state_dict): observe its parameters
            self._start_observing()
            self._observe([p for g in self.param_groups for p in g["params"]])


def _remove_all(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


@register_optimizer(
    "mkor",
    paper=MKOR_PAPER,
    summary="Kronecker factors of Linear/Conv2d layers inverted by rank-1 Sherman-Morrison updates, then SGD-m",
)
def mkor(
    params: Any,
    *,
    # Mohammad-Mozaffari/mkor mkor.py: inv_freq 10, stabilization 0.1, clipping 100, warmup 0; the factor
    # decay 0.95 is hard-coded there (stat_decay is unused) and is our stat_decay. Inner optimizer 'sgd'
    # whose lr/momentum the user gives; ours are trainlab's SGD defaults.
    lr: Annotated[float, LR] = 0.1,
    momentum: Annotated[float, unit_interval()] = 0.9,
    dampening: Annotated[float, unit_interval(closed=True)] = 0.0,
    nesterov: Annotated[bool, FLAG] = False,
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0,
    inv_freq: Annotated[int, integer_at_least(1)] = 10,
    stat_decay: Annotated[float, unit_interval(closed=True)] = 0.95,
    stabilization_factor: Annotated[float, unit_interval(closed=True)] = 0.1,
    warmup_steps: Annotated[int, integer_at_least(0)] = 0,
    clipping_value: Annotated[float, Interval(0.0, low_open=True)] = 100.0,
) -> ChainOptimizer:
    """MKOR: each nn.Linear / nn.Conv2d layer's ``[∇W | ∇b]`` preconditioned by inverse Kronecker factors
    kept current with rank-1 Sherman-Morrison updates, rescaled to the gradient's norm, then SGD momentum;
    the other parameters get the SGD momentum alone. Create it before the first forward pass.

    Args:
        params: parameters or param groups (any key but ``clipping_value`` per group; a layer's weight and
            bias may sit in different groups).
        lr, momentum, dampening, nesterov, weight_decay: the SGD that follows the preconditioner.
        inv_freq: steps between factor refreshes.
        stat_decay: γ of the factor refresh ``X ← SM(γX + (1−γ)I, v)``.
        stabilization_factor: ζ of the blend toward I when a factor entry exceeds 2.
        warmup_steps: refresh at every step before this one.
        clipping_value: clamp of the layer input and output-gradient rows.
    """
    hp = checked(mkor, locals())
    return MKOR(params, clipping_value=hp.pop("clipping_value"), ranges=ranges_of(mkor), **hp)
