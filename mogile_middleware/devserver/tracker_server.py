r"""A development tracker speaking mogilefsd's line protocol over TCP (one thread per connection).

For development and tests only, not a replacement for mogilefsd. Framing is mogilefsd's: a line
ends at ``\n`` (one ``\r`` before it is dropped, a ``\r`` elsewhere stays in the line), empty
lines get no reply, pipelined lines get one reply each in order, nothing is answered before the
line end arrives. Lines starting with ``!`` are admin lines answered with lines ending in ``.``.
A connection is closed on a line longer than :data:`MAX_LINE`, after ``idle_timeout`` (if one
is set) without a line, or when a line is not complete, or a reply not read, ``line_timeout``
after it began; connections beyond ``max_connections`` are closed at once (see
:class:`TrackerServer`). Nothing a client sends can stop the server. Storage is reached only
over HTTP, so external storage nodes can be registered too.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time

from .admin import ADMIN_COMMANDS
from .commands import FILE_COMMANDS
from .dispatch import Context, Handler, respond
from .hosts import HOST_COMMANDS
from .metadata import MetadataStore
from .monitor import DeviceMonitor
from .netutil import CHUNK_SIZE, BackgroundServer, TrackingThreadingMixIn
from .replication import BackgroundWork, Repairer
from .settings import SETTINGS_COMMANDS

#: The longest request line accepted; a connection sending more without a line end is closed.
MAX_LINE = 64 * 1024
#: What ``!version`` answers: the mogilefsd release whose protocol this tracker speaks.
PROTOCOL_VERSION = "2.73"


class _Connection(socketserver.BaseRequestHandler):
    """Reads request lines from one client and writes one reply per line, in order."""

    server: _TCPServer

    def handle(self) -> None:
        """Serve the connection until the client leaves, times out or sends an oversized line."""
        sock: socket.socket = self.request
        tracker = self.server.tracker
        pending = bytearray()
        line_deadline = 0.0  # when the partial line in ``pending`` must be complete
        try:
            while True:
                if pending:
                    sock.settimeout(max(line_deadline - time.monotonic(), 0.001))
                else:
                    sock.settimeout(tracker.idle_timeout)
                data = sock.recv(CHUNK_SIZE)
                if not data:
                    return
                new_line = not pending
                pending += data
                while (end := pending.find(b"\n")) >= 0:
                    new_line = True
                    line = bytes(pending[:end])
                    del pending[: end + 1]
                    if line.endswith(b"\r"):
                        line = line[:-1]
                    if len(line) > MAX_LINE:
                        return
                    if line:
                        sock.settimeout(tracker.line_timeout)  # a client not reading its replies is cut too
                        sock.sendall(tracker.answer(line))
                if len(pending) > MAX_LINE:
                    return
                if new_line:
                    line_deadline = time.monotonic() + tracker.line_timeout
        except OSError:  # TimeoutError included
            return


class _TCPServer(TrackingThreadingMixIn, socketserver.TCPServer):
    """The listening side; every connection is served by :class:`_Connection` in its own thread."""

    request_queue_size = 128

    def __init__(self, address: tuple[str, int], tracker: TrackerServer) -> None:
        self.tracker = tracker
        self.max_connections = tracker.max_connections
        super().__init__(address, _Connection)


def check_delays(replication_delay: float, overwrite_gap: float) -> None:
    """Refuse a negative ``replication_delay`` or ``overwrite_gap`` (see :class:`TrackerServer`)."""
    if replication_delay < 0 or overwrite_gap < 0:
        raise ValueError(f"delays cannot be negative: replication {replication_delay}, overwrite {overwrite_gap}")


class TrackerServer(BackgroundServer):
    """The development tracker: metadata in ``store``, devices watched by a monitor thread.

    For development and tests only. :meth:`stop` also cuts open client connections (as a dead
    tracker would) and drops the delayed work not yet due; :meth:`start` serves again on the
    same port.

    :param replication_delay: seconds (0: synchronous) by which the copies up to mindevcount and
        the deletion of dropped data are delayed, as mogilefsd's background jobs do.
    :param overwrite_gap: seconds (0: none) between dropping the file an overwrite replaces and
        recording the new one, during which the key is unknown, as in mogilefsd's ``create_close``.
    :param idle_timeout: seconds a connection may wait between lines before it is closed; none
        by default, as mogilefsd closes no idle connection: MogileFS::Client keeps one open
        between requests, and dies on its next one when it was closed.
    :param line_timeout: seconds a line may take from its first byte to its line end, and a reply
        to be read; 10 by default, so half-sent lines and unread replies do not hold a thread each.
    :param max_connections: connections served at once (one thread each); 200 by default. Any
        more are closed as soon as they are accepted, so the client fails over to another
        tracker; connections already served are not affected.
    """

    def __init__(
        self,
        store: MetadataStore,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        replication_delay: float = 0.0,
        overwrite_gap: float = 0.0,
        idle_timeout: float | None = None,
        line_timeout: float = 10.0,
        max_connections: int = 200,
    ) -> None:
        if (idle_timeout is not None and idle_timeout <= 0) or line_timeout <= 0:
            raise ValueError(f"timeouts must be positive: idle {idle_timeout}, line {line_timeout}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1: {max_connections}")
        check_delays(replication_delay, overwrite_gap)
        super().__init__(host, port)
        self.idle_timeout = idle_timeout
        self.line_timeout = line_timeout
        self.max_connections = max_connections
        self.store = store
        self.monitor = DeviceMonitor(store, on_recovery=self._request_repair)
        self._context = Context(store, self.monitor, BackgroundWork(replication_delay), overwrite_gap)
        self._repairer = Repairer(self._context)
        self._handlers: dict[str, Handler] = {**FILE_COMMANDS, **ADMIN_COMMANDS, **HOST_COMMANDS, **SETTINGS_COMMANDS}
        self._started = time.monotonic()
        self._queries = 0
        self._queries_lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the tracker listens on."""
        return self.host, self.port

    def _make_server(self) -> socketserver.BaseServer:
        return _TCPServer((self.host, self.port), self)

    def start(self) -> None:
        """Check the devices once, then serve and keep watching them (and repairing replica counts)."""
        if self.running:
            return
        self._context.work.start()
        self._repairer.start()
        self.monitor.start()
        super().start()

    def stop(self) -> None:
        """Stop serving, watching, repairing and the delayed work."""
        super().stop()
        self.monitor.stop()
        self._repairer.stop()
        self._context.work.stop()

    def _request_repair(self) -> None:
        self._repairer.request()

    def answer(self, line: bytes) -> bytes:
        """The reply to one request line (without its line end)."""
        with self._queries_lock:
            self._queries += 1
        if line.startswith(b"!"):
            return self._admin(line[1:].strip().lower())
        return respond(self._context, self._handlers, line)

    def _admin(self, command: bytes) -> bytes:
        if command == b"version":
            lines = [PROTOCOL_VERSION]
        elif command == b"stats":
            lines = [f"uptime {int(time.monotonic() - self._started)}", f"queries {self._queries}"]
        else:
            lines = ["Unknown command; try !version or !stats"]
        return "".join(f"{line}\r\n" for line in [*lines, "."]).encode("ascii")
