"""`trainlab verify`: run the registered paper claims and write VERIFY.md with what they measured."""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainlab.claims.registry import Claim, ClaimResult, all_claims
from trainlab.runtime import atomic_path


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    result: ClaimResult | None
    seconds: float
    error: str = ""

    @property
    def passed(self) -> bool:
        return self.result is not None and self.result.passed


def run_claims(claims: Sequence[Claim], progress: bool = True) -> list[Verdict]:
    """Run each claim's check; an exception is a failed claim with its traceback, not a crash."""
    verdicts = []
    for claim in tqdm(claims, desc="verify", unit="claim", disable=not progress):
        start = time.perf_counter()
        try:
            verdicts.append(Verdict(claim, claim.check(), time.perf_counter() - start))
        except Exception:  # noqa: BLE001 - the report must show every claim, broken ones included
            verdicts.append(Verdict(claim, None, time.perf_counter() - start, traceback.format_exc()))
    return verdicts


def render(verdicts: Sequence[Verdict], skipped: Sequence[Claim] = (), origin: Mapping[str, Any] | None = None) -> str:
    """VERIFY.md: provenance, one row per claim run (the paper's promise, the check's pass rule, a flag where the
    check is weaker than the promise, measured numbers, verdict, seconds), then the claims this run skipped and
    every failing or known-failing claim."""
    lines = [
        "# trainlab verify",
        "",
        "Each paper's claim, measured at small scale on a built-in workload against a baseline. "
        "A ⚠ marks a check that is weaker than the paper's promise (see its note).",
        "",
    ]
    if origin:
        lines += ["Provenance: " + ", ".join(f"{k} {v}" for k, v in origin.items()), ""]
    lines += [
        "| claim | method | paper | paper's promise | pass rule | measured | baseline | verdict | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        c = v.claim
        measured = _fmt(v.result.measured) if v.result else "error"
        baseline = _fmt(v.result.baseline) if v.result else ""
        verdict = "pass" if v.passed else "FAIL"
        rule = (c.rule or "not stated") + (f" ⚠ weaker: {c.weaker}" if c.weaker else "")
        lines.append(
            f"| {c.name} | {c.method} | {c.paper} | {c.promise} | {_cell(rule)} | {measured} | {baseline} | {verdict}"
            f" | {v.seconds:.1f} |"
        )
    if skipped:
        lines += ["", f"## Skipped ({len(skipped)}, not run by --fast: run `trainlab verify` for them)", ""]
        lines += [f"- {c.name} ({c.method})" for c in skipped]
    failing = [f"- {v.claim.name}: failed in this run" + (f" (known: {v.claim.known_failing})"
               if v.claim.known_failing else "") for v in verdicts if not v.passed]  # fmt: skip
    failing += [f"- {c.name}: known to fail, not run here ({c.known_failing})" for c in skipped if c.known_failing]
    if failing:
        lines += ["", "## Failing claims", ""] + failing
    notes = [(v.claim.name, v.result.note) for v in verdicts if v.result and v.result.note]
    errors = [(v.claim.name, v.error) for v in verdicts if v.error]
    if notes:
        lines += ["", "## Notes", ""] + [f"- **{name}**: {note}" for name, note in notes]
    if errors:
        lines += ["", "## Errors", ""]
        for name, err in errors:
            lines += [f"### {name}", "", "```", err.rstrip(), "```", ""]
    passed = sum(v.passed for v in verdicts)
    lines += ["", f"{passed} of {len(verdicts)} claims hold."]
    return "\n".join(lines) + "\n"


def verify(
    fast_only: bool = False, only: str | None = None, out: Path = Path("VERIFY.md"), progress: bool = True
) -> list[Verdict]:
    from trainlab.lab.provenance import provenance

    selected = all_claims(fast_only=fast_only, only=only)
    skipped = [c for c in all_claims(only=only) if c not in selected]
    verdicts = run_claims(selected, progress=progress)
    origin = {k: v for k, v in provenance().items() if k != "schema_version"}
    text = render(verdicts, skipped, origin)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return verdicts


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def _fmt(values: Any) -> str:
    parts = []
    for k, v in dict(values).items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return "; ".join(parts).replace("|", "/")
