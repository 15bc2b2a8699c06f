"""Plans: which compressor, at which level, each layer gets. Serializable to JSON and replayable.

A plan is an ordered list of rules ``(pattern, compressor, level)``; a pattern matches a layer by exact
name or, failing that, as a regular expression (``re.fullmatch``). Later rules override earlier ones, so
``[(".*", "magnitude", 0.5), ("lm_head", "magnitude", 0.0)]`` reads naturally. A rule that matches no
layer is an error: a typo in a layer name must not silently leave a layer dense.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

Compressor = Callable[[nn.Module, Any], None]
_COMPRESSORS: dict[str, Compressor] = {}


def register_compressor(name: str) -> Callable[[Compressor], Compressor]:
    """Register ``fn(module, level)`` that compresses one layer in place at ``level``."""

    def decorator(fn: Compressor) -> Compressor:
        _COMPRESSORS[name] = fn
        return fn

    return decorator


def compressor_names() -> list[str]:
    import trainlab.compress.prune  # noqa: F401  (registers the pruning compressors)

    return sorted(_COMPRESSORS)


def get_compressor(name: str) -> Compressor:
    names = compressor_names()
    if name not in _COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; choose one of: {', '.join(names)}")
    return _COMPRESSORS[name]


def compressible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv layers by name: the layers plans and allocators act on (embeddings, norms excluded)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)}


@dataclass(frozen=True)
class Rule:
    pattern: str
    compressor: str
    level: Any


class Plan:
    """Ordered rules mapping layer names (exact or regex) to ``(compressor, level)``."""

    def __init__(self, rules: Iterable[tuple[str, str, Any] | Rule] = ()) -> None:
        self.rules = [r if isinstance(r, Rule) else Rule(*r) for r in rules]
        for rule in self.rules:
            get_compressor(rule.compressor)

    @classmethod
    def from_levels(cls, compressor: str, levels: dict[str, Any]) -> Plan:
        """One rule per layer, e.g. from an allocator's per-layer levels (an exact name matches only itself:
        :meth:`resolve` tries exact names before regular expressions)."""
        return cls((name, compressor, level) for name, level in levels.items())

    def resolve(self, model: nn.Module) -> dict[str, tuple[str, Any]]:
        """Layer name -> (compressor, level) for every layer some rule matches."""
        layers = compressible_layers(model)
        out: dict[str, tuple[str, Any]] = {}
        for rule in self.rules:
            matched = [rule.pattern] if rule.pattern in layers else [n for n in layers if re.fullmatch(rule.pattern, n)]
            if not matched:
                raise ValueError(
                    f"plan rule {rule.pattern!r} matches no compressible layer; layers are: {', '.join(layers)}"
                )
            for name in matched:
                out[name] = (rule.compressor, rule.level)
        return out

    def apply(self, model: nn.Module) -> dict[str, tuple[str, Any]]:
        """Compress ``model`` in place following the plan; returns the resolved assignment."""
        layers = compressible_layers(model)
        resolved = self.resolve(model)
        for name, (compressor, level) in resolved.items():
            get_compressor(compressor)(layers[name], level)
        return resolved

    def to_json(self) -> str:
        return json.dumps([[r.pattern, r.compressor, r.level] for r in self.rules], indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(r, list) and len(r) == 3 for r in data):
            raise ValueError("a plan's JSON must be a list of [pattern, compressor, level] triples")
        return cls(tuple(r) for r in data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.rules == other.rules

    def __repr__(self) -> str:
        return f"Plan({[(r.pattern, r.compressor, r.level) for r in self.rules]!r})"
