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
            per_param = [self.state[p] for p in params]
            for p, st in zip(params, per_param, strict=True):
                if not st:
                    st.update(chain.init(p, group))
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
        return loss


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
