"""The ``mogile-middleware`` command line.

Each subcommand is an ``add_arguments(parser)`` function that sets ``parser.set_defaults(run=...)``;
``run(args)`` returns the exit code. Errors of this package are printed as one line, exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .devserver import cli as devserver_cli
from .exceptions import MogileFSError

#: name → (one-line help, add_arguments)
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "devserver": (
        "run the embedded development MogileFS (a tracker and storage nodes) in the foreground",
        devserver_cli.add_arguments,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``mogile-middleware`` with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="mogile-middleware",
        description="Serve files stored in MogileFS from WSGI applications, and work with MogileFS.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, (summary, add_arguments) in SUBCOMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=summary, description=summary))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MogileFSError as error:
        print(f"mogile-middleware: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
