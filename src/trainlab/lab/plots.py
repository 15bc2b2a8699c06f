"""PNG plots of a bench run: learning curves per workload and the performance profile."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from trainlab.lab.report import R_MAX, performance_ratios, profile_curve  # noqa: E402


def write_plots(results: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Write ``curves-<workload>.png`` for each workload and ``performance-profile.png``."""
    written = [_curves(results, w, out) for w in sorted({r["workload"] for r in results})]
    written.append(_profile(results, out))
    return written


def _colors(algorithms: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {a: cmap(i % 10) for i, a in enumerate(sorted(algorithms))}


def _curves(results: Sequence[dict[str, Any]], workload: str, out: Path) -> Path:
    runs = [r for r in results if r["workload"] == workload]
    colors = _colors({r["algorithm"] for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in runs:
        points = [p for p in r["curve"] if p["metric"] is not None]
        label = r["algorithm"] if r["seed"] == 0 else None
        for ax, x in zip(axes, ("step", "wall_time_s"), strict=True):
            ax.plot(
                [p[x] for p in points],
                [p["metric"] for p in points],
                color=colors[r["algorithm"]],
                label=label,
                alpha=0.85,
                lw=1.4,
            )
    for ax, xlabel in zip(axes, ("step", "wall time (s)"), strict=True):
        ax.axhline(runs[0]["target"], color="grey", ls="--", lw=1, label="target" if xlabel == "step" else None)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(runs[0]["metric"])
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{workload}: validation {runs[0]['metric']} (each seed one line)")
    fig.tight_layout()
    path = out / f"curves-{workload}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _profile(results: Sequence[dict[str, Any]], out: Path) -> Path:
    ratios = performance_ratios(results)
    colors = _colors(ratios)
    taus = [1 + i * (R_MAX - 1) / 300 for i in range(301)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for a, per_workload in sorted(ratios.items()):
        ax.step(taus, profile_curve(per_workload, taus), where="post", color=colors[a], label=a)
    ax.set_xlabel("tau (time-to-target / fastest)")
    ax.set_ylabel("fraction of workloads within tau")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Performance profile")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "performance-profile.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
