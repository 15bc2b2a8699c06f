"""Test files need unique basenames: pytest's default import mode imports them by basename, and a duplicate makes
one of them fail to collect ("import file mismatch") depending on which folders run together."""

from collections import Counter
from pathlib import Path


def test_test_file_basenames_are_unique():
    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1]
