"""`ChainOptimizer`: the `torch.optim.Optimizer` that runs gradient-transform chains.

It owns param groups, tensor-only state, hooks and `state_dict`, so LR schedulers, `GradScaler`,
checkpointing (``torch.load(weights_only=True)``), `copy.deepcopy`, pickling and the Hugging Face Trainer
work unchanged. Each param group names the chain that updates it (group key ``"chain"``).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from trainlab.optim.checks import LR, Check
from trainlab.optim.compiled import CompiledChain, CompileFailed, compile_default
from trainlab.optim.routing import Rule
from trainlab.optim.sharding import dtensor_class
from trainlab.optim.transform import GradientTransform, has_apply, is_step_counter

# Group keys that are not hyperparameters: what torch.optim and LR schedulers put in a group.
_SHELL_KEYS = frozenset({"params", "param_names", "chain", "initial_lr"})


# A user key feeding a chain's group key, optionally through a conversion (e.g. FRUGAL's density -> rank).
Rename = str | tuple[str, Callable[[Any], Any]]


def _real(t: Tensor) -> Tensor:
    """A complex tensor as its real view (..., 2), as torch.optim steps complex parameters."""
    return torch.view_as_real(t) if t.is_complex() else t


class ChainOptimizer(torch.optim.Optimizer):
    """Run ``chains[group["chain"]]`` on every param group, then apply ``param -= lr * direction``.

    Transforms produce a direction; the learning rate is applied here, once, so it stays a plain
    param-group value that any LR scheduler can drive (a one-element tensor lr works too).

    ``chains`` is one transform (used for all groups) or a mapping from chain name to transform.
    Keyword arguments are the default hyperparameters of the groups. Every group, given here or later to
    ``add_param_group``, goes through the same path:

    - its keys are checked: unknown keys raise a ValueError listing the allowed ones, and each value must
      lie in its declared range (``ranges``, from the recipe's signature; ``lr`` always);
    - ``rule(name, param) -> chain`` splits it into one group per chain (a group that names ``"chain"``
      itself is not split); without a rule every group gets the first chain;
    - each chain's group gets the keys its transforms read. ``renames[chain]`` maps a user-facing key to
      the chain's key, so Muon's ``adamw_lr`` becomes the AdamW chain's ``lr`` while ``lr`` drives only
      the Muon chain.

    Complex parameters are stepped as their real views (``torch.view_as_real``), which is what
    torch.optim does; a recipe for which that is meaningless passes ``refuse_complex`` (the reason).

    ``compiled`` (default: `trainlab.optim.compiled.compile_default()`; set it with `set_compiled` or
    ``create(..., compile=True)``) runs each chain as one ``torch.compile``d kernel per parameter
    (`trainlab.optim.compiled`). A chain that cannot be compiled runs eagerly: ``compile_fallback`` maps its
    name to the reason (and a warning says so once); ``compile_eager_head`` names the leading transforms of a
    compiled chain that still run eagerly (e.g. ⊥Grad's projection).
    """

    def __init__(
        self,
        params: Iterable[Any],
        chains: GradientTransform | Mapping[str, GradientTransform],
        *,
        rule: Rule | None = None,
        renames: Mapping[str, Mapping[str, Rename]] | None = None,
        ranges: Mapping[str, Check] | None = None,
        refuse_complex: str | None = None,
        **defaults: Any,
    ) -> None:
        if isinstance(chains, GradientTransform):
            chains = {"default": chains}
        if not chains:
            raise ValueError("chains must name at least one transform")
        for name, t in chains.items():
            if not isinstance(t, GradientTransform):
                raise TypeError(f"chain {name!r} is a {type(t).__name__}, not a GradientTransform")
        self.chains = dict(chains)
        self.rule = rule
        self.refuse_complex = refuse_complex
        self.ranges = {"lr": LR, **(ranges or {})}
        self._feeds, known = self._user_keys(renames or {})
        unknown = set(defaults) - set(known)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)}; this optimizer accepts {sorted(known)}")
        defaults = {**known, **defaults}
        if defaults.get("lr") is None:
            raise ValueError("lr is required")
        self._check(defaults)
        # Group keys a user may set: those feeding a chain, and with a recipe only the ones it declares.
        self._allowed = set(known) & set(self.ranges) if ranges else set(known)
        super().__init__(params, defaults)
        self.compiled = compile_default()
        self.compile_fallback: dict[str, str] = {}
        self.compile_eager_head: dict[str, str] = {}
        self._runners: dict[str, tuple[GradientTransform, CompiledChain | None]] = {}

    def set_compiled(self, enabled: bool) -> None:
        """Run the chains compiled (`trainlab.optim.compiled`) or eagerly, from the next step on."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.compiled = enabled
        if enabled:  # refusals known without compiling are reported now, not at the first step
            for name in self.chains:
                self._runner(name)

    def _runner(self, name: str) -> CompiledChain | None:
        """The compiled runner of chain ``name``, or None where it runs eagerly (the reason recorded)."""
        runners = self.__dict__.setdefault("_runners", {})
        chain = self.chains[name]
        if name in runners and runners[name][0] is chain:
            return runners[name][1]
        # New, or the chain was replaced (⊥Grad wraps the chains of a built optimizer).
        self.compile_fallback.pop(name, None)
        self.compile_eager_head.pop(name, None)
        runner = CompiledChain(chain)
        runners[name] = (chain, runner)
        if runner.refusal:
            self._give_up(name, runner.refusal)
            return None
        if runner.eager_head:
            self.compile_eager_head[name] = runner.eager_head
        return runner

    def _give_up(self, name: str, reason: str) -> None:
        self.compile_fallback[name] = reason
        self.__dict__.setdefault("_runners", {})[name] = (self.chains[name], None)
        warnings.warn(f"compile=True: chain {name!r} runs eagerly ({reason})", RuntimeWarning, stacklevel=4)

    def _user_keys(
        self, renames: Mapping[str, Mapping[str, Rename]]
    ) -> tuple[dict[str, dict[str, tuple[str, Callable[[Any], Any] | None]]], dict[str, Any]]:
        """For each chain, the user keys that feed its group keys; and every user key with its default."""
        if set(renames) - set(self.chains):
            raise ValueError(f"renames name unknown chains {sorted(set(renames) - set(self.chains))}")
        feeds: dict[str, dict[str, tuple[str, Callable[[Any], Any] | None]]] = {}
        known: dict[str, Any] = {}
        for name, transform in self.chains.items():
            keys = {"lr": None, **transform.all_hyperparameters()}
            feed = {u: (r, None) if isinstance(r, str) else r for u, r in renames.get(name, {}).items()}
            for user, (key, _) in feed.items():
                if key not in keys:
                    raise ValueError(f"rename {user!r} -> {key!r}: chain {name!r} reads no {key!r}")
                known.setdefault(user, keys[key])
            targets = {key for key, _ in feed.values()}
            for key, default in keys.items():
                if key not in targets:
                    feed[key] = (key, None)
                    known.setdefault(key, default)
            feeds[name] = feed
        return feeds, known

    def _check(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if key in self.ranges:
                self.ranges[key](key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Check, route and add ``param_group`` (one group per chain its parameters go to)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        unknown = set(param_group) - self._allowed - _SHELL_KEYS
        if unknown:
            raise ValueError(f"param group has unknown key(s) {sorted(unknown)}; allowed: {sorted(self._allowed)}")
        self._check({k: v for k, v in param_group.items() if k not in _SHELL_KEYS})
        by_chain = self._route(param_group)
        values = {**self.defaults, **param_group}
        for name, items in by_chain.items():
            group = {
                key: values[user] if convert is None else convert(values[user])
                for user, (key, convert) in self._feeds[name].items()
            }
            if "initial_lr" in param_group:
                group["initial_lr"] = param_group["initial_lr"]
            group["chain"] = name
            group["params"] = [p for _, p in items]
            if items[0][0] is not None:
                group["param_names"] = [n for n, _ in items]
            self._append(group)

    def _route(self, param_group: dict[str, Any]) -> dict[str, list[tuple[str | None, Tensor]]]:
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("params must be an ordered collection such as a list, not a set (its order varies)")
        names = param_group.get("param_names")
        items = [(None, p) if not isinstance(p, tuple) else p for p in params]
        if names is not None:
            items = [(n, p) for n, (_, p) in zip(names, items, strict=True)]
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        if len({n is None for n, _ in items}) != 1:
            raise ValueError("name every parameter of a group or none: some param names are missing")
        for _, p in items:
            if not isinstance(p, Tensor):
                raise TypeError(f"params must be tensors (or (name, tensor) pairs); got a {type(p).__name__}")
            if not (p.is_leaf or p.retains_grad):
                raise ValueError("can't optimize a non-leaf Tensor")
            if p.is_complex() and self.refuse_complex:
                raise ValueError(
                    f"complex parameters are not supported: {self.refuse_complex}. Optimize "
                    f"torch.view_as_real(param) as a real parameter instead (got shape {tuple(p.shape)}, {p.dtype})"
                )
        chain = param_group.get("chain")
        if chain is not None and chain not in self.chains:
            raise ValueError(f"param group names chain {chain!r}; this optimizer has {sorted(self.chains)}")
        by_chain: dict[str, list[tuple[str | None, Tensor]]] = {}
        for name, p in items:
            if chain is not None:
                target = chain
            elif self.rule is not None:
                target = self.rule(name, _real(p))
            else:
                target = next(iter(self.chains))
            by_chain.setdefault(target, []).append((name, p))
        return by_chain

    def _append(self, group: dict[str, Any]) -> None:
        """torch.optim's bookkeeping for a new group: no parameter in two groups, names all or none."""
        params = group["params"]
        if len(params) != len(set(params)):
            warnings.warn("a param group lists a parameter twice (torch.optim warns the same)", stacklevel=3)
        seen: set[Tensor] = set()
        for other in self.param_groups:
            seen.update(other["params"])
            if ("param_names" in other) != ("param_names" in group):
                raise ValueError("name the parameters of every group or of none")
        if not seen.isdisjoint(params):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._apply_chains()
        return loss

    @torch.no_grad()
    def _apply_chains(self, skip: frozenset[int] = frozenset()) -> None:
        """One update of every parameter with a gradient (except ``id(p)`` in ``skip``). Not wrapped in the
        step hooks, so a subclass's ``step`` calls this, not ``super().step()``, and hooks fire once."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and id(p) not in skip]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "trainlab optimizers do not support sparse gradients; use dense gradients "
                        "(e.g. nn.Embedding(sparse=False))"
                    )
            chain = self.chains[group["chain"]]
            for p in params:
                if not self.state[p]:
                    self.state[p].update(chain.init(_real(p), group))
            runner = self._runner(group["chain"]) if getattr(self, "compiled", False) else None
            # FSDP2 parameters are known now: no compile attempt to fail (one check when no process group is up)
            if runner is not None and (dtensor := dtensor_class()) and any(isinstance(p, dtensor) for p in params):
                self._give_up(group["chain"], "FSDP2 (DTensor) parameters: the compiled kernels take plain tensors")
                runner = None
            if runner is not None and runner.head and chain.per_parameter and params[0].device.type == "cpu":
                for bucket in _cache_sized(params):  # the eager head's output stays in cache for the kernel
                    self._step_compiled(runner, group, bucket)
            elif runner is not None:
                self._step_compiled(runner, group, params)
            elif chain.per_parameter and params[0].device.type == "cpu":
                for bucket in _cache_sized(params):
                    self._step_chain(chain, bucket, group)
            else:
                self._step_chain(chain, params, group)

    def _step_compiled(self, runner: CompiledChain, group: dict[str, Any], params: list[Tensor]) -> None:
        views = [_real(p) for p in params]
        per_param = [self.state[p] for p in params]
        try:
            runner.step(views, [_real(p.grad) for p in params], per_param, group)
        except CompileFailed as failed:  # the parameters it did not step take the eager tail of the chain
            self._give_up(group["chain"], f"compilation failed: {failed.reason}")
            rest = [i for i in range(len(views)) if i not in set(failed.stepped)]
            if not rest:
                return
            updates = [failed.updates[i] for i in rest]
            per_param, views = [per_param[i] for i in rest], [views[i] for i in rest]
            for prefix, transform in runner.tail:
                n = len(prefix)
                own = {k[n:]: [st[k] for st in per_param] for k in per_param[0] if k.startswith(prefix)}
                updates, own = transform.update(updates, own, views, group)
                for k, tensors in own.items():
                    for st, t in zip(per_param, tensors, strict=True):
                        st[prefix + k] = t
            self._add_update(views, updates, group["lr"])

    def _step_chain(self, chain: GradientTransform, params: list[Tensor], group: dict[str, Any]) -> None:
        per_param = [self.state[p] for p in params]
        keys = per_param[0].keys()
        state = {k: [st[k] for st in per_param] for k in keys}
        views = [_real(p) for p in params]
        grads = [_real(p.grad) for p in params]
        if has_apply(chain):  # the last transform writes into the parameters itself
            state = chain.apply(grads, state, views, group)  # type: ignore[misc]
            updates = None
        else:
            updates, state = chain.update(grads, state, views, group)
        for k, tensors in state.items():
            for st, t in zip(per_param, tensors, strict=True):
                st[k] = t
        if updates is not None:
            self._add_update(views, updates, group["lr"])

    @staticmethod
    def _add_update(views: list[Tensor], updates: list[Tensor], lr: Any) -> None:
        if isinstance(lr, Tensor):
            torch._foreach_add_(views, torch._foreach_mul(updates, -lr))
        else:
            torch._foreach_add_(views, updates, alpha=-lr)

    # torch.optim pickles only defaults, state and param_groups (hooks may be unpicklable closures); a chain
    # optimizer also needs its chains, routing and declared ranges, so `copy.deepcopy` and pickle keep every
    # attribute but the hooks.
    def __getstate__(self) -> dict[str, Any]:
        # Compiled runners are rebuilt on demand (compiled functions do not pickle).
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_") and k != "_runners"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's `load_state_dict`, with state cast by `restored_state` (torch casts every tensor but a
        key named exactly ``step`` to the parameter's dtype, integer indices and seeds included)."""
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        ours = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(saved_ids, ours, strict=False))
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        chain_of = {id(p): self.chains[g["chain"]] for g in self.param_groups for p in g["params"]}
        for index, values in saved.items():
            param = by_id.get(index)
            if param is None:  # not a parameter: torch copied it as it is
                continue
            wide = chain_of[id(param)].wide_state
            self.state[param] = {key: restored_state(key, value, param, key in wide) for key, value in values.items()}


def restored_state(key: str, value: Any, param: Tensor, wide: bool = False) -> Any:
    """A loaded state value for ``param``, by one rule:

    - step counters (keys named ``step``) stay as saved, on the host, as torch.optim keeps them (a plain
      number becomes a float32 CPU tensor);
    - floating state gets the parameter's (real) dtype, at least float32 for ``wide`` state, and device;
    - 0-dim integer and bool state (flags, counters, seeds) stays on the host in its own dtype, so reading it
      is never a device sync; other integer state (indices) moves to the parameter's device, dtype kept.
    """
    if is_step_counter(key):
        return value.clone() if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float32)
    if not isinstance(value, Tensor):
        return value
    if value.is_floating_point():
        dtype = _real(param).dtype
        if wide:
            dtype = torch.promote_types(dtype, torch.float32)
        return value.to(dtype=dtype, device=param.device, copy=True)
    if value.ndim == 0:
        return value.clone()
    return value.to(device=param.device, copy=True)


# On the CPU a foreach op sweeps its whole list before the next op starts, so with many megabytes of
# parameters every op streams the gradient, the state and the temporaries from DRAM again. A chain whose
# transforms are all per-parameter gives the same result when run on slices of the list, and on slices of
# about this many parameter bytes (each with its gradient, state and temporaries) the ops after the first
# find their operands in cache: about 2x faster on ten 1024x1024 float32 matrices.
CPU_BUCKET_BYTES = 1 << 21


def _cache_sized(params: list[Tensor]) -> list[list[Tensor]]:
    """Slices of ``params``: each tensor of CPU_BUCKET_BYTES or more alone, the smaller ones gathered into
    slices of at most CPU_BUCKET_BYTES (fewer slices, less Python overhead per step)."""
    buckets: list[list[Tensor]] = []
    small: list[Tensor] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if nbytes >= CPU_BUCKET_BYTES:
            buckets.append([p])
            continue
        if small and size + nbytes > CPU_BUCKET_BYTES:
            buckets.append(small)
            small, size = [], 0
        small.append(p)
        size += nbytes
    if small:
        buckets.append(small)
    return buckets
