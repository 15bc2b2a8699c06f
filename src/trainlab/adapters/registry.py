"""Adapter methods by name: `attach(model, "lora", targets=[...], r=8)` and `trainlab finetune --adapter`.

Each method registers one :class:`AdapterSpec`: its paper, its configuration fields with the paper's defaults and
allowed ranges, the layer types it can wrap, whether it needs data (``prepare``) or a training callback, and the
formula for its trainable-parameter count. Tests, the CLI and the docs table read this registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

LAYER_TYPES = ("linear", "conv1d", "conv2d")  # nn.Linear, transformers' Conv1D, nn.Conv2d


@dataclass(frozen=True)
class Field:
    """One configuration field: its default and what is allowed (a closed range or a set of choices)."""

    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    integer: bool = False
    optional: bool = False  # None is allowed as well
    text: bool = False  # a string the method parses itself (S2FT's coupled structures)

    def check(self, method: str, name: str, value: Any) -> None:
        if value is None and self.optional:
            return
        if self.text:
            if not isinstance(value, str):
                raise TypeError(f"{method}: {name} must be a string, got {value!r}")
            return
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"{method}: {name}={value!r} is not allowed; choose one of {list(self.choices)}")
            return
        number = int if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            kind = "an integer" if self.integer else "a number"
            raise TypeError(f"{method}: {name} must be {kind}, got {value!r}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ValueError(f"{method}: {name}={value!r} is outside the allowed range [{self.low}, {self.high}]")

    def describe(self) -> str:
        if self.text:
            return f"{self.default!r} (text)"
        if self.choices is not None:
            return f"{self.default!r} (one of {', '.join(map(repr, self.choices))})"
        return f"{self.default!r} in [{self.low}, {self.high}]"


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter method is and what it needs.

    ``layer_class(base, **config, **layer_kwargs)`` builds the adapter layer around a frozen ``base`` module;
    ``plan(weights, config)`` (optional) decides per-layer ``layer_kwargs`` from all target weights at once (WeLore's
    global threshold); ``count(weight, config)`` is the trainable-parameter formula for one layer with base weight
    ``weight`` (out x in) and ``config`` merged with that layer's plan arguments; ``prepare`` names the data a
    separate ``adapters.prepare`` call needs (or None); ``callback`` is the class of the training callback (rank
    pruning, progressive masks) or None; ``arrange(model, names, config, data)`` (optional, instead of ``plan``;
    ``data`` is None or ``(batches, loss)`` from ``attach(..., batches=, loss=)``) may reorder coupled channels of
    ``model`` in place without changing its function (S2FT's co-permutation, its selection read from data) and returns
    ``(layer_kwargs by name, permutations)``, ``permutations`` mapping module names to ``{"rows"|"columns": order}``
    so that ``load_adapter`` can repeat them on the plain base model.
    """

    name: str
    paper: str
    summary: str
    fields: Mapping[str, Field]
    layer_class: type
    layer_types: tuple[str, ...]
    count: Callable[[torch.Tensor, Mapping[str, Any]], int]
    identity_at_init: bool = True
    prepare: str | None = None
    callback: type | None = None
    callback_fields: Mapping[str, Field] = field(default_factory=dict)
    plan: Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], dict[str, dict[str, Any]]] | None = None
    peft: str | None = None  # how it exports to PEFT's LoRA layout, if it does
    arrange: Callable[..., tuple[dict[str, dict[str, Any]], dict[str, dict[str, list[int]]]]] | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: f.default for k, f in self.fields.items()}

    def resolve(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The paper defaults with ``overrides`` applied; unknown names and impossible values raise."""
        return _resolve(self.name, self.fields, overrides)

    def resolve_callback(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        return _resolve(f"{self.name} callback", self.callback_fields, overrides)


def _resolve(what: str, fields: Mapping[str, Field], overrides: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(fields)
    if unknown:
        allowed = ", ".join(f"{k}={f.describe()}" for k, f in fields.items()) or "none"
        raise ValueError(f"unknown option(s) {sorted(unknown)} for {what}; allowed: {allowed}")
    config = {k: f.default for k, f in fields.items()} | dict(overrides)
    for name, value in config.items():
        fields[name].check(what, name, value)
    return config


_ADAPTERS: dict[str, AdapterSpec] = {}


def register_adapter(spec: AdapterSpec) -> AdapterSpec:
    """Add ``spec`` to the registry (called once per method module)."""
    if spec.name in _ADAPTERS:
        raise ValueError(f"adapter {spec.name!r} is already registered")
    bad = set(spec.layer_types) - set(LAYER_TYPES)
    if bad:
        raise ValueError(f"adapter {spec.name!r}: unknown layer types {sorted(bad)}; allowed: {LAYER_TYPES}")
    _ADAPTERS[spec.name] = spec
    return spec


def adapter_names() -> list[str]:
    return sorted(_ADAPTERS)


def get_spec(name: str) -> AdapterSpec:
    if name not in _ADAPTERS:
        raise ValueError(f"unknown adapter method {name!r}; choose one of: {', '.join(adapter_names())}")
    return _ADAPTERS[name]
