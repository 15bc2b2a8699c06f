"""The files a bench writes beside results.json: ``run.json`` (the resolved configuration and its provenance,
written before anything trains, so an unwritable or foreign ``--out`` is found first), the per-step training-loss
log ``train-loss.csv`` and its plots ``train-loss-<workload>.png``."""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trainlab.lab.provenance import provenance
from trainlab.runtime import atomic_path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        f.write(text)


def check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file into it: ValueError naming ``--out`` when that fails."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test.")
        probe.close()
    except OSError as err:
        raise ValueError(
            f"--out {out} cannot be written ({err.strerror or err}); choose a writable directory"
        ) from None


def write_run_record(out: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """``run.json``: the resolved configuration and its provenance; returns the provenance."""
    record = provenance()
    text = json.dumps({"provenance": record, "config": json.loads(json.dumps(config, default=str))}, indent=1)
    atomic_write_text(out / "run.json", text)
    return record


def prepare_out(out: Path, config: Mapping[str, Any], overwrite: bool = False) -> dict[str, Any]:
    """Create ``out`` and write ``run.json`` (``{"provenance": ..., "config": config}``); returns the provenance.

    Refuses (ValueError naming the fields) a directory holding a bench of another configuration unless
    ``overwrite``, and names ``--out`` when it cannot be written."""
    check_writable(out)
    previous = out / "run.json"
    config = json.loads(json.dumps(config, default=repr))
    if previous.exists() and not overwrite:
        try:
            old = json.loads(previous.read_text()).get("config", {})
        except (json.JSONDecodeError, AttributeError):
            old = {"run.json": "unreadable"}
        fields = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if fields:
            raise ValueError(
                f"--out {out} holds a bench of another configuration (differs in: {', '.join(fields)}); pass "
                "--overwrite to replace its results, or choose another --out"
            )
    elif (out / "results.json").exists() and not previous.exists() and not overwrite:
        raise ValueError(
            f"--out {out} holds results.json without run.json (an older bench); pass --overwrite to replace it, or "
            "choose another --out"
        )
    return write_run_record(out, config)


class TrainLossLog:
    """Per-step training losses of every run, rewritten (atomically) to ``train-loss.csv`` after each run."""

    def __init__(self, out: Path) -> None:
        self.path = out / "train-loss.csv"
        self.rows: list[tuple[str, str, int, int, float]] = []

    def add(self, workload: str, algorithm: str, seed: int, losses: Sequence[float]) -> None:
        self.rows += [(workload, algorithm, seed, step, loss) for step, loss in enumerate(losses, start=1)]
        lines = ["workload,algorithm,seed,step,train_loss"]
        lines += [f"{w},{a},{s},{t},{v!r}" for w, a, s, t, v in self.rows]
        atomic_write_text(self.path, "\n".join(lines) + "\n")


def read_train_losses(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [
            {**row, "seed": int(row["seed"]), "step": int(row["step"]), "train_loss": float(row["train_loss"])}
            for row in csv.DictReader(f)
        ]


def plot_train_losses(path: Path, out: Path) -> list[Path]:
    """``train-loss-<workload>.png`` per workload from ``train-loss.csv`` (log scale for positive losses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_train_losses(path)
    written = []
    for workload in sorted({r["workload"] for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in rows:
            if r["workload"] == workload:
                runs.setdefault((r["algorithm"], r["seed"]), []).append(r)
        algorithms = sorted({a for a, _ in runs})
        colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(algorithms)}
        for (algorithm, seed), points in sorted(runs.items()):
            ax.plot([p["step"] for p in points], [p["train_loss"] for p in points], color=colors[algorithm],
                    alpha=0.8, linewidth=0.8, label=algorithm if seed == 0 else None)  # fmt: skip
        if all(p["train_loss"] > 0 for points in runs.values() for p in points):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (per step)")
        ax.set_title(workload)
        ax.legend()
        fig.tight_layout()
        target = out / f"train-loss-{workload}.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written
