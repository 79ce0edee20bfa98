"""The gunicorn master of the commands that serve the middleware (``serve``, ``demo``).

Their shared options (``--bind``, ``--workers``, ``--reproxy``, ``--trusted-proxy``), the checks
made before anything starts, so that a missing gunicorn or a taken port is one line of error
rather than a traceback or gunicorn's retries, and the master itself. gunicorn is an optional
extra: it is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from ..core import REPROXY_MODES, parse_trusted_proxies
from ..middleware import WSGIApp
from ..tracker import describe_address, is_host

#: Who may get reproxy answers unless ``--trusted-proxy`` says otherwise: a proxy on this machine.
LOOPBACK = ("127.0.0.1", "::1")


def _bind_address(text: str) -> tuple[str, int]:
    """An argparse ``type``: ``HOST:PORT`` as a pair, an IPv6 host in brackets (``[::1]:8000``)."""
    host, _, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    name = host[1:-1] if bracketed else host
    if not (port.isascii() and port.isdigit()) or int(port) > 65535 or not is_host(name) or (":" in name) != bracketed:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return name, int(port)


def positive(text: str) -> int:
    """An argparse ``type``: a whole number from 1."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:  # str.isdigit takes "²", which int() refuses
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return int(text)


def _reproxy_mode(text: str) -> str | None:
    """``none`` and the middleware's reproxy modes; ``none`` is ``None``, its name there."""
    modes = {mode or "none": mode for mode in REPROXY_MODES}
    if text not in modes:
        raise argparse.ArgumentTypeError(f"not one of {', '.join(modes)}: {text!r}")
    return modes[text]


def _trusted_proxy(text: str) -> str:
    try:
        parse_trusted_proxies([text])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the web server's options to ``parser``; :func:`trusted_proxies` reads the last one."""
    parser.add_argument(
        "--bind", type=_bind_address, default=("127.0.0.1", 8000), metavar="HOST:PORT",
        help="address of the web server; port 0 picks a free one (default: 127.0.0.1:8000)",
    )
    parser.add_argument("--workers", type=positive, default=2, help="gunicorn worker processes (default: %(default)s)")
    parser.add_argument(
        "--reproxy", type=_reproxy_mode, default=None, metavar="{none,perlbal,nginx}",
        help="answer a trusted proxy with reproxy headers for Perlbal or nginx instead of the bodies, when it "
             "sends Perlbal's X-Proxy-Capabilities or nginx's X-Sendfile-Type (default: none)",
    )
    parser.add_argument(
        "--trusted-proxy", dest="trusted_proxies", action="append", type=_trusted_proxy, metavar="ADDRESS",
        help="address or network of a front proxy that may get reproxy answers, again for more; every other "
             f"client gets the body (default: {' and '.join(LOOPBACK)})",
    )


def trusted_proxies(args: argparse.Namespace) -> Sequence[str]:
    """The ``--trusted-proxy`` values, or :data:`LOOPBACK` when none was given."""
    return args.trusted_proxies or LOOPBACK


def prepare(command: str, args: argparse.Namespace) -> tuple[Any, int]:
    """gunicorn's ``BaseApplication`` for ``command`` (``serve``, ``demo``) and 0, once it may
    start (its ``--trusted-proxy`` goes with ``--reproxy``, gunicorn is there, ``--bind`` is free,
    a temporary directory is there), the package's log then set as gunicorn's; else ``None`` and
    its exit code, having said why on one line of stderr: checked before anything starts, so a
    taken port is one line of error rather than a started cluster and gunicorn's retries."""
    if _trust_without_reproxy(command, args):
        return None, 2
    base = _load_gunicorn(command)
    if base is None or not _can_listen(command, args.bind) or not _has_temporary_directory(command):
        return None, 1
    _log_as_gunicorn()
    return base, 0


def _trust_without_reproxy(command: str, args: argparse.Namespace) -> bool:
    """True, said on one line of stderr, for ``--trusted-proxy`` without ``--reproxy``: serve mode
    trusts no proxy, so it would be ignored."""
    if args.trusted_proxies and args.reproxy is None:
        print(f"{command}: --trusted-proxy goes with --reproxy perlbal or nginx (serve mode trusts no proxy)",
              file=sys.stderr)
        return True
    return False


def _load_gunicorn(command: str) -> Any:
    """gunicorn's ``BaseApplication``, or ``None`` when gunicorn is missing, having said on one line
    of stderr, prefixed with ``command``, which extra installs it."""
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError:
        print(f"{command}: gunicorn is missing: pip install 'mogile_middleware[gunicorn]'", file=sys.stderr)
        return None
    return BaseApplication


def _log_as_gunicorn() -> None:
    """The package's warnings in gunicorn's format for its own lines (time, process, level), as a
    server's log rather than as a command's messages (gunicorn must have loaded)."""
    from gunicorn.glogging import Logger

    formatter = logging.Formatter(Logger.error_fmt, Logger.datefmt)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


def _can_listen(command: str, bind: tuple[str, int]) -> bool:
    """True if ``bind`` is free to listen on; else False, having said why on one line of stderr."""
    host, port = bind
    try:
        socket.create_server(bind, family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
    except OSError as exc:  # its strerror repeats the address: the errno's text alone
        if exc.errno is not None and exc.errno < 0:  # the resolver's (EAI_*), which os.strerror does not know
            reason = (exc.strerror or str(exc)).split(" (while attempting", 1)[0]
        else:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"{command}: cannot listen on {describe_address(host, port)}: {reason}", file=sys.stderr)
        return False
    return True


def _has_temporary_directory(command: str) -> bool:
    """True if there is a temporary directory for gunicorn's workers' files (``TMPDIR``, ``/tmp``...);
    else False, having said which were tried on one line of stderr: gunicorn's master announced
    its address, then stopped with a traceback."""
    try:
        tempfile.gettempdir()
    except OSError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return False
    return True


def serve_until_stopped(
    base: Any, bind: tuple[str, int], workers: int, make_app: Callable[[], WSGIApp], announce: Callable[[str], None]
) -> int:
    """Run a gunicorn master (``base`` is :func:`prepare`'s) on ``bind`` with ``workers``
    until SIGINT or SIGTERM; its exit status.

    Each worker builds its own application with ``make_app`` after the fork, so no tracker
    connection crosses one. ``announce`` gets the base URL (``http://host:port``) once the
    address is bound, with the port chosen when 0 was asked for.
    """

    def when_ready(arbiter: Any) -> None:
        announce("http://" + describe_address(*arbiter.LISTENERS[0].getsockname()[:2]))

    settings: dict[str, Any] = {"bind": [describe_address(*bind)], "workers": workers, "when_ready": when_ready}
    try:
        _gunicorn_master(base, settings, make_app).run()
    except SystemExit as stop:  # how gunicorn's master, and each forked worker, always end
        return int(stop.code or 0)
    return 0


def _gunicorn_master(base: Any, settings: dict[str, Any], make_app: Callable[[], WSGIApp]) -> Any:
    """A gunicorn master with ``settings`` whose workers each load ``make_app()``."""

    class Server(base):  # type: ignore[misc]
        def load_config(self) -> None:
            for name, value in settings.items():
                self.cfg.set(name, value)
            if "control_socket_disable" in self.cfg.settings:  # gunicorn 25.1+ would leave a control socket behind
                self.cfg.set("control_socket_disable", True)

        def load(self) -> WSGIApp:
            return make_app()

    return Server()
