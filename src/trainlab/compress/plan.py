"""Plans: which compressor, at which level, each layer gets. Serializable to JSON and replayable.

A plan is an ordered list of rules ``(pattern, compressor, level)``; a pattern matches a layer by exact name
or, failing that, as a regular expression (``re.fullmatch``). The level is what the compressor's spec says
(:mod:`.registry`): a sparsity, an ``"N:M"`` pattern, a bit-width or per-column bit-widths; it is checked and
put in canonical form when the rule is made (``4.0`` bits -> 4).

A layer gets at most one pruning rule (mask or N:M) and at most one quantizer: later rules of the same family
override earlier ones, so ``[(".*", "magnitude", 0.5), ("lm_head", "magnitude", 0.0)]`` reads naturally and no
layer is ever quantized twice. A pruning rule and a quantizer on the same layer stack deliberately: the layer is
pruned, then its pruned weight quantized, and the mask kept. Structured compressors slice the whole model, so a
plan that uses one holds that single rule. A rule that matches no layer is an error: a typo in a layer name
must not silently leave a layer dense.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

from trainlab.compress.registry import get_compressor
from trainlab.layer_weights import is_transposed_linear, to_out_major, to_weight_layout

PRUNING_KINDS = ("mask", "nm")


def compressible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear, Conv1d/Conv2d and Hugging Face ``Conv1D`` (GPT-2's transposed linear) layers by name: the layers plans
    and allocators act on (embeddings, norms excluded). Read their weights as ``(out, in)`` matrices through
    :func:`trainlab.layer_weights.weight_matrix`."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d) or is_transposed_linear(m)
    }


# Weight layers no compressor acts on: reported as left dense, refused when a rule names them.
UNSUPPORTED_LAYERS = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WHY_UNSUPPORTED = (
    "trainlab compresses nn.Linear, Conv1d and Conv2d only: ConvTranspose weights are laid out (in, out, ...) and "
    "Conv3d inputs have no patch unfolding for calibration Hessians, so these layers stay dense"
)


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """Layer name -> type name of the weight layers left dense by every plan (:data:`UNSUPPORTED_LAYERS`)."""
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, UNSUPPORTED_LAYERS)}


def matching(pattern: str, names: Iterable[str]) -> list[str]:
    """The names ``pattern`` selects: itself when it is one of them, else those it fully matches as a regex."""
    names = list(names)
    return [pattern] if pattern in names else [n for n in names if re.fullmatch(pattern, n)]


@dataclass(frozen=True)
class Rule:
    pattern: str
    compressor: str
    level: Any

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise ValueError(f"a rule's pattern must be a layer name or regular expression, got {self.pattern!r}")
        spec = get_compressor(self.compressor)
        object.__setattr__(self, "level", spec.check_level(self.level, f"level of rule {self.pattern!r}"))


class LayerRules(NamedTuple):
    """What one layer gets: a pruning ``(compressor, level)`` and a quantizer ``(compressor, level)``, or None."""

    prune: tuple[str, Any] | None
    quantize: tuple[str, Any] | None


class Plan:
    """Ordered rules mapping layer names (exact or regex) to ``(compressor, level)``."""

    def __init__(self, rules: Iterable[tuple[str, str, Any] | Rule] = ()) -> None:
        self.rules = [r if isinstance(r, Rule) else Rule(*r) for r in rules]
        structured = {r.compressor for r in self.rules if get_compressor(r.compressor).kind == "structured"}
        if structured and (len(self.rules) != 1 or self.rules[0].pattern != ".*"):
            raise ValueError(
                f"structured compressors ({', '.join(sorted(structured))}) slice the whole model: the plan must be "
                "the single rule ('.*', compressor, sparsity)"
            )

    @classmethod
    def from_levels(cls, compressor: str, levels: dict[str, Any]) -> Plan:
        """One rule per layer, e.g. from an allocator's per-layer levels (an exact name matches only itself:
        :meth:`resolve` tries exact names before regular expressions)."""
        return cls((name, compressor, level) for name, level in levels.items())

    @property
    def structured(self) -> Rule | None:
        """The plan's structured rule, if it is a structured plan."""
        rule = self.rules[0] if self.rules else None
        return rule if rule is not None and get_compressor(rule.compressor).kind == "structured" else None

    def resolve(self, model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, LayerRules]:
        """Layer name -> :class:`LayerRules` for every layer some rule matches, ``exclude`` patterns removed."""
        layers = list(compressible_layers(model))
        excluded: set[str] = set()
        for pattern in [exclude] if isinstance(exclude, str) else exclude:
            hit = matching(pattern, layers)
            if not hit:
                raise ValueError(f"exclude pattern {pattern!r} matches no compressible layer; layers are: {layers}")
            excluded.update(hit)
        out: dict[str, LayerRules] = {}
        left_dense = unsupported_layers(model)
        for rule in self.rules:
            matched = matching(rule.pattern, layers)
            skipped = [f"{n} ({left_dense[n]})" for n in matching(rule.pattern, left_dense) if n not in matched]
            if skipped and not matched:
                raise ValueError(f"plan rule {rule.pattern!r} names {', '.join(skipped)}: {WHY_UNSUPPORTED}")
            if skipped:
                left = ", ".join(skipped)
                warnings.warn(f"plan rule {rule.pattern!r} leaves {left} dense: {WHY_UNSUPPORTED}", stacklevel=2)
            if not matched:
                raise ValueError(f"plan rule {rule.pattern!r} matches no compressible layer; layers are: {layers}")
            family = "prune" if get_compressor(rule.compressor).kind in PRUNING_KINDS else "quantize"
            for name in matched:
                if name not in excluded:
                    out[name] = out.get(name, LayerRules(None, None))._replace(
                        **{family: (rule.compressor, rule.level)}
                    )
        return {name: out[name] for name in layers if name in out}

    def apply(self, model: nn.Module) -> dict[str, LayerRules]:
        """Prune ``model`` in place following a pruning-only plan (masks that survive training); returns the
        resolved assignment. Quantizing and structured plans go through :func:`trainlab.compress.compress`, which
        returns a new model."""
        from trainlab.compress.masks import apply_mask

        other = sorted({r.compressor for r in self.rules if get_compressor(r.compressor).kind not in PRUNING_KINDS})
        if other:
            raise ValueError(f"Plan.apply prunes in place; {other} need trainlab.compress.compress(model, plan)")
        layers = compressible_layers(model)
        resolved = self.resolve(model)
        for name, rules in resolved.items():
            compressor, level = rules.prune
            spec = get_compressor(compressor)
            mask = to_weight_layout(layers[name], spec.function(to_out_major(layers[name], layers[name].weight),
                                                                **{spec.level: level}))  # fmt: skip
            apply_mask(layers[name], mask, pattern=level if spec.kind == "nm" else None)
        return resolved

    def __add__(self, other: Plan) -> Plan:
        """The rules of both plans, ``other``'s last (they override this plan's within their family)."""
        return Plan([*self.rules, *other.rules])

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
