"""Many slow clients downloading one file from a real server at once, and what the server holds
open for them on the storage node (shared by the uvicorn and the gevent tests).

A slow client here is one that has read its first :data:`FIRST_BYTES` and then stops reading:
with its receive buffer that small, the server soon cannot send it more, and a server that
gave each download a thread (or blocked on one) would show it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from mogile_middleware import Client

#: What every client reads before it stops: enough to show its response has started.
FIRST_BYTES = 64 * 1024


def storage_port(client: Client, key: str) -> int:
    """The port of the one storage node that holds ``key`` (stored in a class of one copy)."""
    [port] = {urlsplit(path).port for path in client.get_paths(key)}
    assert port is not None
    return port


def node_connections(port: int) -> int:
    """Established TCP connections to the loopback ``port`` (from /proc/net/tcp)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01":  # 01: ESTABLISHED
            count += 1
    return count


def thread_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


@contextmanager
def slow_downloads(port: int, path: str, count: int, *, timeout: float = 15.0) -> Iterator[list[socket.socket]]:
    """``count`` clients that have each sent ``GET path`` to ``127.0.0.1:port`` and read nothing
    yet, with a receive buffer of :data:`FIRST_BYTES`; every one is closed on exit."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, FIRST_BYTES)  # before connecting, to count
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", port))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: media\r\n\r\n".encode())
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def read_first_bytes(sock: socket.socket) -> bytes:
    """The first :data:`FIRST_BYTES` of the response on ``sock`` (its head included)."""
    received = b""
    while len(received) < FIRST_BYTES:
        chunk = sock.recv(FIRST_BYTES)
        if not chunk:
            raise ConnectionError(f"closed after {len(received)} bytes: {received[:200]!r}")
        received += chunk
    return received
