"""Shared by the benchmark scripts: time contenders in turn, print a markdown result and, when asked, keep it
under benchmarks/results/."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def interleaved_medians(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn (a, b, c, a, b, c, ...) after ``warmup`` untimed rounds,
    so that a load change on a shared machine hits every contender alike and the ratios stay fair."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def publish(text: str, out: str | Path | None) -> None:
    print(text)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text if text.endswith("\n") else text + "\n")
