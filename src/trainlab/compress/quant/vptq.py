"""Vector quantization in the style of VPTQ ("Extreme Low-bit Vector Post-Training Quantization").

The weight ``(rows, cols)`` is cut into vectors of ``vector_len`` consecutive entries along the input
dimension (``cols`` must be a multiple); every vector is replaced by one of ``num_centroids`` codebook
vectors shared by the layer, plus optionally one of ``num_res_centroids`` residual codebook vectors:

    w_hat[r, b*v:(b+1)*v] = C[idx[r, b]] + C_res[res_idx[r, b]]

Bits per weight are ``(ceil(log2 K) + ceil(log2 K_res)) / v`` for the indices plus the float16 codebooks
(``2 v (K + K_res)`` bytes per layer); :func:`settings_for_bits` picks ``K`` and ``K_res`` for a target.

Given a calibration Hessian ``H`` (``(cols, cols)``, e.g. from :func:`..gptq.collect_hessians`):

* k-means is weighted by ``diag H`` (VPTQ's ``kmeans_mode='hessian'``): entry ``j`` of a vector in columns
  ``c..c+v`` counts with weight ``H[c+j, c+j]`` in the distances and in the centroid means, and assignment uses
  the same weighted distance;
* the vectors are assigned one column block of ``v`` at a time, left to right, with GPTQ's error compensation
  (:mod:`.gptq`): after block ``B`` with error ``E = W_B - Q_B``, ``W[:, later] -= E U_BB^-1 U_B,later``
  (``U`` the upper Cholesky factor of the damped ``H^-1``; the block form of GPTQ's one-column update, lazy
  batches of ``block_size`` columns);
* with a residual codebook, a first pass quantizes with the main codebook alone, the residual codebook is
  fitted by k-means on that pass's compensated errors, and a second pass from the original weight assigns
  both (main index nearest to the vector, residual index nearest to what is left).

Without a Hessian the k-means is unweighted and vectors are assigned to their nearest centroid.

Deviations from ``microsoft/VPTQ``: the official code takes vectors along the output dimension inside one
column (``enable_transpose``) and defaults to ``v = 8, K = 65536`` (+ ``K_res = 256``); here vectors run
along the input dimension (so the diagonal Hessian weighting differs inside a vector and the joint block
update is used), indices are packed at ``ceil(log2 K) <= 8`` bits, so ``K <= 256`` (``v = 4, K = 256`` gives 2
bits per weight); there is no per-channel normalization, permutation or outlier codebook. Codebooks are
rounded to float16 (``codebook_dtype``) before assignment, so the in-memory result is exactly what is stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainlab.compress.bits import pack_codes, packed_bytes, unpack_codes
from trainlab.compress.formats import default_dtype, float16_part, register_format
from trainlab.compress.quant.gptq import BLOCK_SIZE, DAMP, damped_inverse_cholesky
from trainlab.compress.quant.grids import check_weight
from trainlab.compress.registry import register_compressor

VECTOR_LEN = 4
NUM_CENTROIDS = 256  # 2 bits per weight at v = 4
KITER, KTOL = 100, 1e-5  # official scripts: --kiter 100 --ktol 1e-5
MAX_CENTROIDS = 256  # indices are packed at <= 8 bits
INIT_SAMPLE = 1 << 15  # k-means++ seeds from at most this many vectors
CHUNK = 1 << 15  # vectors per distance-matrix chunk
CODEBOOK_DTYPES = (torch.float16, None)


def index_bits(num_centroids: int) -> int:
    return max(1, math.ceil(math.log2(num_centroids)))


@register_format("vq")
@dataclass(frozen=True)
class VQWeight:
    """``indices``: int64 ``(rows, cols // v)``; ``codebook``: ``(K, v)``; optional residual pair. Stored as
    ``codebook`` (float16) and ``indices`` (packed at ``ceil(log2 K)`` bits), and ``res_codebook`` /
    ``res_indices`` likewise."""

    indices: torch.Tensor
    codebook: torch.Tensor
    res_indices: torch.Tensor | None = None
    res_codebook: torch.Tensor | None = None

    @property
    def vector_len(self) -> int:
        return self.codebook.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.indices.shape[0], self.indices.shape[1] * self.vector_len)

    @property
    def index_bits(self) -> int:
        bits = index_bits(self.codebook.shape[0])
        return bits + (0 if self.res_codebook is None else index_bits(self.res_codebook.shape[0]))

    @property
    def bits_per_weight(self) -> float:
        """Index bits per weight (codebooks not counted)."""
        return self.index_bits / self.vector_len

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``C[idx] (+ C_res[res_idx])``; ``dtype`` defaults to the codebook's (float32 when it is float16)."""
        dtype = default_dtype(self.codebook.dtype, dtype)
        rows, cols = self.shape
        w = self.codebook.to(dtype)[self.indices.long()]
        if self.res_codebook is not None:
            w = w + self.res_codebook.to(dtype)[self.res_indices.long()]
        return w.reshape(rows, cols)

    def _parts(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        parts = [("", self.codebook, self.indices)]
        if self.res_codebook is not None:
            parts.append(("res_", self.res_codebook, self.res_indices))
        return parts

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for part, codebook, indices in self._parts():
            out[f"{prefix}{part}codebook"] = float16_part(f"{part}codebook", codebook)
            out[f"{prefix}{part}indices"] = pack_codes(indices, index_bits(codebook.shape[0]))
        return out

    def metadata(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "residual": self.res_codebook is not None}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str, metadata: Mapping[str, Any]) -> VQWeight:
        rows, cols = metadata["shape"]

        def part(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            codebook = tensors[f"{prefix}{name}codebook"]
            count = rows * cols // codebook.shape[1]
            idx = unpack_codes(tensors[f"{prefix}{name}indices"], index_bits(codebook.shape[0]), count)
            return idx.long().reshape(rows, -1), codebook

        indices, codebook = part("")
        res_indices, res_codebook = part("res_") if metadata["residual"] else (None, None)
        return cls(indices, codebook, res_indices, res_codebook)

    def nbytes(self) -> int:
        """Packed indices and float16 codebooks."""
        return sum(packed_bytes(i.numel(), index_bits(c.shape[0])) + 2 * c.numel() for _, c, i in self._parts())


def _check_int(value: int, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def _scores(x: torch.Tensor, wt: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``sum_d wt[n, d] (x[n, d] - c[k, d])**2 - sum_d wt[n, d] x[n, d]**2`` for all ``n, k`` (the weighted
    squared distance less a per-point constant; ``wt`` is ``(n, v)`` or ``(1, v)``): one matrix product."""
    base = wt @ (c * c).T
    if base.shape[0] == 1:
        return torch.addmm(base, wt * x, c.T, alpha=-2)
    return base.addmm_(wt * x, c.T, alpha=-2)


def _rows(wt: torch.Tensor, i: int) -> torch.Tensor:
    return wt if wt.shape[0] == 1 else wt[i : i + CHUNK]


def nearest(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest centroid (weighted squared distance; ``weights`` ``(n, v)`` or ``(1, v)``, all ones
    by default) of each row of ``x``, in chunks."""
    wt = torch.ones(1, x.shape[1], dtype=x.dtype) if weights is None else weights
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for i in range(0, x.shape[0], CHUNK):
        out[i : i + CHUNK] = _scores(x[i : i + CHUNK], _rows(wt, i), centroids).argmin(1)
    return out


def _min_distances(
    x: torch.Tensor, wt: torch.Tensor, xx: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted squared distance to the nearest centroid and its index (``xx``: ``sum_d wt x**2`` per point)."""
    dist = torch.empty(x.shape[0], dtype=x.dtype)
    idx = torch.empty(x.shape[0], dtype=torch.int64)
    for i in range(0, x.shape[0], CHUNK):
        d, j = _scores(x[i : i + CHUNK], _rows(wt, i), c).min(1)
        dist[i : i + CHUNK], idx[i : i + CHUNK] = (d + xx[i : i + CHUNK]).clamp(min=0), j
    return dist, idx


def kmeans(
    points: torch.Tensor,
    k: int,
    *,
    weights: torch.Tensor | None = None,
    iters: int = KITER,
    tol: float = KTOL,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Weighted k-means (Lloyd) of ``points`` ``(n, v)`` with per-entry ``weights`` (``(n, v)``, ``(1, v)`` or ``(v,)``,
    >= 0; all ones by default): minimizes ``sum_n sum_d weights[n, d] (points[n, d] - C[a_n, d])**2``.
    k-means++ seeding (from at most :data:`INIT_SAMPLE` points), Lloyd until the objective falls by less than
    ``tol`` (relative) or ``iters`` steps; an emptied cluster is re-seeded at the worst-fitted point.
    Returns ``(centroids (k, v), assignment (n,), objective history)``."""
    if not isinstance(points, torch.Tensor) or points.dim() != 2 or not points.is_floating_point():
        raise ValueError("points must be a 2-D floating tensor (n, v)")
    n, v = points.shape
    _check_int(k, "k", 1, max(n, 1))
    _check_int(iters, "iters", 0)
    if not isinstance(tol, int | float) or tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    x = points.detach()
    if weights is None:
        wt = torch.ones(1, v, dtype=x.dtype)
    else:
        wt = weights.detach().to(x.dtype)
        wt = wt.reshape(1, v) if wt.dim() == 1 else wt
        if wt.shape not in ((1, v), (n, v)):
            raise ValueError(f"weights must have shape ({v},) or ({n}, {v}), got {tuple(weights.shape)}")
        if (wt < 0).any():
            raise ValueError("weights must be >= 0")
    xx = ((wt * x) * x).sum(1)
    g = torch.Generator().manual_seed(seed)
    # k-means++ seeding on a sample
    sample = torch.randperm(n, generator=g)[:INIT_SAMPLE] if n > INIT_SAMPLE else torch.arange(n)
    xs, ws = x[sample], (wt if wt.shape[0] == 1 else wt[sample])

    def to_point(j: int) -> torch.Tensor:
        return (ws * (xs - xs[j]).square()).sum(1)

    chosen = [int(torch.randint(len(sample), (1,), generator=g))]
    best = to_point(chosen[0])
    for _ in range(k - 1):
        total = best.sum()
        if total > 0:
            nxt = int(torch.multinomial(best / total, 1, generator=g))
        else:  # fewer distinct points than k: any point
            nxt = int(torch.randint(len(sample), (1,), generator=g))
        chosen.append(nxt)
        best = torch.minimum(best, to_point(nxt))
    c = xs[chosen].clone()

    dist, assign = _min_distances(x, wt, xx, c)
    history = [float(dist.sum())]
    wx = wt * x
    for _ in range(iters):
        num = torch.zeros(k, v, dtype=x.dtype).index_add_(0, assign, wx)
        den = torch.zeros(k, v, dtype=x.dtype).index_add_(0, assign, wt.expand(n, v))
        c = torch.where(den > 0, num / den.clamp(min=torch.finfo(x.dtype).tiny), c)
        empty = torch.bincount(assign, minlength=k) == 0
        if empty.any():
            worst = dist.topk(int(empty.sum())).indices
            c[empty] = x[worst]
        dist, assign = _min_distances(x, wt, xx, c)
        history.append(float(dist.sum()))
        if history[-2] - history[-1] <= tol * history[-2]:
            break
    return c, assign, history


def settings_for_bits(bits_per_weight: float, vector_len: int = VECTOR_LEN) -> tuple[int, int]:
    """``(num_centroids, num_res_centroids)`` whose index bits per weight are ``bits_per_weight`` rounded to a
    multiple of ``1 / vector_len``: up to 8 index bits in the main codebook, the rest in the residual one
    (0 = none). E.g. 2 bits at ``v = 4``: ``(256, 0)``; 3 bits: ``(256, 16)``."""
    _check_int(vector_len, "vector_len", 1)
    if isinstance(bits_per_weight, bool) or not isinstance(bits_per_weight, int | float) or bits_per_weight <= 0:
        raise ValueError(f"bits_per_weight must be a number > 0, got {bits_per_weight!r}")
    total = max(1, round(bits_per_weight * vector_len))
    if total > 16:
        raise ValueError(
            f"bits_per_weight={bits_per_weight} at vector_len={vector_len} needs {total} index bits per vector; "
            "at most 16 (two 8-bit codebooks) are supported"
        )
    main = min(total, 8)
    return 2**main, (2 ** (total - main) if total > main else 0)


def _quantize_block(
    x: torch.Tensor, wt: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    i1 = nearest(x, c1, wt)
    q = c1[i1]
    if c2 is None:
        return q, i1, None
    i2 = nearest(x - q, c2, wt)
    return q + c2[i2], i1, i2


def _vq_pass(
    w0: torch.Tensor,
    u: torch.Tensor,
    hd: torch.Tensor,
    v: int,
    block_size: int,
    c1: torch.Tensor,
    c2: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """GPTQ loop over column blocks of ``v``; returns main indices, residual indices and the compensated
    weights each block was quantized from, minus their quantization (the errors)."""
    rows, cols = w0.shape
    w = w0.clone()
    i1s = torch.empty(rows, cols // v, dtype=torch.int64)
    i2s = None if c2 is None else torch.empty_like(i1s)
    errors = torch.empty_like(w)
    for b1 in range(0, cols, block_size):
        b2 = min(b1 + block_size, cols)
        w1, u1 = w[:, b1:b2].clone(), u[b1:b2, b1:b2]
        err1 = torch.zeros_like(w1)
        for j in range(0, b2 - b1, v):
            blk = w1[:, j : j + v]
            q, i1, i2 = _quantize_block(blk, hd[b1 + j : b1 + j + v].unsqueeze(0), c1, c2)
            col = (b1 + j) // v
            i1s[:, col] = i1
            if i2s is not None:
                i2s[:, col] = i2
            e = blk - q
            errors[:, b1 + j : b1 + j + v] = e
            err = torch.linalg.solve_triangular(u1[j : j + v, j : j + v], e, upper=True, left=False)
            w1[:, j + v :] -= err @ u1[j : j + v, j + v :]
            err1[:, j : j + v] = err
        w[:, b2:] -= err1 @ u[b1:b2, b2:]
    return i1s, i2s, errors


def quantize_vptq(
    weight: torch.Tensor,
    hessian: torch.Tensor | None = None,
    *,
    vector_len: int = VECTOR_LEN,
    num_centroids: int = NUM_CENTROIDS,
    num_res_centroids: int = 0,
    weighted: bool = True,
    kiter: int = KITER,
    ktol: float = KTOL,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
    codebook_dtype: torch.dtype | None = torch.float16,
    seed: int = 0,
) -> VQWeight:
    """Vector-quantize ``weight`` (``(rows, cols)``, ``cols`` a multiple of ``vector_len``); see the module
    docstring. ``weighted=False`` ignores ``diag H`` in k-means and assignment (error compensation still runs
    when a Hessian is given). Computed in the weight's dtype (float32 at least)."""
    check_weight(weight)
    rows, cols = weight.shape
    v = _check_int(vector_len, "vector_len", 1)
    if cols % v:
        raise ValueError(f"vector_len must divide the number of columns {cols}, got {vector_len}")
    n = rows * cols // v
    _check_int(num_centroids, "num_centroids", 2, MAX_CENTROIDS)
    if num_centroids > n:
        raise ValueError(f"num_centroids must be at most the number of vectors {n}, got {num_centroids}")
    if num_res_centroids != 0:
        _check_int(num_res_centroids, "num_res_centroids", 2, min(MAX_CENTROIDS, n))
    if not isinstance(weighted, bool):
        raise ValueError(f"weighted must be True or False, got {weighted!r}")
    if codebook_dtype not in CODEBOOK_DTYPES:
        raise ValueError(f"codebook_dtype must be torch.float16 or None, got {codebook_dtype!r}")
    if not (isinstance(damp, int | float) and damp > 0):
        raise ValueError(f"damp must be > 0, got {damp!r}")
    _check_int(block_size, "block_size", 1)
    if hessian is not None and (not isinstance(hessian, torch.Tensor) or hessian.shape != (cols, cols)):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must be None or a ({cols}, {cols}) tensor, got {got}")

    dtype = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().to(dtype).clone()

    def fit(points: torch.Tensor, k: int, wt: torch.Tensor | None, seed_: int) -> torch.Tensor:
        c, _, _ = kmeans(points, k, weights=wt, iters=kiter, tol=ktol, seed=seed_)
        return c if codebook_dtype is None else c.to(codebook_dtype).to(dtype)

    if hessian is None:
        x = w.reshape(n, v)
        c1 = fit(x, num_centroids, None, seed)
        i1 = nearest(x, c1)
        c2 = i2 = None
        if num_res_centroids:
            r = x - c1[i1]
            c2 = fit(r, num_res_centroids, None, seed + 1)
            i2 = nearest(r, c2).reshape(rows, cols // v)
        return VQWeight(i1.reshape(rows, cols // v), c1, i2, c2)

    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u = damped_inverse_cholesky(h, damp).to(dtype)
    hd = torch.diag(h).to(dtype) if weighted else torch.ones(cols, dtype=dtype)
    wt = hd.reshape(1, cols // v, v).expand(rows, -1, -1).reshape(n, v)
    block = max(v, block_size // v * v)
    c1 = fit(w.reshape(n, v), num_centroids, wt, seed)
    c2 = None
    if num_res_centroids:
        _, _, errors = _vq_pass(w, u, hd, v, block, c1, None)
        c2 = fit(errors.reshape(n, v), num_res_centroids, wt, seed + 1)
    i1, i2, _ = _vq_pass(w, u, hd, v, block, c1, c2)
    return VQWeight(i1, c1, i2, c2)


@register_compressor(
    "vptq",
    paper="VPTQ: Extreme Low-bit Vector Post-Training Quantization for Large Language Models",
    summary="k-means codebook over 4-weight vectors (+ residual codebook above 2 bits), Hessian-weighted, "
    "GPTQ-style block compensation",
    kind="quantizer",
    level="bits",
    needs=("calibration", "hessian"),
    second_order="always",
    bits=(2, 3, 4),
)
def vptq(weight: torch.Tensor, *, bits: int, hessian: torch.Tensor) -> VQWeight:
    """``bits`` index bits per weight (one codebook per layer: no groups)."""
    k, k_res = settings_for_bits(bits)
    return quantize_vptq(weight, hessian, num_centroids=k, num_res_centroids=k_res)
