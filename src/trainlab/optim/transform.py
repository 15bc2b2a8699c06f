"""Gradient transforms over lists of tensors, and `chain`, which composes them.

A transform turns a list of updates (at first, the gradients) into a new list, reading its
hyperparameters from the param group and keeping per-parameter state as tensors. Transforms work on
whole lists so every one of them can use `torch._foreach_*` kernels.

Contract of a transform:
- ``hyperparameters``: the param-group keys it reads, with their defaults. Because they live in the
  param group, LR schedulers (and trainlab schedules) can change them between steps.
- ``init(param, group)``: the per-parameter state, a dict of tensors (created the first time the
  parameter has a gradient).
- ``update(updates, state, params, group)``: ``state`` maps each state key to the list of that key's
  tensors, one per parameter, in the order of ``params``. It returns ``(updates, state)``; state tensors
  may be updated in place or replaced by new tensors in the returned dict.
- It must never write into the tensors of its input ``updates`` unless it created them itself: the first
  transform of a chain receives the parameters' ``.grad`` tensors, which belong to the user. The one
  exception is a `Scratch` list: a transform that returns tensors it allocated for this step alone (no
  state, no caller holds them) wraps them in `Scratch`, and the next transform may overwrite them in place
  instead of allocating its own output (on the CPU, every fresh full-size buffer costs page faults).
- ``per_parameter``: True when each parameter's update depends only on its own gradient, state and value
  (no cross-parameter reduction). A chain of such transforms is run by `ChainOptimizer` on cache-sized
  slices of the parameter list on the CPU (same arithmetic, far less memory traffic). Subclasses that
  couple parameters must set it back to False.
- ``wide_state``: floating state keys kept in at least float32 whatever the parameter's dtype (e.g. sums
  of products of bfloat16 gradients); every other floating state tensor has the parameter's dtype.
  `ChainOptimizer.load_state_dict` casts by the same rule.

Optional: the traced form, which `trainlab.optim.compiled` compiles into one fused kernel per parameter
(``create(..., compile=True)``). A transform that has one sets ``compile_refusal = ""`` and defines
- ``n_scalars`` and ``host_scalars(state, group)``: the step-dependent numbers, computed on the host (bias
  corrections, step counts, learning-rate products, betas), one row of ``n_scalars`` floats per parameter. It
  advances the host step counters as ``update`` does. The rows reach the kernel as a tensor, so a changing
  value (an LR schedule) never recompiles.
- ``static(group)``: the hashable, structural settings the traced code branches on (e.g. Nesterov); a change
  of one recompiles, as a change of the code would.
- ``traced(u, state, param, s, static)``: one parameter's update, from its update ``u`` (never written to),
  its tensor state (step counters and bool flags stay on the host and are not passed), the parameter and
  its scalar row ``s``; state and the parameter may be updated in place. The arithmetic follows ``update``
  op for op, so results agree with the eager chain to the rounding of fused multiply-adds (eager CPU
  kernels use FMA in places; the compiled CPU code does not).
A transform without it keeps ``compile_refusal`` (the reason), and the chain runs eagerly.

Optional: the apply contract. A transform may define ``apply(updates, state, params, group)``, the same as
``update`` followed by ``param -= lr * update``, written straight into the parameters (no full-size update
buffer, one pass fewer). `ChainOptimizer` calls ``Chain.apply`` when the chain's last transform has one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

State = dict[str, list[Tensor]]


class Scratch(list):
    """Updates the chain allocated for this step alone; the transform that receives them may write into them."""


class GradientTransform:
    """Base class of all transforms: stateless identity unless overridden."""

    name: ClassVar[str] = "transform"
    hyperparameters: ClassVar[Mapping[str, Any]] = {}
    per_parameter: ClassVar[bool] = False
    wide_state: ClassVar[frozenset[str]] = frozenset()

    def all_hyperparameters(self) -> dict[str, Any]:
        """The param-group keys this transform (and any transform inside it) reads, with defaults."""
        return dict(self.hyperparameters)

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        return {}

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        return updates, state

    # The traced form (see the module docstring). A subclass that overrides `update` without defining its
    # traced form inherits this refusal (its class sets compile_refusal = "" once it has one).
    compile_refusal: ClassVar[str] = "no traced form"
    n_scalars: ClassVar[int] = 0

    def host_scalars(self, state: State, group: Mapping[str, Any], n: int) -> list[list[float]]:
        """``n_scalars`` floats for each of the ``n`` parameters (advancing host step counters)."""
        return [[] for _ in range(n)]

    def static(self, group: Mapping[str, Any]) -> tuple[Any, ...]:
        return ()

    def traced(
        self, u: Tensor, state: dict[str, Tensor], param: Tensor, s: Sequence[Tensor], static: tuple[Any, ...]
    ) -> Tensor:
        return u

    # The apply contract: None, or a method ``apply(updates, state, params, group) -> State``.
    apply: Any = None


class Chain(GradientTransform):
    """Apply transforms one after another; each keeps its state under its own key prefix."""

    name = "chain"

    def __init__(self, *transforms: GradientTransform) -> None:
        if not transforms:
            raise ValueError("chain needs at least one transform")
        for t in transforms:
            if not isinstance(t, GradientTransform):
                raise TypeError(f"chain takes GradientTransform instances, got {type(t).__name__}")
        self.transforms = transforms
        names = [t.name for t in transforms]
        # Readable state keys ("scale_by_adam.exp_avg"); the position disambiguates repeated transforms.
        self.prefixes = [f"{n}." if names.count(n) == 1 else f"{i}.{n}." for i, n in enumerate(names)]
        self.per_parameter = all(t.per_parameter for t in transforms)  # type: ignore[misc]
        self.wide_state = frozenset(  # type: ignore[misc]
            p + k for p, t in zip(self.prefixes, transforms, strict=True) for k in t.wide_state
        )
        no_trace = [f"{t.name}: {why}" for t in transforms if (why := compile_refusal_of(t))]
        self.compile_refusal = "; ".join(no_trace)  # type: ignore[misc]
        self.n_scalars = sum(t.n_scalars for t in transforms)  # type: ignore[misc]

    def all_hyperparameters(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for t in self.transforms:
            for key, default in t.all_hyperparameters().items():
                if key in merged and merged[key] != default:
                    raise ValueError(
                        f"transforms in one chain disagree on the default of {key!r}: "
                        f"{merged[key]!r} vs {default!r}; give the chain an explicit value"
                    )
                merged[key] = default
        return merged

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        for prefix, t in zip(self.prefixes, self.transforms, strict=True):
            state.update({prefix + k: v for k, v in t.init(param, group).items()})
        return state

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        for prefix, t in zip(self.prefixes, self.transforms, strict=True):
            n = len(prefix)
            own = {k[n:]: v for k, v in state.items() if k.startswith(prefix)}
            updates, own = t.update(updates, own, params, group)
            state.update({prefix + k: v for k, v in own.items()})
        return updates, state

    def _own(self, prefix: str, state: Mapping[str, Any]) -> dict[str, Any]:
        n = len(prefix)
        return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}

    @property
    def applies(self) -> bool:
        """Whether the last transform writes the final update into the parameters itself (apply contract)."""
        return has_apply(self.transforms[-1])

    def apply(  # type: ignore[override]
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> State:
        """``update`` then ``param -= lr * update``, the last step done by the last transform's ``apply``."""
        *head, (prefix, last) = zip(self.prefixes, self.transforms, strict=True)
        for p, t in head:
            own = self._own(p, state)
            updates, own = t.update(updates, own, params, group)
            state.update({p + k: v for k, v in own.items()})
        own = last.apply(updates, self._own(prefix, state), params, group)
        state.update({prefix + k: v for k, v in own.items()})
        return state

    def host_scalars(self, state: State, group: Mapping[str, Any], n: int) -> list[list[float]]:
        rows: list[list[float]] = [[] for _ in range(n)]
        for prefix, t in zip(self.prefixes, self.transforms, strict=True):
            got = t.host_scalars(self._own(prefix, state), group, n)
            if n and len(got[0]) != t.n_scalars:
                raise RuntimeError(f"{t.name}.host_scalars gave {len(got[0])} scalars, n_scalars is {t.n_scalars}")
            for row, more in zip(rows, got, strict=True):
                row.extend(more)
        return rows

    def static(self, group: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(t.static(group) for t in self.transforms)

    def traced(
        self, u: Tensor, state: dict[str, Tensor], param: Tensor, s: Sequence[Tensor], static: tuple[Any, ...]
    ) -> Tensor:
        start = 0
        for prefix, t, st in zip(self.prefixes, self.transforms, static, strict=True):
            own = self._own(prefix, state)
            u = t.traced(u, own, param, s[start : start + t.n_scalars], st)
            start += t.n_scalars
        return u


def rounded(x: Tensor) -> Tensor:
    """``x`` itself, in a traced form: where eager rounds a product in its own kernel and then adds to it, the
    compiled code must not fuse the two into one FMA (it fuses the first product that feeds an addition).
    ``maximum(x, x)`` is x (NaN included) and stands between the product and the addition."""
    return torch.maximum(x, x)


def hoisted(x: Tensor) -> Tensor:
    """0-dim ``x`` itself, in a traced form, computed once per tensor: inductor inlines a per-tensor scalar
    (e.g. a factor derived from a norm) into every vector iteration of the loop that uses it, divisions and
    square roots included; a reduction's result is a buffer the loop loads instead. The max of 16 copies (more
    than inductor unrolls) is that reduction, and exactly ``x`` (NaN included)."""
    return x.reshape(1).expand(16).amax()


def compile_refusal_of(transform: GradientTransform) -> str:
    """Why ``transform`` has no traced form ("" when it has one).

    A subclass that overrides ``update`` but not ``traced`` would inherit a traced form of other arithmetic,
    so it is refused whatever ``compile_refusal`` it inherited.
    """
    if transform.compile_refusal:
        return transform.compile_refusal
    mro = type(transform).__mro__
    owner_update = next(c for c in mro if "update" in c.__dict__)
    owner_traced = next(c for c in mro if "traced" in c.__dict__)
    if owner_update is not owner_traced and issubclass(owner_update, owner_traced):
        return f"{owner_update.__name__} overrides update() without a traced form"
    return ""


def has_apply(transform: GradientTransform) -> bool:
    """Whether ``transform`` follows the apply contract: an ``apply`` defined with (or below) its ``update``."""
    if isinstance(transform, Chain):
        return transform.applies
    mro = type(transform).__mro__
    owner_update = next(c for c in mro if "update" in c.__dict__)
    owner_apply = next((c for c in mro if "apply" in c.__dict__), GradientTransform)
    return transform.apply is not None and issubclass(owner_apply, owner_update)


def chain(*transforms: GradientTransform) -> Chain:
    """Compose transforms left to right, as optax.chain does."""
    return Chain(*transforms)


def step_counts(state: State, key: str = "step") -> list[float]:
    """Increment the per-parameter step tensors under ``key`` and return their new values.

    Step counters live on the CPU (as in torch.optim), so reading them is not a device sync; they are read in
    one conversion per call, not one ``.item()`` per parameter.
    """
    steps = state[key]
    torch._foreach_add_(steps, 1)
    return torch.stack(steps).tolist()


def new_step_counter() -> Tensor:
    """A step counter: a float32 scalar on the CPU, stored under a key named ``step``."""
    return torch.zeros((), dtype=torch.float32)


def is_step_counter(key: str) -> bool:
    """Whether a (prefixed) state key names a step counter, which stays on the host as torch.optim's do."""
    return key.rsplit(".", 1)[-1] == "step"
