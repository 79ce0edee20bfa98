"""``mogile-middleware demo``: a development MogileFS with sample files, served under gunicorn.

Shows the whole chain at work on one machine: the files are stored with :class:`Client` in an
embedded :class:`DevMogileFS`, and :class:`MogileFSMiddleware` serves them to a browser.
"""

from __future__ import annotations

import argparse
import html
import os
import random
import signal
import socket
import struct
import sys
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from webob import Request, Response
from webob.dec import wsgify
from webob.exc import HTTPNotFound

from ..client import Client
from ..devserver import DevMogileFS
from ..middleware import MogileFSMiddleware, WSGIApp
from .signals import on_stop_signal

DOMAIN = "demo"
CLASSES = {"image": 2, "file": 1}
PREFIX = "/mogilefs/"
VIDEO_SIZE = 8 * 1024 * 1024


def gradient_png(width: int, height: int) -> bytes:
    """A real RGB PNG of a colour gradient, built with ``zlib`` and ``struct`` only."""
    rows = b"".join(
        b"\x00" + bytes(value for x in range(width) for value in (x * 256 // width, y * 256 // height, 160))
        for y in range(height)
    )  # each row starts with filter type 0 (none)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits per channel, RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def sample_files() -> dict[str, tuple[str, bytes]]:
    """The demo's files, key → (class, content); generated here so the repository holds no binaries."""
    return {
        "images/gradient.png": ("image", gradient_png(256, 256)),
        "docs/readme.txt": (
            "file",
            (
                b"These files live in MogileFS: a tracker knows where their replicas are on the storage\n"
                b"nodes, and MogileFSMiddleware streams them from there, ranges included.\n"
            ),
        ),
        "docs/café menu.txt": ("file", "Café crème, crêpes, crème brûlée.\n".encode()),  # a space and non-ASCII
        "videos/sample.mp4": ("file", random.Random(7001).randbytes(VIDEO_SIZE)),  # large enough to seek in
    }


def file_path(key: str, script_name: str = "") -> str:
    """The URL path the middleware serves ``key`` at, percent-encoded."""
    return quote(script_name + PREFIX + key)


class FileIndex:
    """The application behind the middleware: ``/`` lists the domain's files; any other path is a 404."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @wsgify
    def __call__(self, request: Request) -> Response:
        if request.path_info != "/":
            return HTTPNotFound()
        items = []
        for key in self.client.keys():
            info = self.client.file_info(key)
            href = html.escape(file_path(key, request.script_name))
            items.append(
                f'<li><a href="{href}">{html.escape(key)}</a> {info.length} bytes, class {html.escape(info.cls)}</li>'
            )
        page = (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>mogile_middleware demo</title></head>\n'
            f"<body><h1>Files in MogileFS domain {DOMAIN}</h1>\n<ul>\n" + "\n".join(items) + "\n</ul></body></html>\n"
        )
        return Response(page, content_type="text/html", charset="utf-8")


def demo_app(trackers: list[str], reproxy: str | None) -> MogileFSMiddleware:
    """The served application: the file index, with the middleware answering under ``PREFIX``."""
    client = Client(DOMAIN, trackers)
    return MogileFSMiddleware(FileIndex(client), client=client, prefix=PREFIX, reproxy=reproxy)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host, int(port)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    parser.add_argument(
        "--bind", type=_bind_address, default=("127.0.0.1", 8000), metavar="HOST:PORT",
        help="address of the web server (default: 127.0.0.1:8000)",
    )
    parser.add_argument("--workers", type=_positive, default=2, help="gunicorn worker processes (default: %(default)s)")
    parser.add_argument(
        "--reproxy", choices=["none", "perlbal", "nginx"], default="none",
        help="answer with reproxy headers for a Perlbal or nginx in front instead of the bodies (default: none)",
    )
    parser.add_argument(
        "--data", metavar="DIR", help="MogileFS data directory, kept between runs (default: a temporary one)"
    )


def run(args: argparse.Namespace) -> int:
    """Store the sample files and serve them until SIGINT or SIGTERM; 0 on a clean stop, 1 if it cannot start."""
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError:
        print("demo: gunicorn is missing: pip install 'mogile_middleware[gunicorn]'", file=sys.stderr)
        return 1
    host, port = args.bind
    try:
        # Checked first, so a taken port is one line of error rather than a started cluster and gunicorn's retries.
        socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
    except OSError as exc:
        print(f"demo: cannot listen on {_host_port(host, port)}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    master = os.getpid()
    mogile = DevMogileFS(args.data, domains={DOMAIN: CLASSES})
    # Until gunicorn installs its own handlers, SIGTERM interrupts like Ctrl-C, so the finally below still runs.
    with on_stop_signal(signal.default_int_handler):
        try:
            try:
                mogile.start()
            except OSError as exc:
                print(f"demo: cannot start the development MogileFS: {exc}", file=sys.stderr)
                return 1
            keys = _store_samples(Client(DOMAIN, mogile.trackers))
            print(f"tracker {mogile.trackers[0]}", flush=True)

            def announce(arbiter: Any) -> None:  # gunicorn's when_ready hook: the address is bound by now
                base = "http://" + _host_port(*arbiter.LISTENERS[0].getsockname()[:2])
                for key in keys:
                    print(f"file {base}{file_path(key)}")
                print(f"page {base}/", flush=True)  # last, where it is seen

            settings: dict[str, Any] = {
                "bind": [_host_port(host, port)], "workers": args.workers, "when_ready": announce,
            }
            reproxy = None if args.reproxy == "none" else args.reproxy
            try:
                _gunicorn_master(BaseApplication, settings, lambda: demo_app(mogile.trackers, reproxy)).run()
            except SystemExit as stop:  # how gunicorn's master, and each forked worker, always end
                return int(stop.code or 0)
            return 0
        finally:
            if os.getpid() == master:  # forked workers leave through this frame too; the master owns the cluster
                mogile.stop()


def _store_samples(client: Client) -> list[str]:
    """Store the :func:`sample_files` with ``client``, then close it; the keys stored."""
    samples = sample_files()
    try:
        for key, (cls, content) in samples.items():
            client.store_content(key, content, cls)
    finally:
        client.close()
    return list(samples)


def _gunicorn_master(base: Any, settings: dict[str, Any], make_app: Callable[[], WSGIApp]) -> Any:
    """A gunicorn master (``base`` is gunicorn's ``BaseApplication``) with ``settings``; each
    worker builds its own application with ``make_app``, so no tracker connection crosses a fork."""

    class DemoServer(base):  # type: ignore[misc]
        def load_config(self) -> None:
            for name, value in settings.items():
                self.cfg.set(name, value)
            if "control_socket_disable" in self.cfg.settings:  # gunicorn 25.1+ would leave a control socket behind
                self.cfg.set("control_socket_disable", True)

        def load(self) -> WSGIApp:
            return make_app()

    return DemoServer()
