r"""A development tracker speaking mogilefsd's line protocol over TCP (one thread per connection).

For development and tests only, not a replacement for mogilefsd. Framing is mogilefsd's: a line
ends at ``\n`` (one ``\r`` before it is dropped, a ``\r`` elsewhere stays in the line), empty
lines get no reply, pipelined lines get one reply each in order, nothing is answered before the
line end arrives. Lines starting with ``!`` are admin lines answered with lines ending in ``.``.
A line longer than :data:`MAX_LINE` closes that connection; nothing a client sends can stop the
server. Storage is reached only over HTTP, so external storage nodes can be registered too.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time

from .admin import ADMIN_COMMANDS
from .commands import FILE_COMMANDS
from .dispatch import Context, Handler, respond
from .metadata import MetadataStore
from .monitor import DeviceMonitor
from .netutil import CHUNK_SIZE, BackgroundServer, TrackingThreadingMixIn
from .replication import BackgroundWork, Repairer

#: The longest request line accepted; a connection sending more without a line end is closed.
MAX_LINE = 64 * 1024
#: What ``!version`` answers: the mogilefsd release whose protocol this tracker speaks.
PROTOCOL_VERSION = "2.73"


class _Connection(socketserver.BaseRequestHandler):
    """Reads request lines from one client and writes one reply per line, in order."""

    server: _TCPServer

    def handle(self) -> None:
        """Serve the connection until the client leaves or sends an oversized line."""
        sock: socket.socket = self.request
        pending = bytearray()
        try:
            while data := sock.recv(CHUNK_SIZE):
                pending += data
                while (end := pending.find(b"\n")) >= 0:
                    line = bytes(pending[:end])
                    del pending[: end + 1]
                    if line.endswith(b"\r"):
                        line = line[:-1]
                    if len(line) > MAX_LINE:
                        return
                    if line:
                        sock.sendall(self.server.tracker.answer(line))
                if len(pending) > MAX_LINE:
                    return
        except OSError:
            return


class _TCPServer(TrackingThreadingMixIn, socketserver.TCPServer):
    """The listening side; every connection is served by :class:`_Connection` in its own thread."""

    request_queue_size = 128

    def __init__(self, address: tuple[str, int], tracker: TrackerServer) -> None:
        self.tracker = tracker
        super().__init__(address, _Connection)


class TrackerServer(BackgroundServer):
    """The development tracker: metadata in ``store``, devices watched by a monitor thread.

    For development and tests only. :meth:`stop` also cuts open client connections (as a dead
    tracker would) and drops the delayed work not yet due; :meth:`start` serves again on the
    same port. ``replication_delay`` (seconds, 0: synchronous) delays the copies up to
    mindevcount and the deletion of dropped data, as mogilefsd's background jobs do.
    """

    def __init__(
        self, store: MetadataStore, host: str = "127.0.0.1", port: int = 0, *, replication_delay: float = 0.0
    ) -> None:
        super().__init__(host, port)
        self.store = store
        self.monitor = DeviceMonitor(store, on_recovery=self._request_repair)
        self._context = Context(store, self.monitor, BackgroundWork(replication_delay))
        self._repairer = Repairer(self._context)
        self._handlers: dict[str, Handler] = {**FILE_COMMANDS, **ADMIN_COMMANDS}
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
