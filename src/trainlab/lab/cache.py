"""Where the lab keeps what it can rebuild (trained dense models, generated data sets)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/trainlab`` (or ``~/.cache/trainlab``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainlab"
