"""`ChainOptimizer`: the `torch.optim.Optimizer` that runs gradient-transform chains.

It owns param groups, tensor-only state, hooks and `state_dict`, so LR schedulers, `GradScaler`,
checkpointing (``torch.load(weights_only=True)``) and the Hugging Face Trainer work unchanged. Each param
group names the chain that updates it (group key ``"chain"``); `partition` builds such groups from a
declared routing rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from trainlab.optim.transform import GradientTransform

# Keys every group has, whatever its chain reads.
_SHELL_KEYS = {"lr", "chain"}


class ChainOptimizer(torch.optim.Optimizer):
    """Run ``chains[group["chain"]]`` on every param group, then apply ``param -= lr * direction``.

    Transforms produce a direction; the learning rate is applied here, once, so it stays a plain
    param-group value that any LR scheduler can drive (a tensor lr works too).

    ``chains`` is one transform (used for all groups) or a mapping from chain name to transform.
    Keyword arguments are the default hyperparameters of the groups; keys that no chain reads raise a
    ValueError, so a typo never passes silently.
    """

    def __init__(
        self,
        params: Iterable[Any],
        chains: GradientTransform | Mapping[str, GradientTransform],
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
        known: dict[str, Any] = {}
        for t in self.chains.values():
            for key, default in t.all_hyperparameters().items():
                known.setdefault(key, default)
        unknown = set(defaults) - set(known) - _SHELL_KEYS
        if unknown:
            raise ValueError(
                f"unknown hyperparameter(s) {sorted(unknown)}; this optimizer accepts {sorted(known | {'lr': 0})}"
            )
        defaults = {**known, **defaults}
        defaults.setdefault("chain", next(iter(self.chains)))
        if "lr" not in defaults:
            raise ValueError("lr is required")
        super().__init__(params, defaults)
        self._saved_state: dict[int, dict[str, Tensor]] = {}
        self.register_load_state_dict_pre_hook(_remember_saved_state)
        self.register_load_state_dict_post_hook(_restore_counters_and_dtypes)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        chain = param_group.get("chain", self.defaults.get("chain"))
        if chain not in self.chains:
            raise ValueError(f"param group names chain {chain!r}; this optimizer has {sorted(self.chains)}")
        lr = param_group.get("lr", self.defaults.get("lr"))
        if not isinstance(lr, Tensor) and not (isinstance(lr, int | float) and lr >= 0):
            raise ValueError(f"lr must be a non-negative number, got {lr!r}")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
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
                    self.state[p].update(chain.init(p, group))
            if chain.per_parameter and params[0].device.type == "cpu":
                for bucket in _cache_sized(params):
                    self._step_chain(chain, bucket, group)
            else:
                self._step_chain(chain, params, group)
        return loss

    def _step_chain(self, chain: GradientTransform, params: list[Tensor], group: dict[str, Any]) -> None:
        per_param = [self.state[p] for p in params]
        keys = per_param[0].keys()
        state = {k: [st[k] for st in per_param] for k in keys}
        updates, state = chain.update([p.grad for p in params], state, params, group)
        for k, tensors in state.items():
            for st, t in zip(per_param, tensors, strict=True):
                st[k] = t
        lr = group["lr"]
        if isinstance(lr, Tensor):
            torch._foreach_add_(params, torch._foreach_mul(updates, -lr))
        else:
            torch._foreach_add_(params, updates, alpha=-lr)


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


# torch's load_state_dict casts every state tensor to its parameter's dtype and device, except a key named
# exactly "step". Our keys are prefixed ("scale_by_adam.step"), and some state deliberately differs from the
# parameter (float32 counters and low-rank moments of bf16 weights, CPU flags that must not become device
# syncs), so these hooks put such tensors back as they were saved.


def _remember_saved_state(optimizer: ChainOptimizer, state_dict: dict[str, Any]) -> None:
    optimizer._saved_state = {i: dict(st) for i, st in state_dict["state"].items()}


def _restore_counters_and_dtypes(optimizer: ChainOptimizer) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, saved in optimizer._saved_state.items():
        state = optimizer.state[params[index]]
        for key, value in saved.items():
            if not isinstance(value, Tensor):
                continue
            if value.dim() == 0:  # counters and flags stay on the CPU in their own dtype
                state[key] = value.detach().to("cpu", copy=True)
            elif value.dtype != state[key].dtype:
                state[key] = value.detach().to(params[index].device, copy=True)
    optimizer._saved_state = {}
