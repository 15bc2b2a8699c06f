"""Optimizers by name: `create("lion", model.parameters(), lr=1e-4)` and `trainlab bench --algorithms`.

A recipe is a plain function with an explicit signature, so ``help(recipe)`` and IDEs show its
hyperparameters, their defaults and their ranges::

    @register_optimizer("adamw", paper=..., summary=...)
    def adamw(params, *, lr: Annotated[float, LR] = 1e-3, ...) -> ChainOptimizer: ...

The registry reads the keyword-only parameters: their defaults are the spec's defaults and the `Check`
in each ``Annotated`` annotation is its declared range, so each is written once.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainlab.optim.checks import Check

Factory = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    paper: str
    summary: str
    defaults: Mapping[str, Any]
    ranges: Mapping[str, Check]
    factory: Factory


_OPTIMIZERS: dict[str, OptimizerSpec] = {}


@functools.cache
def declared(factory: Factory) -> tuple[dict[str, Any], dict[str, Check]]:
    """``(defaults, ranges)`` of a recipe, read from its keyword-only parameters."""
    hints = typing.get_type_hints(factory, include_extras=True)
    defaults: dict[str, Any] = {}
    ranges: dict[str, Check] = {}
    for name, parameter in inspect.signature(factory).parameters.items():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if parameter.default is inspect.Parameter.empty:
            raise TypeError(f"{factory.__qualname__}: hyperparameter {name!r} needs a default")
        defaults[name] = parameter.default
        checks = [m for m in getattr(hints.get(name), "__metadata__", ()) if isinstance(m, Check)]
        if len(checks) != 1:
            raise TypeError(f"{factory.__qualname__}: annotate {name!r} as Annotated[<type>, <one Check>]")
        ranges[name] = checks[0]
    return defaults, ranges


def checked(factory: Factory, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's hyperparameters out of ``arguments`` (its ``locals()``), each checked against its range."""
    _, ranges = declared(factory)
    for name, check in ranges.items():
        check(name, arguments[name])
    return {name: arguments[name] for name in ranges}


class Registered(Check):
    """The name of a registered optimizer."""

    allowed = "the name of a registered optimizer (optimizer_names())"

    def admits(self, value: Any) -> bool:
        return isinstance(value, str) and value in _OPTIMIZERS

    def __call__(self, name: str, value: Any) -> None:
        if not self.admits(value):
            raise ValueError(f"{name}: unknown optimizer {value!r}; choose one of: {', '.join(optimizer_names())}")

    def __repr__(self) -> str:
        return "registered optimizer name"


def register_optimizer(name: str, *, paper: str, summary: str) -> Callable[[Factory], Factory]:
    """Register the recipe ``factory(params, *, <hyperparameter>=<default>, ...)`` under ``name``."""

    def decorator(factory: Factory) -> Factory:
        if name in _OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is already registered")
        defaults, ranges = declared(factory)
        _OPTIMIZERS[name] = OptimizerSpec(name, paper, summary, defaults, ranges, factory)
        return factory

    return decorator


def optimizer_names() -> list[str]:
    return sorted(_OPTIMIZERS)


def get_spec(name: str) -> OptimizerSpec:
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(optimizer_names())}")
    return _OPTIMIZERS[name]


def create(name: str, params: Any, *, compile: bool | None = None, **hyperparameters: Any) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` over ``params`` with the paper defaults, overridden.

    ``compile=True`` runs a transform-chain optimizer's chains as ``torch.compile``d fused kernels
    (`trainlab.optim.compiled`; chains that cannot compile run eagerly, the reason in the optimizer's
    ``compile_fallback``); None takes `trainlab.optim.set_compile_default`'s setting (False unless changed).
    ``help(get_spec(name).factory)`` shows the hyperparameters, defaults and ranges."""
    from trainlab.optim.optimizer import ChainOptimizer  # the recipes import this module

    spec = get_spec(name)
    unknown = set(hyperparameters) - set(spec.defaults)
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items())
        raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)} for {name!r}; allowed: {allowed}")
    if compile is not None and not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool or None, got {type(compile).__name__}")
    optimizer = spec.factory(params, **hyperparameters)
    if compile is not None:
        if not isinstance(optimizer, ChainOptimizer):
            if compile:
                raise ValueError(
                    f"compile=True: {name!r} is {type(optimizer).__name__}, not a transform-chain optimizer; "
                    "only chain recipes (adamw, sgd, lion, ...) compile"
                )
        else:
            optimizer.set_compiled(compile)
    return optimizer


def ranges_of(factory: Factory) -> dict[str, Check]:
    """The declared range of each of a recipe's hyperparameters."""
    return declared(factory)[1]
