"""The front door: attach adapters to matching layers, merge them, prepare data-dependent inits, train them.

``attach(model, ...)`` returns a new model (a deep copy) and leaves the caller's model untouched; ``attach_`` swaps
the layers of ``model`` itself (the trailing underscore says so, as in torch). Either way only adapter tensors stay
trainable. ``merge``/``unmerge`` switch an adapted model between the two exact forms in place (they act on the
adapter model, which is what their names say); ``merged_copy`` returns a plain model with every delta folded in.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from trainlab.adapters.layer import AdapterLayer, apply_permutations_, layer_type, weight_matrix
from trainlab.adapters.registry import get_spec

Target = str | type
Loss = Callable[[nn.Module, Any], torch.Tensor]


def _matches(name: str, module: nn.Module, target: Target) -> bool:
    if isinstance(target, type):
        return isinstance(module, target)
    return name == target or name.endswith("." + target) or fnmatch.fnmatchcase(name, target)


def find_targets(model: nn.Module, method: str, targets: Sequence[Target]) -> list[str]:
    """Names of the modules of ``model`` that ``targets`` select; every target must select a supported layer.

    A string target matches a module by its full name, by a dotted suffix (``"attn.qkv"``) or as a glob
    (``"blocks.*.mlp.fc"``); a type target matches every module of that type. A target that matches nothing, or a
    module of a type the method cannot wrap, raises and names the target.
    """
    spec = get_spec(method)
    if isinstance(targets, (str, type)) or not targets:
        raise ValueError(f"targets must be a non-empty list of name patterns or module types, got {targets!r}")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("the model already has adapters; attach to the plain model or use merged_copy first")
    chosen: dict[str, None] = {}
    for target in targets:
        if not isinstance(target, (str, type)):
            raise TypeError(f"a target must be a name pattern (str) or a module type, got {target!r}")
        hits = [(n, m) for n, m in model.named_modules() if n and _matches(n, m, target)]
        if not hits:
            raise ValueError(f"target {target!r} matches no module of the model")
        for name, module in hits:
            kind = layer_type(module)
            if kind not in spec.layer_types:
                raise TypeError(
                    f"target {target!r} matched {name!r} ({type(module).__name__}), but {method} adapts only "
                    f"{', '.join(spec.layer_types)} layers; name the layers themselves"
                )
            chosen[name] = None
    return list(chosen)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def install_layers(
    model: nn.Module,
    method: str,
    config: dict[str, Any],
    layers: dict[str, dict[str, Any]],
    permutations: dict[str, dict[str, list[int]]] | None = None,
) -> nn.Module:
    spec = get_spec(method)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, kwargs in layers.items():
        base = model.get_submodule(name)
        _set_module(model, name, spec.layer_class(base, **config, **kwargs))
    model._trainlab_adapter = {"method": method, "config": dict(config), "permutations": permutations or {}}
    return model


def attach_(
    model: nn.Module,
    method: str,
    *,
    targets: Sequence[Target],
    batches: Iterable[Any] | None = None,
    loss: Loss | None = None,
    **config: Any,
) -> nn.Module:
    """Swap the matching layers of ``model`` itself for ``method`` adapter layers and freeze everything else.

    Returns ``model``. ``config`` overrides the method's paper defaults (see ``get_spec(method).fields``). S2FT with
    ``couple=`` also co-permutes coupled channels of ``model`` (its function is unchanged); its data-based
    selections (``selection="activation-large"``, ...) score the channels on ``batches`` with ``loss(model,
    batch)`` here, since the selection decides the adapter's structure (other data-dependent inits: ``prepare``).
    """
    spec = get_spec(method)
    config = spec.resolve(config)
    if (batches is None) != (loss is None):
        raise ValueError("attach: batches= and loss= go together")
    if batches is not None and spec.arrange is None:
        raise ValueError(f"attach: {method} reads no data when attaching (batches=, loss=); use prepare() for its init")
    names = find_targets(model, method, targets)
    permutations: dict[str, dict[str, list[int]]] = {}
    if spec.arrange is not None:
        data = None if batches is None else (batches, loss)
        layers, permutations = spec.arrange(model, names, config, data)
    elif spec.plan is not None:
        layers = spec.plan({n: weight_matrix(model.get_submodule(n)).detach() for n in names}, config)
    else:
        layers = {n: {} for n in names}
    return install_layers(model, method, config, layers, permutations)


def attach(
    model: nn.Module,
    method: str,
    *,
    targets: Sequence[Target],
    batches: Iterable[Any] | None = None,
    loss: Loss | None = None,
    **config: Any,
) -> nn.Module:
    """A copy of ``model`` with ``method`` adapters on the layers ``targets`` selects; ``model`` is not changed."""
    get_spec(method).resolve(config)  # fail before copying a large model
    return attach_(copy.deepcopy(model), method, targets=targets, batches=batches, loss=loss, **config)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """The adapter layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_info(model: nn.Module) -> dict[str, Any]:
    """``{"method": ..., "config": {...}}`` of an adapted model; raises if ``model`` has no adapters."""
    info = getattr(model, "_trainlab_adapter", None)
    if info is None or not adapter_layers(model):
        raise ValueError("the model has no trainlab adapters; call adapters.attach(model, method, targets=...) first")
    return info


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter delta into its base weight (in place); the output is unchanged."""
    for layer in adapter_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged delta back out of its base weight (in place)."""
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model (no adapter layers, every parameter trainable) computing what the adapted ``model`` does.

    Channels that S2FT co-permuted are put back in the original order, so the copy lines up with the base model.
    """
    info = adapter_info(model)
    plain = copy.deepcopy(model)
    for name, layer in adapter_layers(plain).items():
        _set_module(plain, name, layer.merged_module())
    inverse = {
        name: {side: torch.argsort(torch.tensor(order)).tolist() for side, order in sides.items()}
        for name, sides in info.get("permutations", {}).items()
    }
    apply_permutations_(plain, inverse)
    del plain._trainlab_adapter
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def prepare(model: nn.Module, batches: Iterable[Any], *, loss: Loss) -> nn.Module:
    """Run the data-dependent initialization of an adapted model in place (LoRA-GA's gradient SVD).

    ``loss(model, batch)`` returns a scalar. Methods that need no data return at once; the caller's ``.grad``
    fields and ``requires_grad`` flags are left as they were.
    """
    info = adapter_info(model)
    spec = get_spec(info["method"])
    if spec.prepare is None:
        return model
    layers = list(adapter_layers(model).values())
    weights = [layer.base.weight for layer in layers]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    sums = [torch.zeros_like(w, dtype=torch.promote_types(w.dtype, torch.float32)) for w in weights]
    count = 0
    try:
        for p in params:  # gradients of the target base weights only: no graph through anything else
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(loss(model, batch), weights, allow_unused=True)
            for s, g in zip(sums, grads, strict=True):
                if g is not None:
                    s.add_(g)
            count += 1
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    if count == 0:
        raise ValueError(f"prepare for {info['method']} needs at least one batch; got an empty iterable")
    for layer, s in zip(layers, sums, strict=True):
        layer.initialize_from_gradient(weight_matrix_like(layer, s / count))
    return model


def weight_matrix_like(layer: AdapterLayer, full: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like the base weight, viewed as the (out, in) matrix."""
    if layer.kind == "conv1d":
        return full.t()
    if layer.kind == "conv2d":
        return full.flatten(1)
    return full


class TrainingCallback:
    """What a method does around each optimizer step; the default does nothing.

    Use: ``loss = task_loss + cb.regularizer()``; ``loss.backward()``; ``opt.step()``; ``cb.step(step)``;
    ``opt.zero_grad()`` (``step`` reads the gradients, so it runs before they are cleared).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def regularizer(self) -> torch.Tensor | float:
        return 0.0

    def step(self, global_step: int) -> None:
        return None


def training_callback(model: nn.Module, **options: Any) -> TrainingCallback:
    """The adapted model's training callback (AdaLoRA rank pruning, SaRA progressive masks, SNELL allocation)."""
    spec = get_spec(adapter_info(model)["method"])
    if spec.callback is None:
        if options:
            raise ValueError(f"{spec.name} has no training callback; it takes no options, got {sorted(options)}")
        return TrainingCallback(model)
    return spec.callback(model, **spec.resolve_callback(options))
