"""Sparsity masks that survive training, ``deepcopy``, ``state_dict`` round trips and optimizer steps.

Design (why not ``torch.nn.utils.prune``): that utility replaces ``weight`` by ``weight_orig * weight_mask``,
so every state dict and exported file carries two tensors per layer under renamed keys, and an optimizer
still updates the hidden ``weight_orig``. Here instead:

* the weight itself is kept zeroed in place, so ``state_dict()`` holds the plain ``weight`` key only and the
  pattern can be re-derived from its zeros (:func:`masks_from_zeros`);
* the boolean mask is a *non-persistent* buffer (``sparsity_mask``): it follows ``.to()`` and ``deepcopy``
  but never appears in state dicts or files;
* one :class:`_MaskHook` object per layer, stored in the module's own hook dicts (so ``deepcopy`` copies it
  along with the module), re-zeroes the weight after every ``load_state_dict`` and before a forward when the
  weight was written in place since it last zeroed it (tracked by the tensor's version counter, so two
  forwards before one backward do not modify a tensor autograd saved; edits through ``.data`` bypass the
  counter and are caught at the next optimizer step or load instead);
* two process-wide optimizer hooks zero the gradient of pruned entries before any optimizer step (so Adam
  moments of pruned entries stay zero) and re-zero pruned weights after it (so momentum carried from dense
  training or weight decay can never move them). They only touch parameters of live masked layers.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

MASK_BUFFER = "sparsity_mask"


class _MaskHook:
    """Keeps ``module.weight`` zero where ``module.sparsity_mask`` is False; registered in a weak set."""

    def __init__(self, module: nn.Module, pattern: str | None) -> None:
        self.module = module
        self.pattern = pattern  # "N:M" when the mask follows that pattern (export stores it compactly)
        self.seen: tuple[int, int] | None = None  # (id, version) of the weight when last zeroed
        _LIVE.add(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> _MaskHook:
        import copy

        return _MaskHook(copy.deepcopy(self.module, memo), self.pattern)

    def __setstate__(self, state: dict[str, Any]) -> None:  # unpickled (torch.save of a whole module)
        self.__dict__.update(state)
        self.seen = None
        _LIVE.add(self)

    def mask(self) -> torch.Tensor:
        return getattr(self.module, MASK_BUFFER)

    @torch.no_grad()
    def zero(self) -> None:
        weight = self.module.weight
        weight.mul_(self.mask())
        self.seen = (id(weight), weight._version)

    def __call__(self, module: nn.Module, args: Any) -> None:  # forward pre-hook
        _LIVE.add(self)
        weight = self.module.weight
        if self.seen != (id(weight), weight._version):
            self.zero()

    def after_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        self.zero()


_LIVE: weakref.WeakSet[_MaskHook] = weakref.WeakSet()


def _hook_of(module: nn.Module) -> _MaskHook | None:
    return next((h for h in module._forward_pre_hooks.values() if isinstance(h, _MaskHook)), None)


def _masked_hooks(optimizer: torch.optim.Optimizer) -> list[_MaskHook]:
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    # getattr: a live hook's module may have lost its weight since (converted to a runtime layer, parametrized)
    return [h for h in list(_LIVE) if id(getattr(h.module, "weight", None)) in ids and _hook_of(h.module) is h]


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    with torch.no_grad():
        for hook in _masked_hooks(optimizer):
            if hook.module.weight.grad is not None:
                hook.module.weight.grad.mul_(hook.mask())


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for hook in _masked_hooks(optimizer):
        hook.zero()


register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)


def apply_mask(module: nn.Module, mask: torch.Tensor, pattern: str | None = None) -> None:
    """Zero ``module.weight`` where ``mask`` is False and keep it so; replaces any earlier mask."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise ValueError(f"apply_mask needs a module with a weight Parameter, got {type(module).__name__}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    remove_mask(module)
    module.register_buffer(MASK_BUFFER, mask.to(device=weight.device, dtype=torch.bool), persistent=False)
    hook = _MaskHook(module, pattern)
    module.register_forward_pre_hook(hook)
    module.register_load_state_dict_post_hook(hook.after_load)
    hook.zero()


def remove_mask(module: nn.Module) -> None:
    """Drop the mask mechanism; the weight keeps its zeros but may be trained densely again."""
    hook = _hook_of(module)
    if hook is None:
        return
    module._forward_pre_hooks = type(module._forward_pre_hooks)(
        (k, h) for k, h in module._forward_pre_hooks.items() if h is not hook
    )
    module._load_state_dict_post_hooks = type(module._load_state_dict_post_hooks)(
        (k, h) for k, h in module._load_state_dict_post_hooks.items() if getattr(h, "__self__", None) is not hook
    )
    delattr(module, MASK_BUFFER)
    _LIVE.discard(hook)


def get_mask(module: nn.Module) -> torch.Tensor | None:
    """The boolean mask of a masked layer (True = kept), else None."""
    return getattr(module, MASK_BUFFER) if _hook_of(module) is not None else None


def mask_pattern(module: nn.Module) -> str | None:
    """``"N:M"`` when the layer's mask was made by an N:M compressor, else None."""
    hook = _hook_of(module)
    return hook.pattern if hook is not None else None


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every masked layer of ``model``."""
    return {name: m for name, m in model.named_modules() if _hook_of(m) is not None}


def masks_from_zeros(model: nn.Module, names: list[str]) -> None:
    """Re-arm masks from the zeros of the named layers' weights (e.g. after loading into a fresh model)."""
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise ValueError(f"no layer named {name!r} in the model")
        apply_mask(modules[name], modules[name].weight.detach() != 0)


def sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero weights per masked layer."""
    return {name: (m.weight == 0).float().mean().item() for name, m in masked_layers(model).items()}
