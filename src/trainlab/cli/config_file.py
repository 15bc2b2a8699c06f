"""``--config run.toml``: every option of a command from a TOML file; options on the command line win.

Keys are the long option names (``calibration-batches`` or ``calibration_batches``); values are TOML values:
lists for comma-separated options (``workload = ["digits-mlp", "modadd"]``), booleans for flags and, for
``--hp``, a table (``[hp]`` with ``lr = 3e-4`` and ``[hp.adamw]`` with ``weight_decay = 0.1``)."""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trainlab.cli.suggestions import close_matches


def config_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.partition("=")[2]
    return None


def _flatten_hp(table: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            out += _flatten_hp(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={value!r}")
    return out


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    """The value argparse would have produced for ``value`` on the command line."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise ValueError(f"--config: {key} is a flag; give true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, Mapping):
            return _flatten_hp(value)
        return [str(v) for v in (value if isinstance(value, list) else [value])]
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    try:
        converted = action.type(text) if action.type is not None else (value if isinstance(value, list) else text)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        raise ValueError(f"--config: {key} = {value!r}: {err}") from None
    if action.choices is not None and converted not in action.choices:
        choices = [str(c) for c in action.choices]
        close = close_matches(str(converted), choices)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"--config: {key} = {value!r} is not one of: {', '.join(choices)}{hint}")
    return converted


def apply_config(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Set ``parser``'s defaults from the TOML file at ``path`` (checked: unknown keys and bad values raise
    ValueError naming them); options it sets are no longer required on the command line. Returns the values."""
    try:
        table = tomllib.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"--config {path}: not valid TOML ({err})") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    values = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            names = [d.replace("_", "-") for d in actions]
            close = close_matches(key.replace("_", "-"), names)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"--config {path}: unknown option {key!r}{hint} (options: {', '.join(sorted(names))})")
        values[dest] = _convert(actions[dest], key, value)
        actions[dest].required = False
    for group in parser._mutually_exclusive_groups:
        if any(a.dest in values for a in group._group_actions):
            group.required = False
    parser.set_defaults(**values)
    return values
