from pathlib import Path

from trainlab.claims.docs import render_methods_table

METHODS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_generated_methods_table_is_committed_and_current():
    assert METHODS.read_text() == render_methods_table(), "run `trainlab docs` and commit docs/methods.md"
