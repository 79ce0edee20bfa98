"""The ``mogile-middleware`` command line.

Each subcommand is an ``add_arguments(parser)`` function and a ``run(args)`` function that returns
the exit code. Errors of this package are printed as one line, exit code 1 (3 for a key that
does not exist).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import IO

from .. import __version__
from ..exceptions import MogileFSError, TrackerUnavailableError, UnknownKeyError
from ..tracker import DEFAULT_PORT
from . import commands, demo, devserver, serve
from .progress import UNSHOWABLE, quoted, shown
from .signals import on_stop_signal

#: name → (one-line help, add_arguments, run)
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    **commands.SUBCOMMANDS,
    "devserver": (
        "run the embedded development MogileFS (a tracker and storage nodes) in the foreground; "
        "for development and tests, not production",
        devserver.add_arguments,
        devserver.run,
    ),
    "serve": (
        "serve a domain's files with the middleware under gunicorn, in front of existing trackers, "
        "for a quick look (a list of the keys at /)",
        serve.add_arguments,
        serve.run,
    ),
    "demo": (
        "store sample files in a development MogileFS and serve them with the middleware under gunicorn",
        demo.add_arguments,
        demo.run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``mogile-middleware`` with every subcommand."""
    parser = _Parser(
        prog="mogile-middleware",
        description="Serve files stored in MogileFS from WSGI and ASGI applications, and work with MogileFS.",
        epilog=commands.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands.connection_options(parser, before_command=True)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, (summary, add_arguments, run) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=summary, description=summary)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    if sys.stderr is None:  # closed (2>&-): messages go nowhere, never into stdout, the command's data
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 # for the life of the process
    for stream in (sys.stdout, sys.stderr):  # a key the locale cannot show is escaped, not a traceback
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors=UNSHOWABLE)
    given = sys.stderr
    sys.stderr = _UnfailingStderr(given)  # type: ignore[assignment]
    try:
        return _run(argv)
    finally:
        sys.stderr = given


def _run(argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its command; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except OSError as error:  # stdout did not take --help or --version
        return _unwritten(error)
    commands.resolve_connection_options(parser, args)
    # The package's warnings (a shared cache that could not be told) as the command's own lines.
    logging.basicConfig(format=f"{parser.prog}: %(message)s", level=logging.WARNING)
    try:
        with on_stop_signal(_stop):  # SIGTERM and SIGHUP too unwind, so no command leaves a partial file
            return args.run(args)
    except MogileFSError as error:
        message = shown(error)
        if isinstance(error, TrackerUnavailableError) and getattr(getattr(args, "trackers", None), "port_assumed", False):
            message += f" (no port given: {DEFAULT_PORT} assumed)"
        print(f"mogile-middleware: {message}", file=sys.stderr)
        return 3 if isinstance(error, UnknownKeyError) else 1
    except KeyboardInterrupt as stopped:
        key = getattr(stopped, "upload_outcome_unknown", None)
        if key is not None:  # stopped once the tracker was asked to point the key at the new data
            print(f"mogile-middleware: stopped while the upload of {quoted(key)} was being committed: the key "
                  "may or may not point at the new data", file=sys.stderr)
        return 128 + getattr(stopped, "signal", signal.SIGINT)


def _unwritten(error: OSError) -> int:
    """The exit status when stdout did not take what ``--help`` or ``--version`` wrote: 1, the
    error named as ``ls --help > /dev/full`` names it, or 0 when its reader has gone (``| head``)."""
    if not isinstance(error, BrokenPipeError):
        with contextlib.suppress(OSError):
            print(f"mogile-middleware: stdout: {error.strerror}", file=sys.stderr)
    commands.detach_stdout()  # what its buffer holds would fail again at exit
    return 0 if isinstance(error, BrokenPipeError) else 1


class _UnfailingStderr:
    """stderr, whose failures (its reader gone, its disk full) lose the message rather than stop
    the command midway: an ``rm`` of several keys stopped at its first message, exit 0, the rest
    kept. The exit code still tells how the command ended."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but for a failure to write help or a version to stdout, which it passed
    over (exit 0)."""

    def _print_message(self, message: str, file: IO[str] | None = None) -> None:
        if message and file is sys.stdout:
            file.write(message)
            file.flush()
        else:
            super()._print_message(message, file)


class _Stopped(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP), raised where the command was, so that it cleans up on its way out."""

    def __init__(self, signal_number: int) -> None:
        super().__init__()
        self.signal = signal_number


def _stop(signal_number: int, frame: object) -> None:
    raise _Stopped(signal_number)
