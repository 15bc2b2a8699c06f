"""``trainlab verify``: check each paper's claim; exit 1 if any fails."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def run(args: argparse.Namespace) -> int:
    from trainlab.claims.verify import verify

    verdicts = verify(fast_only=args.fast, only=args.only, out=Path(args.out), progress=not args.quiet)
    print(Path(args.out).read_text())
    print(f"written to {args.out}")
    return 0 if all(v.passed for v in verdicts) else 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("verify", help="check each paper's claim; exit 1 if any fails")
    p.add_argument("--fast", action="store_true", help="only the fast claims")
    p.add_argument("--only", default=None, help="one claim (by name) or all claims of one method")
    p.add_argument("--out", default="VERIFY.md", help="where to write the table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p
