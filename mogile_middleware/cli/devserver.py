"""``mogile-middleware devserver``: run a development tracker and storage nodes in the foreground.

For development and tests only.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from ..devserver import DevMogileFS
from ..tracker import is_host
from .commands import path_argument
from .signals import on_stop_signal


def _port(text: str) -> int:
    """A TCP port: 0 (a free one) to 65535."""
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()) or not 0 <= int(digits) < 65536:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return int(digits)


def _ports(text: str) -> list[int]:
    parts = [part for part in text.split(",") if part.strip()]
    try:
        if not parts:
            raise argparse.ArgumentTypeError(text)
        return [_port(part) for part in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ports: {text!r}") from None


def _delay(text: str) -> float:
    """A finite number of seconds, 0 or more (negative, NaN or infinite is a usage error)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise argparse.ArgumentTypeError(f"not a number of seconds >= 0: {text!r}")
    return seconds


class _DomainLayout(argparse.Action):
    """Collects ``--domain D`` and the ``--class NAME=MINDEVCOUNT`` options following it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        domains: dict[str, dict[str, int]] = dict(getattr(namespace, self.dest) or {})
        if option_string == "--domain":
            domains.setdefault(values, {})
        else:
            name, _, count = str(values).partition("=")
            if not domains:
                parser.error("--class needs a --domain before it")
            if not name or not (count.isascii() and count.isdigit()) or int(count) < 1:
                parser.error(f"--class wants NAME=MINDEVCOUNT with MINDEVCOUNT >= 1, not {values!r}")
            domains[list(domains)[-1]][name] = int(count)
        setattr(namespace, self.dest, domains)


def _ipv4_host(text: str) -> str:
    """An argparse ``type``: a host name or an IPv4 address, as the development MogileFS listens on."""
    if ":" in text or not is_host(text):
        ipv6 = ": the development MogileFS listens on IPv4 only" if ":" in text else ""
        raise argparse.ArgumentTypeError(f"an IPv4 address or a host name, not {text!r}{ipv6}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the development server's options to ``parser`` (standalone or a sub-command's)."""
    parser.add_argument(
        "--host", default="127.0.0.1", type=_ipv4_host,
        help="IPv4 address to listen on and to put in paths (default: %(default)s)"
    )
    parser.add_argument("--port", type=_port, default=7001, help="tracker port (default: %(default)s)")
    parser.add_argument(
        "--storage-ports",
        type=_ports,
        default=[7500, 7502],
        metavar="PORT,PORT",
        help="one storage node (and device) per port (default: 7500,7502)",
    )
    parser.add_argument("--data", metavar="DIR", type=path_argument,
                        help="data directory, kept between runs (default: a temporary one)")
    parser.add_argument("--domain", dest="domains", action=_DomainLayout, metavar="DOMAIN", help="create this domain")
    parser.add_argument(
        "--class",
        dest="domains",
        action=_DomainLayout,
        metavar="NAME=MINDEVCOUNT",
        help="create a class in the last --domain (repeatable)",
    )
    parser.add_argument(
        "--replication-delay",
        type=_delay,
        default=0.0,
        metavar="SECONDS",
        help="make the extra copies and delete dropped data this long after the command answered, as mogilefsd"
        " does (default: 0, before it answers)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, then stop cleanly; 0 on a clean stop, 1 if it cannot start."""
    mogile = DevMogileFS(
        args.data,
        host=args.host,
        tracker_port=args.port,
        storage_ports=args.storage_ports,
        domains=args.domains,
        replication_delay=args.replication_delay,
    )
    # A list, not an Event: a handler setting an Event could wait for the lock the main thread's
    # wait on it holds, for ever.
    stop_signals: list[int] = []
    with on_stop_signal(lambda signum, frame: stop_signals.append(signum)):
        try:
            try:
                mogile.start()
            except OSError as exc:
                where = f"{exc.filename}: " if exc.filename else ""  # a data directory that is a file...
                print(f"devserver: cannot start: {where}{exc.strerror or exc}", file=sys.stderr)
                return 1
            print(f"tracker {mogile.trackers[0]}")
            for number, node in enumerate(mogile.nodes, 1):
                print(f"storage dev{number} {node.url} (docroot {node.docroot})")
            print(f"data {mogile.data_dir}", flush=True)
            while not stop_signals:
                time.sleep(0.2)
            return 0
        finally:
            mogile.stop()
