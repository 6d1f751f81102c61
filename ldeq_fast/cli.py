"""The ``ldeq-fast`` command line: the top-level parser, built from the subcommands in :mod:`ldeq_fast.apps`,
and the dispatch.

An expected error (a missing or corrupt file, a wrong config key or value, a missing optional package, an
unreadable video; see :func:`ldeq_fast.apps.common.is_expected`) prints one line,
``ldeq-fast <command>: error: <what>``, and exits with status 1 (2 for usage errors, as argparse's own);
``--debug`` or ``LDEQ_FAST_DEBUG=1`` shows the traceback instead.  Any other exception is a bug and keeps its
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ldeq_fast.apps import COMMANDS
from ldeq_fast.apps.common import UsageError, is_expected, print_error


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``ldeq-fast <command>: error: <what>`` (``--help`` shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ldeq-fast", description="Fast Landmark Deep Equilibrium models")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also: LDEQ_FAST_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = {}
    for name in COMMANDS:
        app = importlib.import_module(f"ldeq_fast.apps.{name}")
        s = p.commands[app.NAME] = sub.add_parser(app.NAME, help=app.HELP)
        app.add_arguments(s)
        # also after the command name (SUPPRESS: does not overwrite the top-level flag's value)
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        s.set_defaults(fn=app.run)
    return p


def _debug(args) -> bool:
    return args.debug or os.environ.get("LDEQ_FAST_DEBUG", "") not in ("", "0")


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:   # reported by the command's parser, so the line names the command
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except Exception as exc:
        if _debug(args) or not is_expected(exc):
            raise
        print_error(args.command, exc)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
