"""``python -m bench.relay PORT URL``: the ceiling of any server that copies a storage node's bytes.

Each connection gets the response to a GET of ``URL``, passed on as it arrives (1 MiB
``recv_into`` and ``sendall``), with no HTTP done on either side. Serve mode costs the same two
copies through user space on top of a direct GET (where the node ``sendfile``\\ s the file), so
what this relay reaches is what serve mode could reach with nothing else to do.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from urllib.parse import urlsplit

from .servers import HOST

BUFFER = 1024 * 1024


def relay(client: socket.socket, url: str) -> None:
    """Read the client's request head, then relay the node's whole response to ``url``."""
    parts = urlsplit(url)
    if not client.recv(BUFFER):
        return  # a readiness probe, which connects and closes
    with socket.create_connection((parts.hostname or "", parts.port or 80)) as node:
        node.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
        buffer = bytearray(BUFFER)
        view = memoryview(buffer)
        while count := node.recv_into(buffer):
            client.sendall(view[:count])


def main() -> None:
    port, url = int(sys.argv[1]), sys.argv[2]
    with socket.create_server((HOST, port)) as listener:
        while True:  # one client at a time; stopped by the benchmark with SIGTERM
            client, _ = listener.accept()
            with client, contextlib.suppress(OSError):  # a client that left early
                relay(client, url)


if __name__ == "__main__":
    main()
