"""Plumbing shared by the development tracker and storage nodes.

A :class:`BackgroundServer` runs a ``socketserver`` server in a daemon thread, can be stopped and
started again on the same port, and on stop also closes the connections it is serving, so a
stopped node or tracker really looks dead to its clients (as a killed process would).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
import time
from typing import Any

from ..throttle import ThrottledLog

log = logging.getLogger(__name__)

#: Size of every read and write when bodies are streamed: memory stays flat with file size.
CHUNK_SIZE = 64 * 1024
#: The longest a stop waits for a server's loop and its thread to end.
STOP_SECONDS = 5.0
#: Connections refused while full are logged once per this many seconds, counting the others.
REFUSALS_LOG_INTERVAL = 10.0


class TrackingThreadingMixIn(socketserver.ThreadingMixIn):
    """A threading server that remembers its open connections so :meth:`close_connections` can cut them.

    With ``max_connections`` set, a connection arriving while that many are served is closed at
    once rather than left in the kernel backlog: its client fails over to another server at once
    instead of hanging until some other connection ends.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    max_connections: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        # Written by the accepting thread: a line per refusal filled a stderr nobody read, and the
        # write that then waited stopped the accepting, and the server's stop.
        self._refusals = ThrottledLog(log, logging.WARNING, "%d connections open: refusing %s", REFUSALS_LOG_INTERVAL,
                                      "refusals")
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Remember the connection and serve it in a thread, or close it when the server is full."""
        with self._connections_lock:
            full = self.max_connections is not None and len(self._connections) >= self.max_connections
            if not full:
                self._connections.add(request)
        if full:
            self._refusals.event(self.max_connections, client_address)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        """Forget the connection and close it."""
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)  # type: ignore[misc]  # BaseServer provides it

    def close_connections(self) -> None:
        """Shut down every connection still open, so the threads serving them end."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a handler failure quietly: a bad client must never make noise or stop the server."""
        log.debug("error while serving %s", client_address, exc_info=True)


class BackgroundServer:
    """A ``socketserver`` server run in a daemon thread; restartable on the port it first got."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None

    def _make_server(self) -> socketserver.BaseServer:
        """Build the (bound, listening) server; subclasses say which one."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._server is not None

    def start(self) -> None:
        """Bind and serve in the background (on the same port as before when restarted)."""
        if self._server is not None:
            return
        try:
            server = self._make_server()
        except OSError as error:  # name the address: the bind error itself does not
            raise type(error)(error.errno, f"cannot listen on {self.host}:{self.port}: "
                                           f"{error.strerror or error}") from error
        address = server.server_address
        assert isinstance(address, tuple)
        self.port = int(address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"{type(self).__name__}:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, close the listening socket and cut every open connection."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        # shutdown() waits for the serving loop to come round, which one stuck in a write (a full
        # stderr pipe) never does: the socket is closed after STOP_SECONDS all the same.
        shutting_down = threading.Thread(target=server.shutdown, name=f"stop:{self.port}", daemon=True)
        shutting_down.start()
        deadline = time.monotonic() + STOP_SECONDS
        shutting_down.join(timeout=STOP_SECONDS)
        server.server_close()
        if isinstance(server, TrackingThreadingMixIn):
            server.close_connections()
        if thread is not None:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
