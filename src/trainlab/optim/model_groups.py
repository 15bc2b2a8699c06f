"""A model-level front door, in the style of pytorch-optimizer's ``create_optimizer(model, name, ...)``:
parameters are sorted by the *type* of the module that holds them, never by their names.

* biases and normalization gains/shifts (LayerNorm, RMSNorm, GroupNorm, BatchNorm, InstanceNorm) get no weight
  decay (GPT-2/BERT practice, and the AdamW paper's decay is meant for weights);
* embeddings (``nn.Embedding``/``nn.EmbeddingBag``) and the output head (the model's
  ``get_output_embeddings()`` when it has one, a Linear tied to an embedding, else the last Linear in
  registration order; ``head=`` names another) are kept out of the matrix chain of the routed recipes
  (Muon, AuON, GaLore, FRUGAL, COSMOS), which send them to their AdamW chain: an embedding or a classifier
  called ``tok``, ``classifier``, ``fc`` or ``out`` no longer slips into Muon because of its name.

:func:`routing_table` says, per parameter, what it is, which chain it went to and its weight decay.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from trainlab.optim.registry import create, get_spec

ROUTED = ("muon", "auon", "galore", "frugal", "cosmos")  # recipes with an ``exclude`` rule for their matrix chain
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
MATCH_NOTHING = r"(?!)"


def _norm_like(module: nn.Module) -> bool:
    # Hugging Face and other libraries define their own RMSNorm/LayerNorm classes (T5LayerNorm, LlamaRMSNorm).
    return isinstance(module, NORMS) or re.search(r"(Layer|RMS|Group|Batch)Norm", type(module).__name__) is not None


def _head(model: nn.Module, head: str | nn.Module | None) -> nn.Module | None:
    modules = dict(model.named_modules())
    if isinstance(head, str):
        if head not in modules:
            raise ValueError(f"head {head!r} is not a module of the model; modules: {list(modules)[:10]}...")
        return modules[head]
    if isinstance(head, nn.Module):
        return head
    getter = getattr(model, "get_output_embeddings", None)
    found = getter() if callable(getter) else None
    if isinstance(found, nn.Module):
        return found
    embeddings = {id(m.weight) for m in modules.values() if isinstance(m, nn.Embedding | nn.EmbeddingBag)}
    linears = [m for m in modules.values() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    tied = [m for m in linears if id(m.weight) in embeddings]
    return tied[0] if tied else (linears[-1] if linears else None)


def classify(model: nn.Module, head: str | nn.Module | None = None) -> dict[str, str]:
    """Parameter name (as ``model.named_parameters()`` gives it) -> ``embedding``, ``head``, ``norm``,
    ``bias`` or ``weight``, from the type of the module holding it (a tied weight counts once, as its first
    holder: an embedding tied to the head is an embedding)."""
    head_module = _head(model, head)
    roles: dict[str, str] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, nn.Embedding | nn.EmbeddingBag):
                roles[full] = "embedding"
            elif _norm_like(module):
                roles[full] = "norm"
            elif module is head_module:
                roles[full] = "head" if p.ndim >= 2 else "bias"
            elif p.ndim < 2:
                roles[full] = "bias"
            else:
                roles[full] = "weight"
    return roles


def create_optimizer(
    model: nn.Module,
    name: str,
    *,
    weight_decay: float | None = None,
    head: str | nn.Module | None = None,
    print_routing: bool = False,
    **hyperparameters: Any,
) -> torch.optim.Optimizer:
    """``trainlab.optim.create(name, ...)`` over ``model``'s trainable parameters in two groups: weights (with
    ``weight_decay``, default the recipe's) and biases/norms (none); for the routed recipes embeddings and the
    output head go to the AdamW chain by module type. ``hyperparameters``: the recipe's (see
    ``get_spec(name)``). ``print_routing``: print :func:`routing_table` of the result."""
    spec = get_spec(name)
    allowed = set(spec.defaults)
    if "exclude" in hyperparameters:
        raise ValueError("create_optimizer routes by module type; pass head= instead of exclude=")
    roles = classify(model, head)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    kwargs = dict(hyperparameters)
    if name in ROUTED:
        kept_out = [n for n, _ in named if roles[n] in ("embedding", "head")]
        kwargs["exclude"] = "^(" + "|".join(map(re.escape, kept_out)) + ")$" if kept_out else MATCH_NOTHING
    decay_keys = [k for k in ("weight_decay", "adamw_weight_decay") if k in allowed]
    if not decay_keys:
        if weight_decay is not None:
            raise ValueError(f"weight_decay: optimizer {name!r} has no weight decay")
        return _done(create(name, named, **kwargs), model, roles, print_routing)
    decayed = [(n, p) for n, p in named if roles[n] in ("weight", "embedding", "head")]
    plain = [(n, p) for n, p in named if roles[n] in ("bias", "norm")]
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    groups = [{"params": decayed}] if decayed else []
    if plain:
        groups.append({"params": plain, **dict.fromkeys(decay_keys, 0.0)})
    return _done(create(name, groups, **kwargs), model, roles, print_routing)


def _done(optimizer: torch.optim.Optimizer, model: nn.Module, roles: dict[str, str], show: bool) -> Any:
    if show:
        print(routing_table(model, optimizer, roles))
    return optimizer


def routing_table(model: nn.Module, optimizer: torch.optim.Optimizer, roles: dict[str, str] | None = None) -> str:
    """A Markdown table: each trainable parameter, its shape, role, chain and weight decay in ``optimizer``."""
    roles = roles or classify(model)
    where: dict[int, tuple[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:  # a routed chain's group holds its own keys (adamw_* renamed to weight_decay)
            where[id(p)] = (group.get("chain", "-"), group.get("weight_decay", "-"))
    lines = ["| parameter | shape | role | chain | weight decay |", "|---|---|---|---|---|"]
    for n, p in model.named_parameters():
        if id(p) in where:
            chain, decay = where[id(p)]
            lines.append(f"| {n} | {tuple(p.shape)} | {roles.get(n, '?')} | {chain} | {decay} |")
    return "\n".join(lines)
