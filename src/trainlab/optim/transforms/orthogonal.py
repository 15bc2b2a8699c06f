"""Orthogonalized and norm-controlled updates: Muon, AuON and ⊥Grad (OrthoGrad).

- `newton_schulz`: Keller Jordan's quintic Newton–Schulz iteration, which maps a matrix to a nearby
  semi-orthogonal one (singular values pushed into roughly [0.7, 1.2]) with matrix products only.
- Chain steps that orthogonal methods share (HeavyBall's chainable functions are the model):
  `ema_momentum` (muon.py's EMA/Nesterov momentum), `orthogonalize_newton_schulz`, `scale_by_shape`
  (``max(1, rows/cols)^½``) and `normalize_cosh_brake` (AuON's Frobenius normalization and cosh brake).
- `scale_by_muon` = ema_momentum → orthogonalize_newton_schulz → scale_by_shape (KellerJordan/Muon).
- `scale_by_auon` = ema_momentum → normalize_cosh_brake → scale_by_shape (ryyzn9/AuON): linear time, no
  semi-orthogonal matrix.
- `orthogonalize_gradient`: ⊥Grad, which removes the gradient's component along the weight so the
  optimizer cannot lower the loss by merely scaling the weights (Prieto et al., "Grokking at the Edge of
  Numerical Stability").
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from trainlab.optim.sharding import all_reduce_sum, gather_whole, is_sharded, like, local, reshard
from trainlab.optim.transform import Chain, GradientTransform, Scratch, State

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _ns_dtype(x: Tensor) -> torch.dtype:
    """Newton–Schulz precision: bfloat16 on accelerators (as in muon.py, where it is fast and stable),
    float32 on the CPU (bfloat16 matmuls are about 2x faster there only on CPUs with bf16 dot products,
    AVX512-BF16 or AMX, and many times slower elsewhere), float64 kept."""
    if x.dtype == torch.float64:
        return torch.float64
    return torch.float32 if x.device.type == "cpu" else torch.bfloat16


def _ns_loop(x: Tensor, steps: int) -> Tensor:
    """The iteration on a normalized wide batch ``x`` (what :func:`newton_schulz` compiles): the same three
    products as the eager loop, written without ``out=`` buffers so that ``torch.compile`` can trace it."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a, alpha=1.0)
    return x


# (dtype, device, steps, batch of one) -> the compiled iteration, compiled with dynamic shapes (one graph for
# every matrix shape). Each key compiles its own copy of _ns_loop's code: torch.compile keeps its cache and its
# recompile limit per code object, so keys never evict or exhaust one another.
_COMPILED: dict[tuple, Callable[[Tensor, int], Tensor]] = {}
# the same keys -> why compiling failed; those calls run eagerly (warned once per key).
NS_COMPILE_FALLBACKS: dict[tuple, str] = {}


def _fresh_loop(key: tuple) -> Callable[[Tensor, int], Tensor]:
    name = f"_ns_loop_{len(_COMPILED)}"
    code = _ns_loop.__code__.replace(co_name=name, co_qualname=name)
    return torch.compile(types.FunctionType(code, _ns_loop.__globals__, name), dynamic=True, fullgraph=True)


def _compiled_loop(x: Tensor, steps: int) -> Tensor | None:
    """The compiled iteration's result, or None (the reason in :data:`NS_COMPILE_FALLBACKS`) if it cannot
    compile. One-row matrices run eagerly (None): inductor turns a product with a size-1 dimension into an
    elementwise reduction, which rounds differently from the eager matmul."""
    if x.size(1) == 1:
        return None
    key = (x.dtype, x.device.type, steps, x.size(0) == 1)
    if key in NS_COMPILE_FALLBACKS:
        return None
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = _fresh_loop(key)
    try:
        return fn(x, steps)
    except Exception as err:  # no C compiler, an unsupported backend, ...: run eagerly and say why
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        NS_COMPILE_FALLBACKS[key] = reason
        _COMPILED.pop(key, None)
        warnings.warn(f"Newton-Schulz in {key[0]} on {key[1]} runs eagerly: torch.compile failed ({reason})",
                      RuntimeWarning, stacklevel=3)  # fmt: skip
        return None


def newton_schulz(
    g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None, compile: bool = False
) -> Tensor:
    """Approximately orthogonalize ``g`` (shape ``(..., rows, cols)``; leading dims are a batch).

    Each matrix is divided by its Frobenius norm (so its spectral norm is at most 1), transposed to be
    wide (so ``X Xᵀ`` is the smaller Gram matrix), then iterated ``X ← aX + (bA + cA²)X`` with
    ``A = X Xᵀ``. The result has ``g``'s dtype. ``dtype`` is the precision of the iteration (default:
    see `_ns_dtype`).

    Each iteration is three (batched) matrix products into buffers allocated once: ``A = X Xᵀ``,
    ``B = bA + cA·A`` and ``X' = aX + B·X``, the scalings folded into the products (``baddbmm``) instead
    of five extra elementwise passes and as many temporaries.

    ``compile=True`` runs the iteration through ``torch.compile`` (compiled on first use with dynamic shapes,
    one compiled function per dtype, device, step count and batch-of-one flag, so new matrix shapes do not
    recompile); it equals the eager iteration bitwise (the same matmul kernels). Where compiling fails the
    iteration runs eagerly, with a RuntimeWarning and the reason in :data:`NS_COMPILE_FALLBACKS`.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    a, b, c = NS_COEFFICIENTS
    tall = g.size(-2) > g.size(-1)
    x = (g.mT if tall else g).to(dtype or _ns_dtype(g), memory_format=torch.contiguous_format, copy=True)
    x.div_(torch.linalg.matrix_norm(x, keepdim=True) + eps)
    batch_shape = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])
    done = _compiled_loop(x, steps) if compile else None
    if done is not None:
        x = done.reshape(*batch_shape, *done.shape[-2:])
        return (x.mT if tall else x).to(g.dtype)
    gram = x.new_empty(x.size(0), x.size(1), x.size(1))
    poly = torch.empty_like(gram)
    nxt = torch.empty_like(x)
    for _ in range(steps):
        torch.bmm(x, x.mT, out=gram)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)
        torch.baddbmm(x, poly, x, beta=a, alpha=1.0, out=nxt)
        x, nxt = nxt, x
    x = x.reshape(*batch_shape, *x.shape[-2:])
    if tall:
        x = x.mT
    return x.to(g.dtype)


def _as_matrices(updates: list[Tensor], transform: str) -> list[Tensor]:
    """View each update as a matrix ``(out, -1)``: conv filters are flattened as in muon.py."""
    for u in updates:
        if u.ndim < 2:
            raise ValueError(
                f"{transform} needs parameters with 2+ dimensions, got shape {tuple(u.shape)}; route "
                "vectors (biases, norm gains) to another chain, e.g. with trainlab.optim.matrices_to"
            )
    return [u.reshape(u.size(0), -1) for u in updates]


def _shape_scale(m: Tensor) -> float:
    # max(1, rows/cols)^0.5 on the (flattened) matrix. muon.py uses the last two dims of the unflattened
    # tensor, which for a conv filter are its kernel dims; the flattened matrix is what is orthogonalized.
    return max(1.0, m.size(0) / m.size(1)) ** 0.5


class EmaMomentum(GradientTransform):
    """Muon's momentum: ``B ← βB + (1−β)G`` from B = 0; returns ``(1−β)G + βB`` (Nesterov) or ``B``.

    The EMA form of muon.py (``buf.lerp_(grad, 1 − β)``, then ``grad.lerp_(buf, β)``), not torch.optim.SGD's
    ``B ← βB + G`` (that is `trace_momentum`).
    """

    name = "ema_momentum"
    per_parameter = True
    hyperparameters = {"momentum": 0.95, "nesterov": True}

    def init(self, param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
        return {"momentum_buffer": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        beta = group["momentum"]
        bufs = state["momentum_buffer"]
        torch._foreach_lerp_(bufs, updates, 1 - beta)
        if group["nesterov"]:
            return Scratch(torch._foreach_lerp(updates, bufs, beta)), state
        return list(bufs), state  # the state itself: the next transform must not write into it


class OrthogonalizeNewtonSchulz(GradientTransform):
    """Each update, viewed as a matrix ``(out, -1)``, replaced by `newton_schulz` of it.

    ``ns_steps`` iterations in ``ns_dtype`` (None: `_ns_dtype`'s choice, float32 on the CPU and bfloat16
    on accelerators; torch.bfloat16 is muon.py's precision and halves the CPU step time on CPUs with bf16
    dot products, AVX512-BF16 or AMX). Matrices of one shape are orthogonalized as one batched matmul, so
    this transform is not per-parameter. ``ns_compile``: the iteration through ``torch.compile``
    (:func:`newton_schulz`'s ``compile``; eager where compiling fails, with the reason).
    """

    name = "orthogonalize_newton_schulz"
    hyperparameters = {"ns_steps": 5, "ns_dtype": None, "ns_compile": False}

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        # FSDP2: one explicit all-gather per matrix, then every rank orthogonalizes whole matrices locally.
        whole, layouts = gather_whole(updates)
        mats = _as_matrices(whole, self.name)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, m in enumerate(mats):
            by_shape.setdefault(tuple(m.shape), []).append(i)
        out: list[Tensor] = [torch.empty(0)] * len(mats)
        for idx in by_shape.values():
            stacked = torch.stack([mats[i] for i in idx])
            compile = group.get("ns_compile", False)
            ortho = newton_schulz(stacked, group["ns_steps"], dtype=group["ns_dtype"], compile=compile)
            for i, o in zip(idx, ortho.unbind(0), strict=True):
                out[i] = reshard(o.reshape(whole[i].shape), layouts[i])
        return Scratch(out), state


class ScaleByShape(GradientTransform):
    """Multiply each update by ``max(1, rows/cols)^½`` of its ``(out, -1)`` view (muon.py's shape factor)."""

    name = "scale_by_shape"
    per_parameter = True

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        scales = [_shape_scale(m) for m in _as_matrices(updates, self.name)]
        if isinstance(updates, Scratch):
            torch._foreach_mul_(updates, scales)
            return updates, state
        return Scratch(torch._foreach_mul(updates, scales)), state


class NormalizeCoshBrake(GradientTransform):
    """AuON's normalization: ``X = U/(‖U‖_F + 1e-7)``, then ``X / sqrt(mean(cosh(γX)²))``.

    This is the normalized form of the paper and of the c87b862 training script, so ‖X‖_F ≈ 1 (a Frobenius
    trust region). The packaged ``AuON.step`` (bba2e82) divides the *unnormalized* momentum by the cosh
    factor instead, which makes its update ≈ the raw momentum; we do not follow it.
    """

    name = "normalize_cosh_brake"
    per_parameter = True
    hyperparameters = {"gamma": 1.5}

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        gamma = group["gamma"]
        _as_matrices(updates, self.name)
        work = [u if u.dtype == torch.float64 else u.float() for u in updates]  # cosh sums overflow in fp16
        norms = torch._foreach_add(torch._foreach_norm(work), 1e-7)
        x = torch._foreach_div(work, norms)
        # mean(cosh(γx)²) = (Σ e^{2γx} + Σ e^{-2γx} + 2n) / 4n, and a sum of positive terms is an ℓ1 norm,
        # so the whole brake is foreach kernels (|x| ≤ 1 keeps the exponentials far from overflow).
        two_gamma_x = torch._foreach_mul(x, 2 * gamma)
        pos = torch._foreach_norm(torch._foreach_exp(two_gamma_x), 1)
        neg = torch._foreach_norm(torch._foreach_exp(torch._foreach_neg(two_gamma_x)), 1)
        sizes = [float(u.numel()) for u in work]
        mean_cosh_sq = torch._foreach_add(pos, neg)
        torch._foreach_add_(mean_cosh_sq, [2 * n for n in sizes])
        torch._foreach_div_(mean_cosh_sq, [4 * n for n in sizes])
        torch._foreach_mul_(x, torch._foreach_reciprocal(torch._foreach_sqrt(mean_cosh_sq)))
        return Scratch([xi.to(u.dtype) for xi, u in zip(x, updates, strict=True)]), state


class ScaleByMuon(Chain):
    """Muon's direction as three chain steps: `EmaMomentum` (Nesterov), `OrthogonalizeNewtonSchulz`,
    `ScaleByShape` (KellerJordan/Muon, muon.py)."""

    name = "scale_by_muon"

    def __init__(self) -> None:
        super().__init__(EmaMomentum(), OrthogonalizeNewtonSchulz(), ScaleByShape())


class ScaleByAuON(Chain):
    """AuON's direction as three chain steps: `EmaMomentum` (Nesterov), `NormalizeCoshBrake`, `ScaleByShape`,
    so ‖update‖_F ≈ max(1, rows/cols)^½ (ryyzn9/AuON)."""

    name = "scale_by_auon"

    def __init__(self) -> None:
        super().__init__(EmaMomentum(), NormalizeCoshBrake(), ScaleByShape())


class OrthogonalizeGradient(GradientTransform):
    """⊥Grad: ``g⊥ = g − (w·g)/(w·w + 1e-30) w`` per whole tensor, rescaled to ‖g‖ (official orthograd.py).

    Stateless. A zero weight tensor leaves its gradient unchanged; do not zero-initialize the weights
    you want projected.

    Under FSDP2 (DTensor parameters) nothing is gathered: each rank computes the dot products and squared
    norms of its shards, summed over the ranks in one all-reduce, projects its shards, and sums their squared
    norms in a second all-reduce: two all-reduces per step for all the tensors of a call.
    """

    name = "orthogonalize_gradient"
    per_parameter = True

    def update(
        self, updates: list[Tensor], state: State, params: list[Tensor], group: Mapping[str, Any]
    ) -> tuple[list[Tensor], State]:
        if params and is_sharded(params[0]):
            return Scratch(_orthogonalize_sharded(updates, params)), state
        # One dot-product kernel per tensor: torch has no foreach reduction to a signed sum.
        dots = [torch.vdot(w.reshape(-1), g.reshape(-1)) for w, g in zip(params, updates, strict=True)]
        w_norms = torch._foreach_norm(params)
        w_sq = torch._foreach_add(torch._foreach_mul(w_norms, w_norms), 1e-30)
        coefs = torch._foreach_div(dots, w_sq)
        ortho = torch._foreach_sub(updates, torch._foreach_mul(params, coefs))
        ortho_norms = torch._foreach_add(torch._foreach_norm(ortho), 1e-30)
        rescale = torch._foreach_div(torch._foreach_norm(updates), ortho_norms)
        torch._foreach_mul_(ortho, rescale)
        return Scratch(ortho), state


def _orthogonalize_sharded(updates: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """⊥Grad on FSDP2 shards: the per-tensor sums (w·g, ‖w‖², ‖g‖², then ‖g⊥‖²) are this rank's partial
    sums, all-reduced in float64 (one all-reduce for every tensor of the call, twice)."""
    ws, gs = [local(p) for p in params], [local(u) for u in updates]
    sums = [torch.vdot(w.reshape(-1), g.reshape(-1)) for w, g in zip(ws, gs, strict=True)]
    sums += [torch.linalg.vector_norm(t).square() for t in ws + gs]
    totals = all_reduce_sum(torch.stack([s.double() for s in sums]), params[0])
    n = len(ws)
    dots, w_sq, g_sq = totals[:n], totals[n : 2 * n], totals[2 * n :]
    coefs = (dots / (w_sq + 1e-30)).unbind(0)
    ortho = [g - c.to(g.dtype) * w for w, g, c in zip(ws, gs, coefs, strict=True)]
    o_sq = all_reduce_sum(torch.stack([torch.linalg.vector_norm(o).square().double() for o in ortho]), params[0])
    rescale = (g_sq.sqrt() / (o_sq.sqrt() + 1e-30)).unbind(0)
    return [like(o.mul_(r.to(o.dtype)), u) for o, r, u in zip(ortho, rescale, updates, strict=True)]


def ema_momentum() -> EmaMomentum:
    return EmaMomentum()


def orthogonalize_newton_schulz() -> OrthogonalizeNewtonSchulz:
    return OrthogonalizeNewtonSchulz()


def scale_by_shape() -> ScaleByShape:
    return ScaleByShape()


def normalize_cosh_brake() -> NormalizeCoshBrake:
    return NormalizeCoshBrake()


def scale_by_muon() -> ScaleByMuon:
    return ScaleByMuon()


def scale_by_auon() -> ScaleByAuON:
    return ScaleByAuON()


def orthogonalize_gradient() -> OrthogonalizeGradient:
    return OrthogonalizeGradient()
