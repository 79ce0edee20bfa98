"""``mogile-middleware demo``: a development MogileFS with sample files, served under gunicorn.

Shows the whole chain at work on one machine: the files are stored with :class:`Client` in an
embedded :class:`DevMogileFS`, and :class:`MogileFSMiddleware` serves them to a browser.
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import zlib

from ..client import Client
from ..devserver import DevMogileFS
from ..middleware import WSGIApp
from .commands import path_argument
from .gunicorn import add_server_arguments, prepare, serve_until_stopped, trusted_proxies
from .serve import file_path, index_app

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``: the web server's, and where to keep the data."""
    add_server_arguments(parser)
    parser.add_argument(
        "--data", metavar="DIR", type=path_argument,
        help="MogileFS data directory, kept between runs (default: a temporary one)"
    )


def run(args: argparse.Namespace) -> int:
    """Store the sample files and serve them until SIGINT or SIGTERM; 0 on a clean stop, 1 if it cannot start."""
    base, refused = prepare("demo", args)
    if base is None:
        return refused
    master = os.getpid()
    mogile = DevMogileFS(args.data, domains={DOMAIN: CLASSES})
    # SIGINT and SIGTERM unwind through the finally below until gunicorn installs its own handlers
    # (the command line's, which give the exit code of the signal).
    try:
        try:
            mogile.start()
        except OSError as exc:
            print(f"demo: cannot start the development MogileFS: {exc}", file=sys.stderr)
            return 1
        keys = _store_samples(Client(DOMAIN, mogile.trackers))
        print(f"tracker {mogile.trackers[0]}", flush=True)

        def announce(url: str) -> None:
            for key in keys:
                print(f"file {url}{file_path(PREFIX, key)}")
            print(f"page {url}/", flush=True)  # last, where it is seen

        def make_app() -> WSGIApp:
            return index_app(Client(DOMAIN, mogile.trackers), PREFIX, args.reproxy, trusted_proxies(args))

        return serve_until_stopped(base, args.bind, args.workers, make_app, announce)
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
