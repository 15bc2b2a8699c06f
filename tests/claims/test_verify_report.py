"""VERIFY.md: provenance, each claim's promise and pass rule, a flag where the check is weaker than the promise,
the claims --fast skipped, every failing or known-failing claim, and real per-claim times."""

import time

from trainlab.claims import verify as verify_module
from trainlab.claims.registry import Claim, ClaimResult


def _claim(name, passed, fast=True, **extra):
    def check():
        time.sleep(0.05)
        return ClaimResult(measured={"steps": 10}, baseline={"steps": 20}, passed=passed)

    return Claim(name, "m-" + name, "Paper 2024", f"{name} is faster", check, fast, **extra)


CLAIMS = [
    _claim("a", True, rule="steps < 0.8 x AdamW's"),
    _claim("b", False, rule="reaches the target", weaker="the paper promises fewer steps than AdamW"),
    _claim("c", True, fast=False),
    _claim("d", False, fast=False, known_failing="needs 10x the steps at this scale"),
]


def _fake_all_claims(fast_only=False, only=None):
    return [c for c in CLAIMS if c.fast or not fast_only]


def test_fast_verify_lists_skipped_and_known_failing_claims_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(verify_module, "all_claims", _fake_all_claims)
    out = tmp_path / "VERIFY.md"
    verdicts = verify_module.verify(fast_only=True, out=out, progress=False)
    assert [v.claim.name for v in verdicts] == ["a", "b"] and all(v.seconds >= 0.05 for v in verdicts)
    text = out.read_text()
    assert "| a | m-a | Paper 2024 | a is faster | steps < 0.8 x AdamW's | steps=10 | steps=20 | pass |" in text
    assert "| reaches the target ⚠ weaker: the paper promises fewer steps than AdamW |" in text
    assert "## Skipped (2, not run by --fast" in text and "- c (m-c)" in text and "- d (m-d)" in text
    assert "- b: failed in this run" in text
    assert "- d: known to fail, not run here (needs 10x the steps at this scale)" in text
    assert "Provenance: trainlab " in text and "torch " in text and "threads " in text and "commit " in text
    time_cell = text.split("| a | ")[1].split("\n")[0].rsplit("|", 2)[-2].strip()
    assert float(time_cell) >= 0.05  # the real time of the check
    assert not list(tmp_path.glob(".*.tmp"))


def test_full_verify_skips_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(verify_module, "all_claims", _fake_all_claims)
    out = tmp_path / "VERIFY.md"
    verify_module.verify(out=out, progress=False)
    text = out.read_text()
    assert (
        "## Skipped" not in text and "| c | " in text and "| c | m-c | Paper 2024 | c is faster | not stated |" in text
    )
    assert "- d: failed in this run (known: needs 10x the steps at this scale)" in text


def test_verify_out_may_be_a_directory_and_is_checked_before_any_claim(tmp_path, monkeypatch, capsys):
    from trainlab.cli import main

    ran = []
    monkeypatch.setattr(verify_module, "all_claims", lambda fast_only=False, only=None: ran.append(1) or CLAIMS[:1])
    assert main(["verify", "--quiet", "--out", str(tmp_path)]) == 0
    assert "| a | m-a |" in (tmp_path / "VERIFY.md").read_text()
    blocked = tmp_path / "file"
    blocked.write_text("")
    ran.clear()
    assert main(["verify", "--quiet", "--out", str(blocked / "VERIFY.md")]) == 2
    assert "--out" in capsys.readouterr().err and not ran
