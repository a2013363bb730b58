"""Command-line entry point: ``cloudtrail-sink <command> ...``.

The commands live in :mod:`cloudtrail_sink.commands`; each module registers its own parser so
that this file stays a dispatcher and a command's options sit next to the code that uses them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from . import __version__

# Order is the order shown in --help.
COMMAND_MODULES = (
    "cloudtrail_sink.commands.run",
    "cloudtrail_sink.commands.spool",
    "cloudtrail_sink.commands.failed",
    "cloudtrail_sink.commands.rejected",
    "cloudtrail_sink.commands.mappings",
    "cloudtrail_sink.commands.emulator",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cloudtrail-sink",
        description="Ship audit events from a spool directory into AWS CloudTrail Lake.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        # A command module that is not part of this build is left out of --help rather than
        # breaking every other command; tests/test_cli.py asserts the full set is present.
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
