"""Sparse matmul vs dense on CPU: where does a pruned layer run faster?

For the layer shapes of the built-in workloads (``pylm``: 128x128, 384x128, 512x128, 128x512) and MiniLM-L6
(384x384, 1536x384, 384x1536), at 50/70/90/95% sparsity and batch 1 and 32 (rows of x), times ``y = x W^T`` as

* ``dense``: ``F.linear`` with the zeros stored (what a masked layer runs today);
* ``csr``: unstructured magnitude-style mask (random positions), ``W`` in ``torch.sparse_csr`` and
  ``(W @ x^T)^T`` (the path :class:`trainlab.compress.sparse_linear.SparseLinear` takes);
* ``bsr 16x16``: whole 16x16 blocks pruned (a block-sparse mask at the same sparsity), ``torch.sparse_bsr``.

Medians of interleaved repeats, reported as time / dense in the same run; "crossover" is the lowest sparsity at
which CSR is faster than dense for every shape at that batch.

    python benchmarks/sparse_inference.py --threads 1 --out benchmarks/results/sparse_inference-1t.md
"""

from __future__ import annotations

import argparse
import warnings

import torch
from report import interleaved_medians, publish  # benchmarks/report.py
from torch.nn import functional as F

SHAPES = {
    "pylm attn.proj": (128, 128),
    "pylm attn.qkv": (384, 128),
    "pylm mlp.fc": (512, 128),
    "pylm mlp.proj": (128, 512),
    "MiniLM attention": (384, 384),
    "MiniLM intermediate": (1536, 384),
    "MiniLM output": (384, 1536),
}
SPARSITIES = (0.5, 0.7, 0.9, 0.95)
BATCHES = (1, 32)
BLOCK = 16


def weights(shape: tuple[int, int], sparsity: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random-position sparse weight and a block-sparse one (whole BLOCK x BLOCK blocks), both at ``sparsity``."""
    w = torch.randn(shape, generator=g)
    flat = torch.randperm(w.numel(), generator=g)[: round(sparsity * w.numel())]
    unstructured = w.flatten().index_fill(0, flat, 0).reshape(shape)
    rows, cols = shape[0] // BLOCK, shape[1] // BLOCK
    blocks = torch.ones(rows * cols)
    blocks[torch.randperm(rows * cols, generator=g)[: round(sparsity * rows * cols)]] = 0
    mask = blocks.reshape(rows, cols).repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return unstructured, w * mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
    g = torch.Generator().manual_seed(0)
    lines = [
        "# Sparse vs dense matmul on CPU",
        "",
        f"`python benchmarks/sparse_inference.py --threads {args.threads}` (torch {torch.__version__}, "
        f"{args.threads} thread(s), medians of {args.repeats} interleaved repeats; shared machine under load, "
        "compare ratios within a row). Cells: time / dense time (< 1: the sparse kernel wins).",
        "",
    ]
    wins: dict[tuple[int, float], list[bool]] = {}
    for batch in BATCHES:
        lines += [
            f"## batch {batch}",
            "",
            "| layer | shape | dense us | " + " | ".join(f"csr {s:.0%} | bsr {s:.0%}" for s in SPARSITIES) + " |",
            "|---|---|---:|" + "---:|---:|" * len(SPARSITIES),
        ]
        for name, shape in SHAPES.items():
            x = torch.randn(batch, shape[1], generator=g)
            cells, dense_us = [], None
            for s in SPARSITIES:
                w, wb = weights(shape, s, g)
                csr, bsr = w.to_sparse_csr(), wb.to_sparse_bsr((BLOCK, BLOCK))
                fns = {
                    "dense": lambda w=w, x=x: F.linear(x, w),
                    "csr": lambda c=csr, x=x: (c @ x.T).T,
                    "bsr": lambda b=bsr, x=x: (b @ x.T).T,
                }
                t = interleaved_medians(fns, 1, args.repeats)
                dense_us = dense_us or t["dense"] * 1e6
                cells += [f"{t['csr'] / t['dense']:.2f}", f"{t['bsr'] / t['dense']:.2f}"]
                wins.setdefault((batch, s), []).append(t["csr"] < t["dense"])
            lines.append(f"| {name} | {shape[0]}x{shape[1]} | {dense_us:.0f} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Crossover (CSR faster than dense for every shape)", ""]
    for batch in BATCHES:
        won = [s for s in SPARSITIES if all(wins[(batch, s)])]
        some = [f"{s:.0%}: {sum(wins[(batch, s)])}/{len(SHAPES)}" for s in SPARSITIES]
        lines.append(
            f"- batch {batch}: {'from ' + format(min(won), '.0%') if won else 'not reached at 95%'} "
            f"(shapes won per sparsity: {', '.join(some)})"
        )
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
