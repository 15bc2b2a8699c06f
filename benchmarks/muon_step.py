"""Muon step time: trainlab's ``muon`` (Newton-Schulz in float32, in bfloat16, and each compiled) against
pytorch_optimizer's ``Muon``, interleaved in one process, on a few parameter sets.

Both sides route the same way (2-D weights to Muon, biases to the auxiliary AdamW with the same lr, betas and eps)
and run the same 5 Newton-Schulz steps with Keller Jordan's (3.4445, -4.7750, 2.0315) coefficients and the same
``max(1, rows/cols)^0.5`` scale. pytorch_optimizer iterates in bfloat16 (as muon.py does), trainlab in float32 on
the CPU unless ``ns_dtype=torch.bfloat16``. ``compiled`` rows pass ``ns_compile=True`` (torch.compile of the
iteration, one compiled function per matrix shape); their compile time is the first step's, reported apart.

Parameter sets (``--sets``):

* ``square``: ten ``Linear(1024, 1024)`` (10.5M parameters; the optimizer benchmark's stack);
* ``mlp``: four transformer-like blocks at width 256: ``(768, 256)`` (qkv), ``(256, 256)`` (proj),
  ``(1024, 256)`` (fc) and ``(256, 1024)`` (fc out) with biases (3.2M parameters);
* ``small``: 24 ``Linear(128, 128)`` (where per-call overhead, not the matmul, is the step).

Each round takes one step of every optimizer in turn (fixed random gradients); the table reports medians of
``--repeats`` rounds after ``--warmup`` and the ratio to the faster pytorch_optimizer variant (default,
``foreach=True``).

    python benchmarks/muon_step.py --threads 1 --out benchmarks/results/muon_step-1t.md
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from report import interleaved_medians, publish  # benchmarks/report.py
from torch import nn

from trainlab.optim import create
from trainlab.optim.transforms.orthogonal import NS_COMPILE_FALLBACKS

SETS: dict[str, list[tuple[int, int]]] = {  # (out, in) of each Linear
    "square": [(1024, 1024)] * 10,
    "mlp": [(768, 256), (256, 256), (1024, 256), (256, 1024)] * 4,
    "small": [(128, 128)] * 24,
}


def model_of(shapes: list[tuple[int, int]]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(i, o) for o, i in shapes])


def ours(**kw) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda m: create("muon", m.named_parameters(), exclude=None, **kw)


def theirs(**kw) -> Callable[[nn.Module], torch.optim.Optimizer] | None:
    try:
        from pytorch_optimizer import Muon
    except ImportError:
        return None

    def factory(m: nn.Module) -> torch.optim.Optimizer:
        params = list(m.parameters())
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "use_muon": True},
            {"params": [p for p in params if p.ndim < 2], "use_muon": False},
        ]
        return Muon(groups, **kw)

    return factory


def run_set(name: str, shapes: list[tuple[int, int]], warmup: int, repeats: int) -> list[str]:
    variants = {
        "trainlab muon, NS float32": ours(),
        "trainlab muon, NS bfloat16": ours(ns_dtype=torch.bfloat16),
        "trainlab muon, NS float32, compiled": ours(ns_compile=True),
        "trainlab muon, NS bfloat16, compiled": ours(ns_dtype=torch.bfloat16, ns_compile=True),
    }
    baselines = {"pytorch_optimizer.Muon": theirs(), "pytorch_optimizer.Muon(foreach=True)": theirs(foreach=True)}
    variants.update({k: v for k, v in baselines.items() if v is not None})
    models = {k: model_of(shapes) for k in variants}
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in
             enumerate(next(iter(models.values())).parameters())]  # fmt: skip
    opts = {}
    for k, make in variants.items():
        try:
            opts[k] = make(models[k])
        except TypeError as err:  # a pytorch_optimizer version without foreach=
            print(f"{k}: {err}")
    times: dict[str, list[float]] = {k: [] for k in opts}
    first: dict[str, float] = {}

    def step(k: str) -> float:
        for p, g in zip(models[k].parameters(), grads, strict=True):
            p.grad = g.clone()
        t = time.perf_counter()
        opts[k].step()
        return time.perf_counter() - t

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for k in opts:
            first[k] = step(k)
        for _ in range(warmup - 1):
            for k in opts:
                step(k)
        for _ in range(repeats):
            for k in opts:
                times[k].append(step(k))
    med = {k: statistics.median(v) for k, v in times.items()}
    base_name = min((k for k in med if k.startswith("pytorch_optimizer")), key=med.get, default=None)
    params = sum(p.numel() for p in next(iter(models.values())).parameters())
    lines = [
        f"### `{name}`: {len(shapes)} matrices {sorted(set(shapes))}, {params / 1e6:.1f}M parameters",
        "",
        "| optimizer | step ms | / pytorch_optimizer | first step ms (compile) |",
        "|---|---:|---:|---:|",
    ]
    for k, t in med.items():
        ratio = f"{t / med[base_name]:.2f}" if base_name else "-"
        lines.append(f"| {k} | {t * 1e3:.1f} | {ratio} | {first[k] * 1e3:.0f} |")
    if base_name:
        lines.append(f"\nBaseline: {base_name} (the faster pytorch_optimizer variant).")
    return [*lines, ""]


def ns_table(repeats: int) -> list[str]:
    """newton_schulz alone, eager vs compiled, interleaved: what compiling the iteration buys."""
    from trainlab.optim.transforms.orthogonal import newton_schulz

    lines = ["### Newton-Schulz alone: compiled / eager", "", "| batch x rows x cols | dtype | eager ms | "
             "compiled / eager |", "|---|---|---:|---:|"]  # fmt: skip
    torch.manual_seed(0)
    for shape in [(24, 128, 128), (4, 256, 256), (4, 1024, 256), (2, 1024, 1024)]:
        g = torch.randn(shape)
        for dtype in (torch.float32, torch.bfloat16):
            newton_schulz(g, dtype=dtype, compile=True)  # compile outside the timing
            fns = {
                "eager": lambda g=g, dtype=dtype: newton_schulz(g, dtype=dtype),
                "compiled": lambda g=g, dtype=dtype: newton_schulz(g, dtype=dtype, compile=True),
            }
            med = interleaved_medians(fns, 0, repeats)
            row = f"| {' x '.join(map(str, shape))} | {str(dtype).removeprefix('torch.')} | {med['eager'] * 1e3:.1f}"
            lines.append(f"{row} | {med['compiled'] / med['eager']:.2f} |")
    return [*lines, ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    p.add_argument("--ns", action="store_true", help="add newton_schulz alone, eager vs compiled")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        version = importlib.metadata.version("pytorch_optimizer")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    lines = [
        "# Muon step time",
        "",
        f"`python benchmarks/muon_step.py --threads {args.threads}` (torch {torch.__version__}, pytorch_optimizer "
        f"{version}, {args.threads} thread(s), medians of {args.repeats} interleaved rounds after {args.warmup} "
        "warmup rounds; shared machine, compare ratios within a table).",
        "",
    ]
    for name in args.sets:
        lines += run_set(name, SETS[name], args.warmup, args.repeats)
    if args.ns:
        lines += ns_table(max(args.repeats, 5))
    if NS_COMPILE_FALLBACKS:
        lines += ["Compile fallbacks (ran eagerly):", *[f"- {k}: {v}" for k, v in NS_COMPILE_FALLBACKS.items()]]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
