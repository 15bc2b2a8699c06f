"""``trainlab docs``: regenerate the methods table (docs/methods.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def run(args: argparse.Namespace) -> int:
    from trainlab.claims.docs import write_methods_table

    path = write_methods_table(Path(args.out))
    print(f"written {path}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("docs", help="regenerate the methods table (docs/methods.md)")
    p.add_argument("--out", default="docs/methods.md")
    p.set_defaults(func=run)
    return p
