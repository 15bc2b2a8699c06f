"""Where a result came from: the schema of the files the lab writes, the versions, the commit, the date and the
thread count, so that a number read months later can be traced and reproduced."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path
from typing import Any

import torch

import trainlab

SCHEMA_VERSION = 2  # results.json / run.json layout; 1 was the list of runs without provenance


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the trainlab checkout (with ``+dirty`` for uncommitted changes), or None when not a checkout."""
    where = where or Path(trainlab.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance() -> dict[str, Any]:
    """Schema version, trainlab and torch versions, commit (None outside a checkout), UTC date, torch threads."""
    return {
        "schema_version": SCHEMA_VERSION,
        "trainlab": trainlab.__version__,
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
    }
