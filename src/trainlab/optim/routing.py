"""Declared routing of parameters to chains: `partition` turns a rule into param groups.

A rule is a function ``(name, param) -> chain name``. Names come from ``model.named_parameters()``;
when plain tensors are given, the name is None and a rule can only look at the tensor (e.g. its
dimensionality). Routing is always stated, never a hidden size cut-off.

`ChainOptimizer(..., rule=...)` applies a rule to every param group it is given, in the constructor and in
``add_param_group`` alike; `partition` does the same split for hand-built groups.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

Rule = Callable[[str | None, Tensor], str]


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if all(isinstance(x, dict) for x in items):
        return [dict(g) for g in items]
    return [{"params": items}]


def partition(params: Iterable[Any], rule: Rule, options: dict[str, dict[str, Any]] | None = None) -> list[dict]:
    """Split ``params`` (tensors, (name, tensor) pairs, or param groups) into one group per chain.

    Each resulting group has ``"chain"`` set to the rule's answer, keeps the options of the group it came
    from, and gets ``options[chain]`` (e.g. a chain-specific lr) where the source group did not set them.
    """
    options = options or {}
    out: list[dict[str, Any]] = []
    for group in _as_groups(params):
        members = group.pop("params")
        members = [members] if isinstance(members, Tensor) else list(members)
        by_chain: dict[str, list[Any]] = {}
        for item in members:
            name, p = item if isinstance(item, tuple) else (None, item)
            by_chain.setdefault(rule(name, p), []).append(item)
        for chain_name, items in by_chain.items():
            out.append({**options.get(chain_name, {}), **group, "params": items, "chain": chain_name})
    return out


@dataclass(frozen=True)
class MatricesTo:
    """Route parameters with 2+ dimensions to ``matrix_chain`` unless their name matches ``exclude``; the
    rest to ``other_chain``. A class, not a closure, so optimizers that hold it deepcopy and pickle."""

    matrix_chain: str
    other_chain: str
    exclude: str | None = None

    def __call__(self, name: str | None, p: Tensor) -> str:
        excluded = self.exclude is not None and name is not None and re.search(self.exclude, name)
        return self.matrix_chain if p.ndim >= 2 and not excluded else self.other_chain


def matrices_to(matrix_chain: str, other_chain: str, exclude: str | None = None) -> Rule:
    """Route parameters with 2+ dimensions to ``matrix_chain`` unless their name matches ``exclude``."""
    if exclude is not None:
        re.compile(exclude)  # a bad pattern fails here, not at the first parameter
    return MatricesTo(matrix_chain, other_chain, exclude)
