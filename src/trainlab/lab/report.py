"""Markdown report of a bench run: one table per workload and the AlgoPerf performance profile."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# AlgoPerf integrates the performance profile over ratios 1..R_MAX (R_MAX = 4 in the benchmark paper).
R_MAX = 4.0


def median_time_to_target(runs: Sequence[dict[str, Any]]) -> float:
    """Median over seeds of time-to-target, a seed that missed the target counting as infinite."""
    return statistics.median(r["time_to_target_s"] if r["time_to_target_s"] is not None else math.inf for r in runs)


def performance_ratios(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``ratios[algorithm][workload]`` = time-to-target / best algorithm's time (inf when missed)."""
    groups = _group(results)
    workloads = sorted({w for w, _ in groups})
    algorithms = sorted({a for _, a in groups})
    ratios: dict[str, dict[str, float]] = {a: {} for a in algorithms}
    for w in workloads:
        times = {a: median_time_to_target(groups[(w, a)]) for a in algorithms if (w, a) in groups}
        best = min(times.values())
        for a, t in times.items():
            ratios[a][w] = t / best if math.isfinite(t) else math.inf
    return ratios


def profile_score(ratios: dict[str, float], r_max: float = R_MAX) -> float:
    """Area under the performance profile rho(tau) on [1, r_max], normalized to [0, 1].

    rho(tau) is the fraction of workloads solved within tau times the best time, so each workload
    contributes (r_max - r) / (r_max - 1) when its ratio r <= r_max and nothing otherwise.
    """
    if not ratios:
        return 0.0
    return sum(max(0.0, (r_max - r) / (r_max - 1)) for r in ratios.values()) / len(ratios)


def profile_curve(ratios: dict[str, float], taus: Sequence[float]) -> list[float]:
    """rho(tau): the fraction of workloads whose ratio is at most tau, for each tau."""
    return [sum(r <= t for r in ratios.values()) / len(ratios) for t in taus]


def render_report(results: Sequence[dict[str, Any]]) -> str:
    groups = _group(results)
    lines = ["# trainlab bench report", ""]
    for w in sorted({w for w, _ in groups}):
        first = next(r for (wn, _), runs in groups.items() if wn == w for r in runs)
        better = "higher" if first["higher_is_better"] else "lower"
        lines += [
            f"## {w}",
            "",
            f"Metric: {first['metric']} ({better} is better), target {first['target']}. "
            "Medians over seeds; a seed that missed the target counts as never reaching it, and a diverged seed "
            "counts as the worst metric (a median that lands on one reads `diverged`).",
            "",
            "| algorithm | seeds | final | best | reached | steps to target | samples to target "
            "| time to target (s) | samples | wall (s) | step (ms) | peak RSS (MB) | optimizer state (KB) "
            "| activations held (KB) | energy (J) | energy per sample (J) | diverged |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (wn, a), runs in sorted(groups.items()):
            if wn != w:
                continue
            reached = sum(r["steps_to_target"] is not None for r in runs)
            steps_tt, samples_tt = (
                statistics.median(r.get(key) if r.get(key) is not None else math.inf for r in runs)
                for key in ("steps_to_target", "samples_to_target")
            )
            lines.append(
                f"| {a} | {len(runs)} | {_metric_median(runs, 'final_metric')} | {_metric_median(runs, 'best_metric')}"
                f" | {reached}/{len(runs)} | {_fmt(steps_tt, 0)} | {_fmt(samples_tt, 0)}"
                f" | {_fmt(median_time_to_target(runs), 2)} | {_fmt(_median(runs, 'samples'), 0)}"
                f" | {_fmt(_median(runs, 'wall_time_s'), 2)} | {_fmt(_median(runs, 'step_time_ms_median'), 2)}"
                f" | {_fmt(_median(runs, 'peak_rss_bytes') / 2**20, 0)}"
                f" | {_fmt(_median(runs, 'optimizer_state_bytes') / 1024, 1)}"
                f" | {_fmt(_median(runs, 'activation_peak_bytes') / 1024, 1)}"
                f" | {_energy_cell(runs, 'energy_j')} | {_energy_cell(runs, 'energy_per_sample_j')}"
                f" | {sum(r['diverged'] for r in runs)} |"
            )
        unmeasured = sorted(
            {_energy_note(r) for (wn, _), runs in groups.items() if wn == w for r in runs if r.get("energy_j") is None}
        )
        if unmeasured:
            lines += ["", "Energy n/a: " + "; ".join(unmeasured) + "."]
        diverged = [r for (wn, _), runs in sorted(groups.items()) if wn == w for r in runs if r["diverged"]]
        if diverged:
            lines += [""] + [
                f"- {r['algorithm']} seed {r['seed']} diverged at step {r.get('diverged_at_step')} "
                "(non-finite loss or metric)"
                for r in diverged
            ]
        lines.append("")
    ratios = performance_ratios(results)
    lines += [
        "## Performance profile (AlgoPerf)",
        "",
        f"Time-to-target ratio to the fastest algorithm per workload; the score is the area under the "
        f"profile on [1, {R_MAX:g}] (1 = fastest everywhere, 0 = never within {R_MAX:g}x).",
        "",
        "| algorithm | score | " + " | ".join(sorted(next(iter(ratios.values()), {}))) + " |",
        "|---|---|" + "---|" * len(next(iter(ratios.values()), {})),
    ]
    for a in sorted(ratios, key=lambda a: -profile_score(ratios[a])):
        cells = " | ".join(_fmt(ratios[a][w], 2) for w in sorted(ratios[a]))
        lines.append(f"| {a} | {profile_score(ratios[a]):.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def write_report(results: Sequence[dict[str, Any]], path: Path) -> None:
    path.write_text(render_report(results))


def _group(results: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["workload"], r["algorithm"]), []).append(r)
    return groups


def _median(runs: Sequence[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]  # results.json from before a column existed
    return statistics.median(values) if values else math.nan


def _energy_cell(runs: Sequence[dict[str, Any]], key: str) -> str:
    """Median measured joules (trainlab.lab.energy), or ``n/a`` when no seed had a counter (the reason is
    stated once under the table)."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return f"{statistics.median(values):.4g}" if values else "n/a"


def _energy_note(run: dict[str, Any]) -> str:
    return run.get("energy_note") or "not measured (results from before the energy column)"


def _metric_median(runs: Sequence[dict[str, Any]], key: str) -> str:
    """Median of a metric over seeds with every diverged seed (or a missing metric) counted as the worst value."""
    worst = -math.inf if runs[0]["higher_is_better"] else math.inf
    values = [worst if r["diverged"] or r.get(key) is None else r[key] for r in runs]
    median = statistics.median(values)
    return "diverged" if math.isinf(median) else _fmt(median)


def _fmt(value: float, digits: int = 4) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "never"
    return f"{value:.{digits}f}"
