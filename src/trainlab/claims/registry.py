"""The claims registry: each method states its paper's promise and a check that measures it.

Claim checks live in the modules of `trainlab.claims` (one per pillar); importing that package
registers them all. `trainlab verify` runs them; the fast ones also run in the test suite.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ClaimResult:
    """What a check measured for the method and for its baseline, and whether the promise held."""

    measured: Mapping[str, Any]
    baseline: Mapping[str, Any]
    passed: bool
    note: str = ""


@dataclass(frozen=True)
class Claim:
    """``promise``: what the paper says; ``rule``: what the check requires to pass; ``weaker``: how the check falls
    short of the paper's promise (empty when it measures the promise itself); ``known_failing``: why the claim is
    known to fail at this scale (listed in VERIFY.md even when the run skipped it)."""

    name: str
    method: str
    paper: str
    promise: str
    check: Callable[[], ClaimResult] = field(repr=False)
    fast: bool
    rule: str = ""
    weaker: str = ""
    known_failing: str = ""


_CLAIMS: dict[str, Claim] = {}


def register_claim(
    name: str,
    *,
    method: str,
    paper: str,
    promise: str,
    fast: bool,
    rule: str = "",
    weaker: str = "",
    known_failing: str = "",
) -> Callable[[Callable[[], ClaimResult]], Callable[[], ClaimResult]]:
    """Register ``check`` (no arguments, returns a ClaimResult) as the claim ``name`` (fields: :class:`Claim`)."""

    def decorator(check: Callable[[], ClaimResult]) -> Callable[[], ClaimResult]:
        if name in _CLAIMS:
            raise ValueError(f"claim {name!r} is already registered")
        _CLAIMS[name] = Claim(name, method, paper, promise, check, fast, rule, weaker, known_failing)
        return check

    return decorator


def _load_all() -> None:
    import trainlab.claims as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def all_claims(fast_only: bool = False, only: str | None = None) -> list[Claim]:
    """Registered claims, sorted by name; ``only`` selects one by exact name or method."""
    _load_all()
    selected = [c for c in _CLAIMS.values() if not fast_only or c.fast]
    if only is not None:
        selected = [c for c in selected if only in (c.name, c.method)]
        if not selected:
            raise ValueError(f"no claim named {only!r}; choose one of: {', '.join(sorted(_CLAIMS))}")
    return sorted(selected, key=lambda c: c.name)
