"""Mixed-precision weight quantization: bit-widths chosen per layer (HAWQ, EvoPress) or per input column (BAQ)
under one average-bit budget, reusing the allocators of :mod:`trainlab.compress.allocate`.

* **HAWQ** ("Hessian AWare Quantization", Dong et al. 2019; trace variant HAWQ-V2): the sensitivity of layer
  ``i`` is the top eigenvalue ``|lambda_max|`` of the loss Hessian restricted to its weight (power iteration,
  :func:`trainlab.curvature.top_eigenvalues`) or the mean Hessian diagonal ``tr(H_i) / n_i`` (Hutchinson,
  :func:`trainlab.curvature.hutchinson_trace`). Bits are chosen by an exact multiple-choice knapsack
  (:func:`trainlab.compress.allocate.dp_allocate`, costs ``bits * numel``) minimising
  ``sum_i S_i * ||Q_b(W_i) - W_i||^2`` with the average bits over all weights *equal* to the target.
* **BAQ** ("Efficient Bit Allocation Quantization"): a first GPTQ pass at the reference bits gives each input
  column its loss ``L_j``; the convex optimum of ``sum_j L_j 2^(-2 (R_j - R))`` at fixed ``sum_j R_j`` is
  ``R_j = R + log2(L_j / GM(L)) / 2`` (reverse water-filling). The law is clipped to ``[min_bits, max_bits]``
  (re-centred by bisection so the mean stays ``R``), rounded to integers by largest remainder so the mean is
  exactly ``R``, and a second GPTQ pass quantizes each column with its own level count
  (:class:`ColumnBitsGrid`). The grid is BAQ's per-row asymmetric ``[min(w, 0), max(w, 0)]`` range.
* **EvoPress** over bit-widths: :func:`trainlab.compress.allocate.evolutionary_search` on a database of
  per-layer quantized weights at each candidate bit-width (RTN, or GPTQ with ``second_order``), fitness =
  KL(dense || quantized) on calibration inputs. Mutations are equal-cost switches, so they only trade bits
  between layers of the same size (EvoPress's ``group_rule='size'``): the average bits never change.

The registered allocators at the end of this module (``uniform``, ``hawq``, ``evopress``, ``baq``; called through
:func:`trainlab.compress.allocate_plan`) return a :class:`~trainlab.compress.plan.Plan` that
:func:`trainlab.compress.compress` applies; ``second_order`` makes HAWQ and EvoPress measure with GPTQ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from trainlab.compress import allocate as alloc
from trainlab.compress.batches import OutputFn, output_of
from trainlab.compress.bits import pack_codes, packed_bytes, unpack_codes
from trainlab.compress.calibrate import kl_to_dense, model_outputs, staged_kl_fitness
from trainlab.compress.formats import register_format
from trainlab.compress.plan import Plan, compressible_layers
from trainlab.compress.quant.gptq import DAMP, GPTQResult, collect_hessians, gptq, quantize_gptq
from trainlab.compress.quant.grids import MAX_BITS, MIN_BITS, UniformGrid, check_bits, check_group_size, check_weight
from trainlab.compress.registry import (
    Allocation,
    Hyperparameter,
    check_whole_bits,
    get_compressor,
    register_allocator,
    register_compressor,
)
from trainlab.curvature import hutchinson_trace, top_eigenvalues
from trainlab.layer_weights import is_transposed_linear, to_weight_layout, weight_matrix
from trainlab.runtime import evaluating

SENSITIVITIES = ("eigenvalue", "trace")
# pylm at 3 bits: with 8 among the choices HAWQ gives the lm_head 8 bits and loses to uniform RTN (3.359 vs 3.350
# bits/byte); with (2, 3, 4) it wins for RTN and GPTQ (3.339, 3.331).
DEFAULT_CHOICES = (2, 3, 4)
BAQ_TH = 2.0  # loss ~ 2^(-th R): th = 2 gives the 1/2 exponent of the bit law (the BAQ code uses 1.95)

LossOf = Callable[[nn.Module], torch.Tensor]  # model -> scalar loss


# ---------------------------------------------------------------------------------------------------------
# exact budgets


def _check_avg_bits(avg_bits: float, low: int = MIN_BITS, high: int = MAX_BITS) -> float:
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, int | float) or not low <= avg_bits <= high:
        raise ValueError(f"avg_bits must be a number in [{low}, {high}], got {avg_bits!r}")
    return avg_bits


def _check_choices(choices: Sequence[int]) -> list[int]:
    try:
        out = sorted({check_bits(b) for b in choices})
    except (TypeError, ValueError) as err:
        raise ValueError(f"choices must be bit-widths in [{MIN_BITS}, {MAX_BITS}], got {choices!r}") from err
    if not out:
        raise ValueError("choices must name at least one bit-width")
    return out


def _budget_units(sizes: Mapping[str, int], avg_bits: float) -> tuple[int, int]:
    """``(unit, budget)``: weights counted in units of ``gcd(sizes)``; ``budget = avg_bits * N / unit`` exactly."""
    unit = reduce(math.gcd, sizes.values())
    total = Fraction(avg_bits).limit_denominator(10**6) * sum(sizes.values()) / unit
    if total.denominator != 1:
        raise ValueError(
            f"avg_bits {avg_bits} times {sum(sizes.values())} weights is not a whole number of bits in steps of "
            f"{unit} weights (the gcd of the layer sizes); no per-layer allocation meets it exactly"
        )
    return unit, int(total)


def exact_allocate(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int) -> list[int]:
    """One level per layer minimising the summed error with the summed cost *equal* to ``budget`` (integer
    costs), by :func:`trainlab.compress.allocate.dp_allocate` (cost <= budget) on the errors minus ``M * cost``:
    with ``M`` above any error difference, spending one more unit always wins, so the optimum spends the whole
    budget when that is possible, and among full-budget choices it minimises the error. ValueError otherwise."""
    spread = sum(max(e) - min(e) for e in errors)
    penalty = 2.0 * spread + 1.0
    shifted = [
        [float(e) - penalty * c for e, c in zip(es, cs, strict=True)] for es, cs in zip(errors, costs, strict=True)
    ]
    picks = alloc.dp_allocate(costs, shifted, budget)
    spent = sum(cs[j] for cs, j in zip(costs, picks, strict=True))
    if spent != budget:
        raise ValueError(f"no choice of levels costs exactly the budget {budget} (the closest below is {spent})")
    return picks


def mean_bits(bits: Mapping[str, int | torch.Tensor], sizes: Mapping[str, int]) -> float:
    """Average bits per weight: per-layer ints, or per-column tensors (every row shares its column's bits)."""
    total = 0.0
    for name, b in bits.items():
        total += float(b.double().mean()) * sizes[name] if isinstance(b, torch.Tensor) else b * sizes[name]
    return total / sum(sizes[n] for n in bits)


# ---------------------------------------------------------------------------------------------------------
# HAWQ


def hawq_sensitivities(
    model: nn.Module,
    loss_fn: LossOf,
    layers: Mapping[str, nn.Module] | None = None,
    method: str = "eigenvalue",
    iters: int = 20,
    samples: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """HAWQ sensitivity of each layer's weight: ``|lambda_max|`` of the Hessian of ``loss_fn(model)`` restricted
    to that weight (``method='eigenvalue'``, ``iters`` power iterations, tol 1e-3 as in PyHessian), or the
    Hutchinson estimate of ``tr(H) / n`` with ``samples`` probes (``method='trace'``, HAWQ-V2). The magnitude
    is used because power iteration returns the eigenvalue of largest magnitude, which can be negative."""
    if method not in SENSITIVITIES:
        raise ValueError(f"method must be one of {SENSITIVITIES}, got {method!r}")
    layers = compressible_layers(model) if layers is None else layers
    out: dict[str, float] = {}
    with evaluating(model):
        for name, module in layers.items():
            weight = module.weight
            gen = torch.Generator().manual_seed(seed)
            if method == "eigenvalue":
                values, _ = top_eigenvalues(lambda: loss_fn(model), [weight], 1, iters, 1e-3, gen)
                out[name] = abs(float(values[0]))
            else:
                out[name] = (
                    abs(float(hutchinson_trace(lambda: loss_fn(model), [weight], samples, gen))) / weight.numel()
                )
    return out


def hawq_allocate(
    sensitivity: Mapping[str, float],
    perturbation: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, int],
    avg_bits: float,
) -> dict[str, int]:
    """Bits per layer minimising ``sum_i sensitivity[i] * perturbation[i][bits_i]`` with the average bits over
    all weights exactly ``avg_bits``; ``perturbation[i]`` maps each candidate bit-width to ``||Q_b(W_i) - W_i||^2``."""
    names = list(sizes)
    for label, d in (("sensitivity", sensitivity), ("perturbation", perturbation)):
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"{label} lacks layers {missing}")
    unit, budget = _budget_units(sizes, _check_avg_bits(avg_bits))
    options = [sorted(perturbation[n]) for n in names]
    costs = [[b * sizes[n] // unit for b in opts] for n, opts in zip(names, options, strict=True)]
    errors = [[sensitivity[n] * perturbation[n][b] for b in opts] for n, opts in zip(names, options, strict=True)]
    try:
        picks = exact_allocate(costs, errors, budget)
    except ValueError as err:
        raise ValueError(f"avg_bits {avg_bits} cannot be met exactly with these bit choices: {err}") from err
    return {n: opts[j] for n, opts, j in zip(names, options, picks, strict=True)}


# ---------------------------------------------------------------------------------------------------------
# BAQ


def baq_law(column_loss: torch.Tensor, avg_bits: float, th: float = BAQ_TH) -> torch.Tensor:
    """The unclipped, unrounded BAQ bits ``R + log2(L_j / GM(L)) / th`` (``th = 2``: the 1/2 exponent of
    ``2^R_j ~ (L_j / GM)^(1/2)``); its mean is exactly ``R``. Zero losses are floored at 1e-12 of the largest."""
    if not isinstance(column_loss, torch.Tensor) or column_loss.dim() != 1 or len(column_loss) == 0:
        raise ValueError(f"column_loss must be a non-empty 1-D tensor, got {column_loss!r}")
    if not th > 0:
        raise ValueError(f"th must be > 0, got {th!r}")
    loss = column_loss.double().clamp(min=0)
    top = float(loss.max())
    loss = loss.clamp(min=top * 1e-12 if top > 0 else 1.0)
    log_l = torch.log2(loss)
    return avg_bits + (log_l - log_l.mean()) / th


def baq_bits(
    column_loss: torch.Tensor,
    avg_bits: float,
    min_bits: int = 1,
    max_bits: int = MAX_BITS,
    th: float = BAQ_TH,
) -> torch.Tensor:
    """Integer bits per column (int64) from :func:`baq_law`, clipped to ``[min_bits, max_bits]`` and shifted so
    the clipped law still averages ``avg_bits`` (bisection on the shift), then rounded by largest remainder:
    the mean is exactly ``avg_bits`` (which needs ``avg_bits * cols`` to be a whole number). 1-bit columns have
    two levels (BAQ allows any level count; the integer bits here keep the columns packable)."""
    for label, b in (("min_bits", min_bits), ("max_bits", max_bits)):
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BITS:
            raise ValueError(f"{label} must be an integer in [1, {MAX_BITS}], got {b!r}")
    if min_bits > max_bits:
        raise ValueError(f"min_bits ({min_bits}) must be <= max_bits ({max_bits})")
    _check_avg_bits(avg_bits, min_bits, max_bits)
    law = baq_law(column_loss, avg_bits, th)
    cols = len(law)
    total = Fraction(avg_bits).limit_denominator(10**6) * cols
    if total.denominator != 1:
        raise ValueError(f"avg_bits {avg_bits} times {cols} columns is not a whole number of bits")
    target = int(total)
    lo, hi = -float(max_bits - min_bits) - 1.0, float(max_bits - min_bits) + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((law + mid).clamp(min_bits, max_bits).sum()) < target:
            lo = mid
        else:
            hi = mid
    x = (law + (lo + hi) / 2).clamp(min_bits, max_bits)
    bits = x.floor().long().clamp(min_bits, max_bits)
    left = target - int(bits.sum())
    frac = torch.where(bits < max_bits, x - bits, torch.full_like(x, -1.0))
    if left > 0:
        bits[torch.argsort(frac, descending=True, stable=True)[:left]] += 1
    elif left < 0:
        bits[torch.argsort(torch.where(bits > min_bits, x - bits, torch.full_like(x, 2.0)), stable=True)[:-left]] -= 1
    return bits


@dataclass
class _ColumnParams:
    low: torch.Tensor  # (rows, 1) min(w, 0) of the row (or group)
    high: torch.Tensor  # (rows, 1) max(w, 0)
    cursor: int  # index of the next column this group quantizes


class ColumnBitsGrid:
    """Per-row asymmetric uniform grid over ``[min(w, 0), max(w, 0)]`` (per row, or per row and group of
    ``group_size`` columns) with its own bit-width for each column: column ``j`` has ``2**bits[j]`` levels,
    ``scale = (max - min) / (2**bits[j] - 1)`` and ``zero = round(-min / scale)``. With equal bits it is
    :class:`..grids.UniformGrid` (asymmetric, ``scale_dtype=None``) exactly.

    It follows :func:`..gptq.gptq`'s grid protocol: ``gptq`` fits the groups in column order and quantizes the
    columns left to right, so the grid counts the columns it has fitted and each group's params count the
    columns they have quantized (one ``gptq`` call at a time per grid object)."""

    def __init__(self, bits: torch.Tensor | Sequence[int], group_size: int | None = None) -> None:
        bits = torch.as_tensor(bits)
        if bits.dim() != 1 or len(bits) == 0 or bits.is_floating_point() or bits.dtype == torch.bool:
            raise ValueError(f"bits must be a non-empty 1-D integer tensor (one entry per column), got {bits!r}")
        if int(bits.min()) < 1 or int(bits.max()) > MAX_BITS:
            raise ValueError(f"bits must lie in [1, {MAX_BITS}], got range [{int(bits.min())}, {int(bits.max())}]")
        self.bits = bits.long()
        self.group_size = check_group_size(group_size)
        self._fitted = 0

    def _maxq(self, cols: slice) -> torch.Tensor:
        return 2 ** self.bits[cols] - 1

    def fit(self, weight: torch.Tensor) -> _ColumnParams:
        w = check_weight(weight)
        start = self._fitted
        if self.group_size is None and w.shape[1] != len(self.bits):
            raise ValueError(f"weight has {w.shape[1]} columns but bits has {len(self.bits)} entries")
        if start + w.shape[1] > len(self.bits):
            raise ValueError(f"fitting columns {start}..{start + w.shape[1]} beyond the {len(self.bits)} of bits")
        self._fitted = (start + w.shape[1]) % len(self.bits)
        return _ColumnParams(w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0), start)

    @staticmethod
    def _scale_zero(
        low: torch.Tensor, high: torch.Tensor, maxq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maxq = maxq.to(low.dtype)
        span = high - low
        scale = torch.where(span > 0, span / maxq, torch.ones_like(span * maxq))
        return scale, torch.round(-low / scale).clamp(min=torch.zeros_like(maxq), max=maxq), maxq

    @classmethod
    def _round(cls, w: torch.Tensor, low: torch.Tensor, high: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
        scale, zero, maxq = cls._scale_zero(low, high, maxq)
        return (torch.clamp(torch.round(w / scale) + zero, min=torch.zeros_like(maxq), max=maxq) - zero) * scale

    def quantize_column(self, column: torch.Tensor, params: _ColumnParams) -> torch.Tensor:
        j = params.cursor
        params.cursor += 1
        return self._round(column, params.low, params.high, self._maxq(slice(j, j + 1)))

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest onto the grid (grid values, the weight's dtype)."""
        w = check_weight(weight)
        if w.shape[1] != len(self.bits):
            raise ValueError(f"weight has {w.shape[1]} columns but bits has {len(self.bits)} entries")
        step = self.group_size or w.shape[1]
        parts = []
        for i in range(0, w.shape[1], step):
            p = w[:, i : i + step]
            low, high = p.amin(1, keepdim=True).clamp(max=0), p.amax(1, keepdim=True).clamp(min=0)
            parts.append(self._round(p, low, high, self._maxq(slice(i, i + step))[None, :]))
        return torch.cat(parts, 1)

    def encode(self, weight: torch.Tensor, params: Sequence[_ColumnParams]) -> ColumnCodes:
        """Integer codes of a grid-valued ``weight`` (e.g. ``gptq(...).weight`` with ``gptq(...).params``, one
        entry per group in column order); :meth:`ColumnCodes.dequantize` gives ``weight`` back exactly."""
        w = check_weight(weight)
        step = self.group_size or w.shape[1]
        if len(params) != -(-w.shape[1] // step):
            raise ValueError(f"params must have one entry per group ({-(-w.shape[1] // step)}), got {len(params)}")
        codes = []
        for k, i in enumerate(range(0, w.shape[1], step)):
            p = params[k]
            scale, zero, maxq = self._scale_zero(p.low, p.high, self._maxq(slice(i, i + step))[None, :])
            codes.append(
                torch.clamp(torch.round(w[:, i : i + step] / scale) + zero, min=torch.zeros_like(maxq), max=maxq)
            )
        return ColumnCodes(
            torch.cat(codes, 1).to(torch.uint8),
            torch.cat([p.low for p in params], 1),
            torch.cat([p.high for p in params], 1),
            self.bits.clone(),
            self.group_size,
        )


@register_format("column-bits")
@dataclass(frozen=True)
class ColumnCodes:
    """Codes (uint8 ``(rows, cols)``) of a :class:`ColumnBitsGrid`: ``low``/``high`` per row and group
    (``(rows, groups)``), ``bits`` per column; column ``j``'s scale and zero point follow from them.

    Stored as ``bits`` (uint8 per column), ``low`` and ``high`` in their own dtype (exact, so the file
    dequantizes identically) and, per bit-width ``b`` present, ``codes{b}``: the codes of the columns with ``b``
    bits, packed at ``b`` bits."""

    codes: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    bits: torch.Tensor
    group_size: int | None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The grid values, computed in the dtype of ``low``/``high``, then cast to ``dtype`` if given."""
        step = self.group_size or self.codes.shape[1]
        parts = []
        for k, i in enumerate(range(0, self.codes.shape[1], step)):
            maxq = (2 ** self.bits[i : i + step] - 1)[None, :]
            scale, zero, _ = ColumnBitsGrid._scale_zero(self.low[:, k : k + 1], self.high[:, k : k + 1], maxq)
            parts.append((self.codes[:, i : i + step].to(scale.dtype) - zero) * scale)
        out = torch.cat(parts, 1)
        return out if dtype is None else out.to(dtype)

    def _widths(self) -> list[int]:
        return [int(b) for b in torch.unique(self.bits).tolist()]

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {
            f"{prefix}bits": self.bits.to(torch.uint8),
            f"{prefix}low": self.low.detach().contiguous(),
            f"{prefix}high": self.high.detach().contiguous(),
        }
        for b in self._widths():
            out[f"{prefix}codes{b}"] = pack_codes(self.codes[:, self.bits == b].contiguous(), b)
        return out

    def metadata(self) -> dict[str, Any]:
        return {"shape": list(self.codes.shape), "group_size": self.group_size}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str, metadata: Mapping[str, Any]) -> ColumnCodes:
        rows, cols = metadata["shape"]
        bits = tensors[f"{prefix}bits"].long()
        codes = torch.zeros(rows, cols, dtype=torch.uint8)
        for b in torch.unique(bits).tolist():
            columns = bits == b
            packed = tensors[f"{prefix}codes{b}"]
            codes[:, columns] = unpack_codes(packed, int(b), rows * int(columns.sum())).reshape(rows, -1)
        return cls(codes, tensors[f"{prefix}low"], tensors[f"{prefix}high"], bits, metadata["group_size"])

    def nbytes(self) -> int:
        """Each column's codes packed at its own width, one byte of bits per column, and the per-row ranges."""
        codes = sum(packed_bytes(self.codes.shape[0] * int((self.bits == b).sum()), b) for b in self._widths())
        return codes + self.bits.numel() + self.low.nbytes + self.high.nbytes

    @property
    def payload_bits(self) -> int:
        """Bits of the codes alone when each column is packed at its own width: ``rows * sum(bits)``."""
        return self.codes.shape[0] * int(self.bits.sum())


@dataclass(frozen=True)
class BAQResult:
    """``weight``: grid values; ``bits``: per-column bit-widths (int64); ``law``: the unrounded bit law;
    ``column_loss``: pass-1 GPTQ losses ``L_j``; ``mean_bits``: ``bits.mean()`` (exactly the target);
    ``codes``: the integer codes and per-row ranges (:class:`ColumnCodes`, dequantizes to ``weight`` exactly)."""

    weight: torch.Tensor
    bits: torch.Tensor
    law: torch.Tensor
    column_loss: torch.Tensor
    mean_bits: float
    codes: ColumnCodes


def baq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    avg_bits: float,
    *,
    min_bits: int = 1,
    max_bits: int = MAX_BITS,
    th: float = BAQ_TH,
    group_size: int | None = None,
    damp: float = DAMP,
    block_size: int = 128,
) -> BAQResult:
    """BAQ on one linear weight (``(rows, cols)``, Hessian ``(cols, cols)`` e.g. from ``collect_hessians``): pass 1
    is GPTQ at ``round(avg_bits)`` bits on :class:`ColumnBitsGrid`, pass 2 GPTQ with the per-column bits of
    :func:`baq_bits`."""
    check_weight(weight)
    ref = min(max(round(_check_avg_bits(avg_bits, min_bits, max_bits)), min_bits), max_bits)
    cols = weight.shape[1]
    first: GPTQResult = gptq(
        weight, hessian, ColumnBitsGrid(torch.full((cols,), ref), group_size), damp=damp, block_size=block_size
    )
    law = baq_law(first.column_loss, avg_bits, th)
    bits = baq_bits(first.column_loss, avg_bits, min_bits, max_bits, th)
    grid = ColumnBitsGrid(bits, group_size)
    second = gptq(weight, hessian, grid, damp=damp, block_size=block_size)
    codes = grid.encode(second.weight, second.params)
    return BAQResult(second.weight, bits, law, first.column_loss, float(bits.double().mean()), codes)


# ---------------------------------------------------------------------------------------------------------
# EvoPress over bit-widths


def evopress_bits(
    sizes: Mapping[str, int],
    avg_bits: float,
    fitness: Callable[[dict[str, int], int, int], float],
    choices: Sequence[int] = DEFAULT_CHOICES,
    start: Mapping[str, int] | None = None,
    generations: int = 50,
    offspring: int = 16,
    survivors: Sequence[int] = (4, 1),
    max_step: int = 1,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """EvoPress search over per-layer bit-widths from ``start`` (default: every layer at ``avg_bits``, which must
    then be one of ``choices``); ``fitness(bits per layer, stage, generation)`` is the end-to-end loss. Every
    mutation is an equal-cost switch, so the result's average bits equal the start's exactly."""
    opts = _check_choices(choices)
    _check_avg_bits(avg_bits)
    names = list(sizes)
    if start is None:
        if avg_bits not in opts:
            raise ValueError(f"avg_bits {avg_bits} is not one of choices {opts}; pass a start allocation")
        start = dict.fromkeys(names, int(avg_bits))
    bad = {n: start.get(n) for n in names if start.get(n) not in opts}
    if bad:
        raise ValueError(f"start bits must be among choices {opts}; got {bad}")
    got = mean_bits(start, sizes)
    if abs(got - avg_bits) > 1e-9:
        raise ValueError(f"start averages {got} bits, not avg_bits {avg_bits}")
    unit = reduce(math.gcd, sizes.values())
    costs = [[b * sizes[n] // unit for b in opts] for n in names]

    def indexed(config: list[int], stage: int, generation: int) -> float:
        return fitness({n: opts[j] for n, j in zip(names, config, strict=True)}, stage, generation)

    start_idx = [opts.index(start[n]) for n in names]
    best = alloc.evolutionary_search(
        costs, start_idx, indexed, generations, offspring, survivors, seed, max_step, progress
    )
    return {n: opts[j] for n, j in zip(names, best, strict=True)}


# ---------------------------------------------------------------------------------------------------------
# models


def bit_database(
    model: nn.Module,
    choices: Sequence[int],
    *,
    hessians: Mapping[str, torch.Tensor] | None = None,
    symmetric: bool = True,
    group_size: int | None = None,
    layers: Mapping[str, nn.Module] | None = None,
) -> dict[str, dict[int, torch.Tensor]]:
    """Dequantized weight of every compressible layer at each bit-width in ``choices``: RTN on
    :class:`UniformGrid` (conv kernels flattened to ``(out, -1)``), or GPTQ with ``hessians`` (Linear only)."""
    layers = compressible_layers(model) if layers is None else layers
    db: dict[str, dict[int, torch.Tensor]] = {}
    for name, module in layers.items():
        w = weight_matrix(module).detach()
        db[name] = {}
        for b in _check_choices(choices):
            grid = UniformGrid(b, symmetric, group_size)
            if hessians is None:
                q = grid.quantize(w).dequantize(w.dtype)
            else:
                if name not in hessians:
                    raise ValueError(f"hessians lacks layer {name!r} (second-order quantization needs nn.Linear)")
                q = quantize_gptq(w, hessians[name], grid).dequantize(w.dtype)
            db[name][b] = to_weight_layout(module, q)
    return db


def kl_loss(model: nn.Module, inputs: Sequence[torch.Tensor], output_fn: OutputFn | None = None) -> LossOf:
    """``m -> mean KL(model(x) || m(x))`` over ``inputs`` (the dense outputs are computed now): at the dense
    weights its gradient is 0 and its Hessian is the (PSD) Fisher/Gauss-Newton matrix of the outputs."""
    dense = [d.detach() for d in model_outputs(model, inputs, output_fn)]

    def loss(m: nn.Module) -> torch.Tensor:
        return sum(kl_to_dense(d, output_of(m, x, output_fn)) for d, x in zip(dense, inputs, strict=True)) / len(inputs)

    return loss


# ---------------------------------------------------------------------------------------------------------
# registered: the BAQ quantizer (per-column bits) and the bit allocators (a model and average bits in, a Plan out)

HAWQ_PAPER = "HAWQ: Hessian AWare Quantization of Neural Networks with Mixed-Precision"
BAQ_PAPER = "BAQ: Efficient Bit Allocation Quantization for Large Language Models"
EVOPRESS_PAPER = "EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary Search"
_CHOICES = Hyperparameter(DEFAULT_CHOICES, low=MIN_BITS, high=MAX_BITS, sequence=True)


@register_compressor(
    "baq",
    paper=BAQ_PAPER,
    summary="GPTQ on BAQ's asymmetric per-row grid, each input column at its own bit-width (from the baq allocator)",
    kind="quantizer",
    level="column_bits",
    needs=("calibration", "hessian"),
    second_order="always",
    grouped=True,
)
def baq(
    weight: torch.Tensor, *, column_bits: int | Sequence[int], hessian: torch.Tensor, group_size: int | None = None
) -> ColumnCodes:
    """BAQ's second pass: GPTQ on :class:`ColumnBitsGrid` with ``column_bits`` (one int: every column alike)."""
    cols = weight.shape[1]
    bits = torch.full((cols,), column_bits) if isinstance(column_bits, int) else torch.as_tensor(column_bits)
    if bits.shape != (cols,):
        raise ValueError(f"column_bits must hold one bit-width per input column ({cols}), got {len(bits)}")
    grid = ColumnBitsGrid(bits, group_size)
    result = gptq(weight, hessian, grid)
    return grid.encode(result.weight, result.params)


def _per_layer_quantizer(allocation: Allocation, allocator: str) -> None:
    spec = get_compressor(allocation.compressor)
    if spec.kind != "quantizer" or spec.level != "bits":
        raise ValueError(f"allocator {allocator!r} assigns bit-widths to a quantizer, not {allocation.compressor!r}")
    if allocator != "uniform" and spec.fixed_width:
        raise ValueError(
            f"allocator {allocator!r} assigns per-layer bit-widths; {allocation.compressor!r} has the fixed width "
            f"{spec.bits[0]}"
        )


def _user_loss(allocation: Allocation, batches: int) -> LossOf | None:
    """``m -> mean loss(m, batch)`` over the first ``batches`` calibration batches, when the user gave a loss."""
    if allocation.loss is None:
        return None
    picked = list(allocation.calibration)[: max(1, batches)]
    return lambda m: sum(allocation.loss(m, b) for b in picked) / len(picked)


def _measured(
    allocation: Allocation, choices: Sequence[int]
) -> tuple[dict[str, dict[int, torch.Tensor]], dict[str, dict[int, float]], dict[str, int]]:
    """The quantized weight of every layer at each of ``choices`` bits (RTN, or GPTQ with second order, on the
    symmetric uniform grid of ``rtn``), its squared perturbation ``||Q_b(W) - W||^2`` and the layer sizes."""
    layers = allocation.layers
    hessians = None
    if allocation.second_order:
        allocation.require_calibration("second_order")
        hessians = collect_hessians(allocation.model, allocation.calibration, layers)
    db = bit_database(allocation.model, choices, hessians=hessians, group_size=allocation.group_size, layers=layers)
    pert = {n: {b: float((q - layers[n].weight.detach()).square().sum()) for b, q in db[n].items()} for n in db}
    return db, pert, {n: m.weight.numel() for n, m in layers.items()}


@register_allocator("uniform", paper="(baseline)", summary="every layer at the same whole bit-width", budget="bits")
def uniform_bits(allocation: Allocation, bits: float) -> Plan:
    _per_layer_quantizer(allocation, "uniform")
    return Plan.from_levels(allocation.compressor, dict.fromkeys(allocation.layers, check_whole_bits(bits, "bits")))


@register_allocator(
    "hawq",
    paper=HAWQ_PAPER,
    summary="per-layer Hessian sensitivity (top eigenvalue or trace) times quantization error, exact knapsack",
    budget="bits",
    needs=("calibration",),
    hyperparameters={
        "choices": _CHOICES,
        "sensitivity": Hyperparameter("eigenvalue", choices=SENSITIVITIES),
        "hessian_batches": Hyperparameter(1, low=1, high=10_000),
        "seed": Hyperparameter(0, low=0, high=2**63 - 1),
    },
)
def hawq_bits(
    allocation: Allocation,
    bits: float,
    choices: Sequence[int] = DEFAULT_CHOICES,
    sensitivity: str = "eigenvalue",
    hessian_batches: int = 1,
    seed: int = 0,
) -> Plan:
    """Sensitivities of the user's loss (default: the KL to the dense outputs) on the first ``hessian_batches``
    calibration batches; the exact knapsack of :func:`hawq_allocate` over ``choices``."""
    _per_layer_quantizer(allocation, "hawq")
    allocation.require_calibration("hawq")
    _check_avg_bits(bits)
    _, pert, sizes = _measured(allocation, _check_choices(choices))
    loss_fn = _user_loss(allocation, hessian_batches)
    if loss_fn is None:
        loss_fn = kl_loss(
            allocation.model, list(allocation.calibration)[: max(1, hessian_batches)], allocation.output_fn
        )
    sens = hawq_sensitivities(allocation.model, loss_fn, allocation.layers, sensitivity, seed=seed)
    return Plan.from_levels(allocation.compressor, hawq_allocate(sens, pert, sizes, bits))


@register_allocator(
    "evopress",
    paper=EVOPRESS_PAPER,
    summary="evolutionary search over per-layer bit-widths, KL to the dense model on calibration data",
    budget="bits",
    needs=("calibration",),
    hyperparameters={
        "choices": _CHOICES,
        "generations": Hyperparameter(50, low=0, high=100_000),
        "offspring": Hyperparameter(16, low=1, high=10_000),
        "survivors": Hyperparameter((4, 1), low=1, high=10_000, sequence=True),
        "max_step": Hyperparameter(1, low=1, high=10_000),
        "seed": Hyperparameter(0, low=0, high=2**63 - 1),
    },
)
def evopress_bits_plan(
    allocation: Allocation,
    bits: float,
    choices: Sequence[int] = DEFAULT_CHOICES,
    generations: int = 50,
    seed: int = 0,
    **search: Any,
) -> Plan:
    """Start: every layer at ``bits`` when that is a choice, else the exact DP on the weight perturbation;
    fitness: :func:`~trainlab.compress.calibrate.staged_kl_fitness` on the calibration batches."""
    _per_layer_quantizer(allocation, "evopress")
    allocation.require_calibration("evopress")
    _check_avg_bits(bits)
    choices = _check_choices(choices)
    db, pert, sizes = _measured(allocation, choices)
    start = None if bits in choices else hawq_allocate(dict.fromkeys(sizes, 1.0), pert, sizes, bits)
    fitness = staged_kl_fitness(
        allocation.model, allocation.calibration, lambda name, b: db[name][b], allocation.output_fn
    )
    bar = tqdm(total=generations, desc="evopress bits", disable=not allocation.progress, leave=False)
    picked = evopress_bits(
        sizes, bits, fitness, choices, start, generations=generations, seed=seed, progress=bar.update, **search
    )
    bar.close()
    return Plan.from_levels(allocation.compressor, picked)


@register_allocator(
    "baq",
    paper=BAQ_PAPER,
    summary="per-input-column bits from GPTQ column losses (closed-form convex law), exact average per layer",
    budget="bits",
    needs=("calibration", "hessian"),
    per_column=True,
    hyperparameters={
        "min_bits": Hyperparameter(1, low=1, high=MAX_BITS),
        "max_bits": Hyperparameter(MAX_BITS, low=1, high=MAX_BITS),
        "th": Hyperparameter(BAQ_TH, low=1e-6, high=100.0),
    },
)
def baq_plan(allocation: Allocation, bits: float, **options: Any) -> Plan:
    """BAQ's first pass (GPTQ at the rounded average on the per-column grid) gives each column its loss, the
    bit law turns the losses into per-column bits averaging ``bits`` in every layer; the plan's ``baq`` rules
    run the second pass."""
    allocation.require_calibration("baq")
    if allocation.compressor != "baq":
        raise ValueError(f"allocator 'baq' quantizes with its own per-column grid (compressor 'baq'), not "
                         f"{allocation.compressor!r}")  # fmt: skip
    convs = [k for k, m in allocation.layers.items() if not (isinstance(m, nn.Linear) or is_transposed_linear(m))]
    if convs:
        raise ValueError(
            f"BAQ supports Linear and Hugging Face Conv1D layers only; got convolutions {convs} (exclude them)"
        )
    min_bits, max_bits = options.get("min_bits", 1), options.get("max_bits", MAX_BITS)
    th = options.get("th", BAQ_TH)
    ref = min(max(round(_check_avg_bits(bits, min_bits, max_bits)), min_bits), max_bits)
    hessians = collect_hessians(allocation.model, allocation.calibration, allocation.layers)
    levels = {}
    for name, module in tqdm(allocation.layers.items(), desc="baq", disable=not allocation.progress, leave=False):
        w = weight_matrix(module).detach()
        first = gptq(w, hessians[name], ColumnBitsGrid(torch.full((w.shape[1],), ref), allocation.group_size))
        levels[name] = baq_bits(first.column_loss, bits, min_bits, max_bits, th).tolist()
    return Plan.from_levels("baq", levels)
