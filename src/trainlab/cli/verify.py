"""``trainlab verify``: check each paper's claim; exit 1 if any fails."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def resolve_out(out: str) -> Path:
    """The report's file: ``out`` itself, or ``out/VERIFY.md`` when ``out`` is a directory. Its folder is
    checked for writing before any claim runs (a slow verify must not end in an unwritable path)."""
    from trainlab.lab.bench_files import check_writable

    path = Path(out)
    if path.is_dir():
        path = path / "VERIFY.md"
    check_writable(path.parent)
    return path


def run(args: argparse.Namespace) -> int:
    from trainlab.claims.verify import verify

    out = resolve_out(args.out)
    verdicts = verify(fast_only=args.fast, only=args.only, out=out, progress=not args.quiet)
    print(out.read_text())
    print(f"written to {out}")
    return 0 if all(v.passed for v in verdicts) else 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("verify", help="check each paper's claim; exit 1 if any fails")
    p.add_argument("--fast", action="store_true", help="only the fast claims")
    p.add_argument("--only", default=None, help="one claim (by name) or all claims of one method")
    p.add_argument("--out", default="VERIFY.md", help="the report file, or a directory to hold VERIFY.md")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p
