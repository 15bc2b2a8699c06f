"""Compiled chains: each chain's traced update, compiled by ``torch.compile`` into one fused kernel per parameter.

``create(name, params, compile=True)`` (or `set_compile_default(True)` for every `ChainOptimizer` built
afterwards) runs each chain through a `CompiledChain`:

- the step-dependent numbers (bias corrections, step counts, ``-lr``, ``1 - lr·weight_decay``, betas) are
  computed on the host by each transform's ``host_scalars`` and reach the kernel as one small tensor per
  parameter, so a learning-rate schedule never recompiles; step counters stay host tensors, as in eager;
- the kernel reads the gradient, the parameter and the state once and writes the parameter and the state
  in place (the final ``param -= lr·update`` is part of it: the apply contract, with no update buffer);
- it is compiled with dynamic shapes over flattened parameters, for packs of `PACK` parameters and for one, so
  two graphs serve every parameter of a dtype (numel-1 tensors and non-contiguous ones get their own), and each
  `CompiledChain` has its own dynamo cache (a fresh code object), so optimizers never evict one another's graphs;
- a chain whose leading transforms have no traced form (e.g. ⊥Grad's projection) runs those eagerly and
  compiles the rest; a chain with no traced tail, or whose compilation fails, runs eagerly, with the reason
  in ``optimizer.compile_fallback`` and one warning.

Results agree with the eager chain to a few units in the last place, not bitwise: eager CPU kernels
compute ``a + alpha·b`` (``add_`` with alpha, ``lerp``) with fused multiply-adds, inductor's CPU code
rounds the product first, and reductions (norms) sum in another order.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from trainlab.optim.transform import Chain, GradientTransform, compile_refusal_of, is_step_counter

_DEFAULT = {"compile": False}

# Let the C++ compiler fuse a*b + c into FMAs, as ATen's CPU kernels do (lerp, add with alpha): the compiled
# moments then match eager bit for bit where the eager kernel's rounding is one FMA.
_OPTIONS = {"cpp.enable_floating_point_contract_flag": "fast"}


def set_compile_default(enabled: bool) -> None:
    """Whether `ChainOptimizer`s built from now on compile their chains (``create(..., compile=None)``)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _DEFAULT["compile"] = enabled


def compile_default() -> bool:
    """The default of ``compile`` for new `ChainOptimizer`s (False unless `set_compile_default` changed it)."""
    return _DEFAULT["compile"]


def _parts(transform: GradientTransform) -> list[tuple[str, GradientTransform]]:
    if isinstance(transform, Chain):
        return list(zip(transform.prefixes, transform.transforms, strict=True))
    return [("", transform)]


def _own(prefix: str, state: Mapping[str, Any]) -> dict[str, Any]:
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}


def _traced_key(key: str, value: Any) -> bool:
    """State the kernel reads and writes: floating tensors but the host step counters."""
    return isinstance(value, Tensor) and value.is_floating_point() and not is_step_counter(key)


def _make_body(tail: list[tuple[str, GradientTransform]]) -> Callable[..., None]:
    def body(
        params: list[Tensor], us: list[Tensor], states: list[dict[str, Tensor]], s: Tensor, static: tuple[Any, ...]
    ) -> None:
        for i, (param, u, state) in enumerate(zip(params, us, states, strict=True)):
            start = 1
            for (prefix, transform), st in zip(tail, static, strict=True):
                n = transform.n_scalars
                u = transform.traced(u, _own(prefix, state), param, s[i, start : start + n], st)
                start += n
            param.add_(u * s[i, 0])  # s[i, 0] = -lr

    # A fresh code object: dynamo caches compiled graphs per code object, so this chain's graphs are its own.
    return types.FunctionType(body.__code__.replace(), body.__globals__, "compiled_chain_step", None, body.__closure__)


# Parameters of one kind are stepped PACK at a time (one call of a graph unrolled over PACK parameters; the rest
# one by one): each call of a compiled function costs tens of microseconds of guards and wrappers, and a graph
# per list length would compile without end. So a chain has at most two graphs per kind of parameter.
PACK = 8


def _host_key(value: Any) -> bool:
    """State the host keeps and advances (step counters, flags): 0-dim CPU tensors."""
    return isinstance(value, Tensor) and value.ndim == 0 and value.device.type == "cpu"


def _signature(p: Tensor) -> tuple[Any, ...]:
    """What selects one of the chain's compiled graphs for ``p``."""
    flat = p.is_contiguous()
    return (p.dtype, p.device, flat, 1 if flat else p.ndim, p.numel() == 1)


def _flat(t: Tensor, shape: torch.Size) -> Tensor:
    return t.view(-1) if t.shape == shape and t.is_contiguous() else t


class CompiledChain:
    """Steps one chain's parameters with its compiled traced form (see the module docstring)."""

    def __init__(self, chain: GradientTransform) -> None:
        self.chain = chain
        parts = _parts(chain)
        split = len(parts)
        while split > 0 and not compile_refusal_of(parts[split - 1][1]):
            split -= 1
        self.head, self.tail = parts[:split], parts[split:]
        # Why the chain runs eagerly ("" while it compiles); the head's reasons are kept for the user too.
        self.refusal = "" if self.tail else (compile_refusal_of(chain) or "no traced form")
        self.eager_head = "; ".join(f"{t.name}: {compile_refusal_of(t)}" for _, t in self.head)
        self._fn: Callable[..., None] | None = None
        self._seen: set[tuple[Any, ...]] = set()
        self._views: dict[int, tuple[Tensor, tuple[int, ...], Tensor, dict[str, Tensor]]] = {}

    def _compiled(self) -> Callable[..., None]:
        if self._fn is None:
            self._fn = torch.compile(_make_body(self.tail), dynamic=True, fullgraph=True, options=_OPTIONS)
        return self._fn

    def step(self, params: list[Tensor], grads: list[Tensor], per_param: list[dict[str, Tensor]], group: Any) -> None:
        """One step of ``params`` (real views) with gradients ``grads`` and state dicts ``per_param``.

        Raises what compilation raised (after restoring the host state of the parameters it did not step)
        together with how many parameters it stepped, as ``CompileFailed``."""
        updates: list[Tensor] = grads
        for prefix, transform in self.head:
            state = {k: [st[k] for st in per_param] for k in per_param[0] if k.startswith(prefix)}
            own = _own(prefix, state)
            updates, own = transform.update(updates, own, params, group)
            for k, tensors in own.items():
                for st, t in zip(per_param, tensors, strict=True):
                    st[prefix + k] = t
        signatures = [_signature(p) for p in params]
        # Host state (step counters, flags) to restore if a parameter of a new kind fails to compile.
        fresh = not self._seen.issuperset(signatures)
        host = [{k: v.clone() for k, v in st.items() if _host_key(v)} for st in per_param] if fresh else []
        rows = self._host_rows(per_param, group, len(params))
        static = tuple(t.static(group) for _, t in self.tail)
        neg_lr = -float(group["lr"])
        fn = self._compiled()
        kinds: dict[tuple[Any, ...], list[int]] = {}
        for i, signature in enumerate(signatures):
            kinds.setdefault(signature, []).append(i)
        stepped: list[int] = []
        for signature, indices in kinds.items():
            whole = len(indices) - len(indices) % PACK
            calls = [indices[j : j + PACK] for j in range(0, whole, PACK)] + [[i] for i in indices[whole:]]
            # Eager foreach ops apply Python scalars in float32 to float32 (and lower) tensors, float64 to float64.
            dtype = torch.float64 if signature[0] == torch.float64 else torch.float32
            flat = signature[2]
            for call in calls:
                ps, us, states = [], [], []
                for i in call:
                    view, state = self._prepared(params[i], per_param[i], flat)
                    ps.append(view)
                    us.append(updates[i].reshape(-1) if flat else updates[i])
                    states.append(state)
                s = torch.tensor([[neg_lr, *rows[i]] for i in call], dtype=dtype, device=ps[0].device)
                try:
                    fn(ps, us, states, s, static)
                except Exception as error:  # compilation failed: restore the host state of what was not stepped
                    if not fresh:
                        raise
                    done = set(stepped)
                    for i, saved in enumerate(host):
                        if i not in done:
                            for k, v in saved.items():
                                per_param[i][k].copy_(v)
                    raise CompileFailed(stepped, updates, f"{type(error).__name__}: {error}") from error
                stepped.extend(call)
            self._seen.add(signature)

    def _prepared(self, p: Tensor, st: dict[str, Tensor], flat: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """The (flattened) parameter and its traced state, cached while the state holds the same tensors."""
        ids = tuple(map(id, st.values()))
        hit = self._views.get(id(p))
        if hit is not None and hit[0] is p and hit[1] == ids:
            return hit[2], hit[3]
        shape = p.shape
        view = _flat(p, shape) if flat else p
        state = {k: (_flat(v, shape) if flat else v) for k, v in st.items() if _traced_key(k, v)}
        self._views[id(p)] = (p, ids, view, state)
        return view, state

    def _host_rows(self, per_param: list[dict[str, Tensor]], group: Any, n: int) -> list[list[float]]:
        rows: list[list[float]] = [[] for _ in range(n)]
        keys = per_param[0].keys()
        for prefix, transform in self.tail:
            state = {k: [st[k] for st in per_param] for k in keys if k.startswith(prefix)}
            got = transform.host_scalars(_own(prefix, state), group, n)
            for row, more in zip(rows, got, strict=True):
                if len(more) != transform.n_scalars:
                    raise RuntimeError(
                        f"{transform.name}.host_scalars gave {len(more)} scalars; n_scalars is {transform.n_scalars}"
                    )
                row.extend(more)
        return rows


class CompileFailed(RuntimeError):
    """Compilation failed after the parameters at indices ``stepped`` were stepped; ``updates`` are the eager
    head's updates of all of them."""

    def __init__(self, stepped: list[int], updates: list[Tensor], reason: str) -> None:
        super().__init__(reason)
        self.stepped = stepped
        self.updates = updates
        self.reason = reason
