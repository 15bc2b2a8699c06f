"""Shared by the benchmark scripts: print a markdown result and, when asked, keep it under benchmarks/results/."""

from __future__ import annotations

from pathlib import Path


def publish(text: str, out: str | Path | None) -> None:
    print(text)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text if text.endswith("\n") else text + "\n")
