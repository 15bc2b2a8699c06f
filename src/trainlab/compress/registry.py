"""Compression methods by name: one registry of compressor and allocator specs, like the optimizers'.

A **compressor** acts on one layer (or, for structured pruning, on the whole model); its spec says what it is
(``kind``), what its level means (``level``: the keyword its function takes), what it needs, which bit-widths it
accepts and its hyperparameters with defaults and ranges. An **allocator** splits one global budget (a sparsity
or an average bit-width) over the layers and returns a :class:`~trainlab.compress.plan.Plan`.

Specs are registered next to their code with :func:`register_compressor` / :func:`register_allocator`; the CLI
choices, the validation of plans, the docs table and the test matrix read them from here. The modules that
register are imported on the first lookup (:data:`_REGISTERING`, then every module of the quantizer package), so
importing this module is cheap and a new quantizer is one file in ``compress/quant/`` plus its test.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

KINDS = ("mask", "nm", "structured", "quantizer")
LEVELS = ("sparsity", "pattern", "bits", "column_bits")  # the keyword each kind's function takes its level by
NEEDS = ("calibration", "hessian", "gradient")
SECOND_ORDER = ("never", "optional", "always")
BUDGETS = ("sparsity", "bits")
MIN_BITS, MAX_BITS = 2, 8

# Modules whose import registers the built-in methods, in the order of the docs table and CLI choices; every
# other module of the quantizer package is imported after them, so a new quantizer is its own file in quant/.
_REGISTERING = (
    "trainlab.compress.prune",
    "trainlab.compress.structured",
    "trainlab.compress.quant.rtn",
    "trainlab.compress.quant.nupes",
    "trainlab.compress.quant.ptqtp",
    "trainlab.compress.quant.vptq",
    "trainlab.compress.quant.gwq",
    "trainlab.compress.quant.mixed",
    "trainlab.compress.allocate",
)
QUANTIZER_PACKAGE = "trainlab.compress.quant"


@dataclass(frozen=True)
class Hyperparameter:
    """A default and what is allowed: a closed numeric range ``[low, high]`` (for ``sequence``: a non-empty
    sequence of such numbers) or a tuple of ``choices``."""

    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    sequence: bool = False

    def allowed(self) -> str:
        if self.choices is not None:
            return f"one of {self.choices}"
        return ("a sequence of numbers" if self.sequence else "a number") + f" in [{self.low}, {self.high}]"

    def _number_ok(self, value: Any) -> bool:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return ok and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def check(self, name: str, value: Any) -> Any:
        if self.choices is not None:
            ok = value in self.choices
        elif self.sequence:
            ok = isinstance(value, Sequence) and len(value) > 0 and all(self._number_ok(v) for v in value)
        else:
            ok = self._number_ok(value)
        if not ok:
            raise ValueError(f"{name} must be {self.allowed()}, got {value!r}")
        return value


@dataclass(frozen=True)
class CompressorSpec:
    """``function`` takes the level by the keyword ``level`` and, by kind:

    * ``mask`` / ``nm``: ``function(weight, *, sparsity|pattern) -> bool mask`` (True = kept);
    * ``quantizer``: ``function(weight_2d, *, bits|column_bits, [group_size], [hessian], [gradient], **hp)`` ->
      a packed object with ``.dequantize(dtype)``; it gets ``hessian`` when ``second_order`` is "always" or
      second order is asked for, ``gradient`` when ``"gradient"`` is in ``needs``, ``group_size`` when
      ``grouped``;
    * ``structured``: ``function(model, *, sparsity, calibration) -> a new, smaller model``.
    """

    name: str
    paper: str
    summary: str
    kind: str
    level: str
    function: Callable[..., Any]
    needs: frozenset[str] = frozenset()
    second_order: str = "never"
    bits: tuple[int, ...] | None = None  # accepted bit-widths (None: MIN_BITS..MAX_BITS)
    grouped: bool = False
    hyperparameters: Mapping[str, Hyperparameter] = field(default_factory=dict)

    @property
    def fixed_width(self) -> bool:
        """One bit-width only: per-layer (mixed-precision) allocation cannot apply."""
        return self.bits is not None and len(self.bits) == 1

    def check_level(self, level: Any, where: str = "level") -> Any:
        """The level in canonical form (``bits=4.0`` -> 4); ValueError naming ``where`` when impossible."""
        if self.level == "sparsity":
            if isinstance(level, bool) or not isinstance(level, int | float) or not 0.0 <= level <= 1.0:
                raise ValueError(f"{where} of {self.name!r} is a sparsity: a number in [0, 1], got {level!r}")
            return float(level)
        if self.level == "pattern":
            n, m = parse_pattern(level)
            return f"{n}:{m}"
        if self.level == "bits":
            bits = check_whole_bits(level, f"{where} (bits) of {self.name!r}")
            allowed = self.bits or tuple(range(MIN_BITS, MAX_BITS + 1))
            if bits not in allowed:
                raise ValueError(f"{where} (bits) of {self.name!r} must be one of {allowed}, got {level!r}")
            return bits
        return check_column_bits(level, f"{where} (per-column bits) of {self.name!r}")

    def check_hyperparameters(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return _check_hyperparameters(f"compressor {self.name!r}", self.hyperparameters, values)


@dataclass(frozen=True)
class Allocation:
    """What every allocator is given besides its budget: the model (never modified), the layers it allocates
    over (the compressible layers minus the excluded ones), the compressor its plan names, the calibration
    batches, the user's ``loss(model, batch)`` (or None), whether second-order (GPTQ) measurements are wanted,
    the quantization group size, whether to show progress bars, and the user's ``output_fn(model, batch) ->
    tensor`` (or None: :func:`~.batches.output_of` reads tensors, ``logits``, ``last_hidden_state``)."""

    model: Any
    layers: Mapping[str, Any]
    compressor: str
    calibration: Sequence[Any] = ()
    loss: Callable[[Any, Any], Any] | None = None
    second_order: bool = False
    group_size: int | None = None
    progress: bool = False
    output_fn: Callable[[Any, Any], Any] | None = None  # the tensor calibrated measurements compare

    def require_calibration(self, allocator: str) -> None:
        if not self.calibration:
            raise ValueError(f"allocator {allocator!r} needs calibration batches (calibration=)")


@dataclass(frozen=True)
class AllocatorSpec:
    """``function(allocation: Allocation, budget, **hyperparameters) -> Plan`` spends the budget (``sparsity``:
    exactly ``round(s * N)`` of the layers' N weights removed; ``bits``: exactly ``bits * N`` bits) over
    ``allocation.layers``."""

    name: str
    paper: str
    summary: str
    budget: str
    function: Callable[..., Any]
    needs: frozenset[str] = frozenset()
    hyperparameters: Mapping[str, Hyperparameter] = field(default_factory=dict)
    per_column: bool = False  # the plan's levels are per-column bits (its compressor takes column_bits)

    def check_hyperparameters(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return _check_hyperparameters(f"allocator {self.name!r}", self.hyperparameters, values)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; N and M positive integers with N < M."""
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except (ValueError, AttributeError):
        raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
    return n, m


def check_whole_bits(bits: Any, name: str = "bits") -> int:
    """A whole number of bits in [2, 8]: ints, and floats that are whole (``4.0`` -> 4)."""
    if isinstance(bits, bool) or not isinstance(bits, int | float):
        raise ValueError(f"{name} must be a whole number of bits in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if isinstance(bits, float) and not bits.is_integer():
        raise ValueError(
            f"{name} must be a whole number of bits for a fixed-width quantizer, got {bits!r}; a fractional "
            "average needs a mixed-precision allocator (hawq, evopress, baq)"
        )
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be a whole number of bits in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return int(bits)


def check_column_bits(bits: Any, name: str = "column_bits") -> int | list[int]:
    """One whole bit-width (every column alike) or a non-empty list of per-column bits in [1, 8]."""
    if isinstance(bits, int | float) and not isinstance(bits, bool):
        return check_whole_bits(bits, name)
    values = bits.tolist() if hasattr(bits, "tolist") else bits
    if (
        not isinstance(values, Sequence)
        or not values
        or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= MAX_BITS for b in values)
    ):
        raise ValueError(f"{name} must be a whole bit-width or a list of integers in [1, {MAX_BITS}], got {bits!r}")
    return list(values)


def _check_hyperparameters(owner: str, declared: Mapping[str, Hyperparameter], values: Mapping[str, Any]) -> dict:
    unknown = sorted(set(values) - set(declared))
    if unknown:
        allowed = ", ".join(f"{k} ({h.allowed()}, default {h.default!r})" for k, h in declared.items()) or "none"
        raise ValueError(f"unknown hyperparameter(s) {unknown} for {owner}; allowed: {allowed}")
    return {k: declared[k].check(k, v) for k, v in values.items()}


_COMPRESSORS: dict[str, CompressorSpec] = {}
_ALLOCATORS: dict[tuple[str, str], AllocatorSpec] = {}
_loaded = _loading = False


def _frozen_needs(needs: Sequence[str]) -> frozenset[str]:
    bad = set(needs) - set(NEEDS)
    if bad:
        raise ValueError(f"needs must be among {NEEDS}, got {sorted(bad)}")
    return frozenset(needs)


def register_compressor(
    name: str,
    *,
    paper: str,
    summary: str,
    kind: str,
    level: str,
    needs: Sequence[str] = (),
    second_order: str = "never",
    bits: tuple[int, ...] | None = None,
    grouped: bool = False,
    hyperparameters: Mapping[str, Hyperparameter] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as compressor ``name`` (see :class:`CompressorSpec` for its signature)."""
    if kind not in KINDS or level not in LEVELS or second_order not in SECOND_ORDER:
        raise ValueError(f"kind/level/second_order must be in {KINDS} / {LEVELS} / {SECOND_ORDER}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _COMPRESSORS:
            raise ValueError(f"compressor {name!r} is already registered")
        _COMPRESSORS[name] = CompressorSpec(
            name, paper, summary, kind, level, fn, _frozen_needs(needs), second_order, bits, grouped,
            dict(hyperparameters or {}),
        )  # fmt: skip
        return fn

    return decorator


def register_allocator(
    name: str,
    *,
    paper: str,
    summary: str,
    budget: str,
    needs: Sequence[str] = (),
    hyperparameters: Mapping[str, Hyperparameter] | None = None,
    per_column: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as allocator ``name`` for a ``budget`` of "sparsity" or "bits" (one name
    may serve both budgets, e.g. ``uniform``)."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if (name, budget) in _ALLOCATORS:
            raise ValueError(f"allocator {name!r} for {budget} is already registered")
        _ALLOCATORS[name, budget] = AllocatorSpec(
            name, paper, summary, budget, fn, _frozen_needs(needs), dict(hyperparameters or {}), per_column
        )
        return fn

    return decorator


def _load() -> None:
    """Import the registering modules once; a lookup made while they import (a module reading the registry at
    import time) sees what is registered so far, and a failed import is raised again at the next lookup."""
    global _loaded, _loading
    if _loaded or _loading:
        return
    _loading = True
    try:
        for module in _REGISTERING:
            importlib.import_module(module)
        package = importlib.import_module(QUANTIZER_PACKAGE)
        for info in pkgutil.iter_modules(package.__path__, f"{QUANTIZER_PACKAGE}."):
            importlib.import_module(info.name)
        _loaded = True
    finally:
        _loading = False


def compressor_names(kind: str | None = None) -> list[str]:
    """Registered compressors (of one ``kind``), by kind then name: a fixed order, whichever module loaded first."""
    _load()
    specs = sorted(_COMPRESSORS.values(), key=lambda s: (KINDS.index(s.kind), s.name))
    return [s.name for s in specs if kind is None or s.kind == kind]


def get_compressor(name: str) -> CompressorSpec:
    _load()
    if name not in _COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; choose one of: {', '.join(compressor_names())}")
    return _COMPRESSORS[name]


def allocator_names(budget: str | None = None) -> list[str]:
    """Registered allocator names (for one ``budget``), sorted, each once."""
    _load()
    return sorted({n for n, b in _ALLOCATORS if budget is None or b == budget})


def get_allocator(name: str, budget: str) -> AllocatorSpec:
    _load()
    if (name, budget) not in _ALLOCATORS:
        raise ValueError(
            f"unknown allocator {name!r} for a {budget} budget; choose one of: {', '.join(allocator_names(budget))}"
        )
    return _ALLOCATORS[name, budget]


def allocator_specs() -> list[AllocatorSpec]:
    _load()
    return [_ALLOCATORS[key] for key in sorted(_ALLOCATORS)]
