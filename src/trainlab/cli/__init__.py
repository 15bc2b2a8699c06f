"""`trainlab` commands: thin wrappers that parse arguments, call the library or the lab and print.

Each subcommand is one module here exposing ``add_parser(subparsers)``; the parser it adds sets ``func`` (the
handler, returning the exit code). A new pillar adds its module and one line to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from trainlab.cli import bench, compress, docs, federate, finetune, listing, verify

COMMANDS = (bench, listing, verify, docs, compress, finetune, federate)


def build_parser() -> argparse.ArgumentParser:
    import trainlab
    from trainlab.cli.suggestions import SuggestingParser

    parser = SuggestingParser(prog="trainlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"trainlab {trainlab.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from trainlab.cli.config_file import apply_config, config_path

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    path = config_path(argv)
    if path is not None:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        command = next((a for a in argv if a in commands), None)
        try:
            if command is None or not any(a.dest == "config" for a in commands[command]._actions):
                raise ValueError("--config applies to a command that takes it (bench, compress)")
            apply_config(commands[command], path)
        except ValueError as err:
            print(f"trainlab {command or ''}: error: {err}".replace("  ", " "), file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        from trainlab.cli.suggestions import with_suggestion

        print(f"trainlab {args.command}: error: {with_suggestion(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ntrainlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
