""" "Did you mean ...?" for a misspelled name: an algorithm, workload, schedule, method or any other choice.

Every registry error reads ``unknown <what> '<name>'; choose one of: a, b, c`` and argparse's reads
``invalid choice: '<name>' (choose from 'a', 'b')``; :func:`with_suggestion` appends the closest choices to
either, so each registry keeps one plain message and the command line adds the hint."""

from __future__ import annotations

import argparse
import difflib
import re

REGISTRY = re.compile(r"unknown [\w -]+ '(?P<name>[^']+)'[^;\n]*; choose one of: (?P<choices>[^\n;]+)")
ARGPARSE = re.compile(r"invalid choice: '(?P<name>[^']+)' \(choose from (?P<choices>[^)]*)\)")


def close_matches(name: str, choices: list[str]) -> list[str]:
    """Up to three choices close to ``name``, case-insensitively first (``adamW`` -> ``adamw``)."""
    folded = [c for c in choices if c.lower() == name.lower()]
    return folded or difflib.get_close_matches(name, choices, n=3, cutoff=0.6)


def with_suggestion(message: str) -> str:
    """``message`` with "did you mean X?" when it names an unknown choice and one of the choices is close."""
    for pattern in (REGISTRY, ARGPARSE):
        found = pattern.search(message)
        if found:
            choices = [c.strip().strip("'\"") for c in found["choices"].split(",")]
            close = close_matches(found["name"], [c for c in choices if c])
            if close and "did you mean" not in message:
                return f"{message.rstrip('.')}; did you mean {' or '.join(close)}?"
    return message


class SuggestingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors suggest the closest choice (subcommand parsers inherit the class)."""

    def error(self, message: str):  # type: ignore[override]
        super().error(with_suggestion(message))
