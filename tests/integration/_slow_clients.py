"""Many slow clients downloading one file from a real server at once, and what the server holds
open for them on the storage node (shared by the uvicorn and the gevent tests).

A slow client here is one that has read its first :data:`FIRST_BYTES` and then stops reading:
with its receive buffer that small, the server soon cannot send it more, and a server that
gave each download a thread (or blocked on one) would show it.
"""

from __future__ import annotations

import os
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


def node_connections(port: int, pid: int | None = None) -> int:
    """Established TCP connections to the loopback ``port`` (from /proc/net/tcp); with ``pid``, only
    those of that process (the node's own monitor, in the test's process, connects every 0.5 s)."""
    sockets = None if pid is None else _socket_inodes(pid)
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] != "01":  # 01: ESTABLISHED
            continue
        if sockets is None:
            count += int(fields[1].split(":")[1], 16) == port  # the node's side
        else:
            count += int(fields[2].split(":")[1], 16) == port and fields[9] in sockets  # the process's side
    return count


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


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
