"""A development storage node that answers HTTP the way mogstored (Perlbal 1.80 web_server) does.

For development and tests only. It serves one docroot (holding ``dev<N>/`` directories) with
GET/HEAD (single ranges, If-Modified-Since), PUT (atomic: written to a temporary file and renamed
into place once the whole body arrived), DELETE, and refuses MKCOL, like the real node. Every
device directory has mogstored's disk usage file, ``devN/usage``, written when it is requested
and older than 10 seconds (see :mod:`.diskusage`). Bodies are streamed in bounded chunks, so
memory stays flat whatever the file size. A connection is closed when it waits ``idle_timeout``
for data, or when a request line and headers take longer than ``head_timeout`` from their first
byte (so a half-sent request cannot hold a thread).
"""

from __future__ import annotations

import email.utils
import errno
import http.server
import io
import logging
import os
import re
import socket
import socketserver
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote

from ..http import storage_node_range
from ..throttle import ThrottledLog
from . import diskusage
from .netutil import CHUNK_SIZE, REFUSALS_LOG_INTERVAL, BackgroundServer, TrackingThreadingMixIn

log = logging.getLogger(__name__)

#: Write errors of a full disk (or quota), logged as a warning: the client sees its PUT dropped.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

_REASONS = {
    200: "OK",
    204: "No Content",
    206: "Partial Content",
    304: "Not Modified",
    400: "Bad request",
    404: "Not Found",
    416: "Request range not satisfiable",
    500: "Internal Server Error",
    507: "Insufficient Storage",
}
_DEVICE_DIRECTORY = re.compile(r"dev\d+")


class _BodyCut(Exception):
    """The client went away before the whole request body arrived."""


class _SocketReader(io.RawIOBase):
    """Reads a socket waiting ``idle_timeout`` per read, and a request head ``head_timeout`` from its first byte.

    The deadline covers the whole head, so a client trickling a byte at a time is cut too.
    """

    def __init__(self, sock: socket.socket, idle_timeout: float, head_timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self._idle_timeout = idle_timeout
        self._head_timeout = head_timeout
        self._in_head = False
        self._head_deadline: float | None = None

    def readable(self) -> bool:
        return True

    def start_head(self) -> None:
        """The next bytes begin a request head: its deadline starts with the first of them."""
        self._in_head, self._head_deadline = True, None

    def end_head(self) -> None:
        """The head is read: the body and the next request wait ``idle_timeout`` per read again."""
        self._in_head, self._head_deadline = False, None
        self._sock.settimeout(self._idle_timeout)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]  # any writable buffer
        if self._head_deadline is not None:
            self._sock.settimeout(max(self._head_deadline - time.monotonic(), 0.001))
        count = self._sock.recv_into(buffer)
        if self._in_head and self._head_deadline is None:
            self._head_deadline = time.monotonic() + self._head_timeout
        return count


class _Handler(http.server.BaseHTTPRequestHandler):
    """One client connection; HTTP/1.0 status lines, keep-alive unless the client asks to close."""

    protocol_version = "HTTP/1.0"
    #: Headers and body leave in separate writes: without TCP_NODELAY, a kept-alive client's
    #: next response would wait for its delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    server_version = "mogile-middleware-devserver"
    sys_version = ""
    server: _HTTPServer
    _reader: _SocketReader

    # -- plumbing -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Read through a :class:`_SocketReader`, so request heads have a deadline."""
        self.timeout = self.server.idle_timeout
        super().setup()
        self.rfile.close()  # the plain reader made by StreamRequestHandler; the socket stays open
        self._reader = _SocketReader(self.connection, self.server.idle_timeout, self.server.head_timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        """Serve one request, its head read within ``head_timeout``."""
        self._reader.start_head()
        super().handle_one_request()

    def parse_request(self) -> bool:
        """Parse the request line and headers; reading them is done, the head deadline ends."""
        parsed = super().parse_request()
        self._reader.end_head()
        return parsed

    def log_message(self, format: str, *args: object) -> None:
        """Access log lines go to the debug log, not to stderr."""
        log.debug("%s %r", self.address_string(), format % args)

    def version_string(self) -> str:
        """The Server header."""
        return self.server_version

    def _keep_alive(self) -> bool:
        connection = self.headers.get("Connection", "").lower()
        if self.request_version == "HTTP/1.1":
            return connection != "close"
        return connection == "keep-alive"

    def _start(self, code: int, headers: list[tuple[str, str | int]], close: bool = False) -> None:
        """Send the status line and headers; ``close`` ends the connection after this response."""
        self.close_connection = close or not self._keep_alive()
        self.send_response(code, _REASONS.get(code, ""))
        for name, value in headers:
            self.send_header(name, str(value))
        if self.close_connection:
            self.send_header("Connection", "close")
        else:
            self.send_header("Connection", "keep-alive")
            self.send_header("Keep-Alive", f"timeout={self.timeout:g}, max=100")
        self.end_headers()

    def _page(self, code: int, extra: str = "", close: bool = False) -> None:
        body = f"<h1>{code} - {_REASONS[code]}</h1>\n{extra}".encode()
        self._start(code, [("Content-Type", "text/html"), ("Content-Length", len(body))], close)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _local_path(self) -> Path | None:
        """The file a request path names under the docroot; ``None`` for paths escaping it."""
        parts = [part for part in unquote(self.path.split("?", 1)[0]).split("/") if part]
        if any(part in (".", "..") or "\x00" in part for part in parts):
            return None
        return self.server.docroot.joinpath(*parts)

    # -- GET and HEAD -------------------------------------------------------------------------

    def do_GET(self) -> None:
        """Send a file (whole, or one byte range), a directory notice or a 404."""
        path = self._local_path()
        if path is None:
            self._page(400, close=True)
            return
        if path.is_dir():
            self._page(200, "Directory listing disabled")
            return
        if self._is_usage_file(path):
            try:
                diskusage.refresh(path.parent)
            except OSError as error:  # a full disk: the figures of now, which the file could not take
                self.server.usage_unwritten.event(str(path), error)
                usage = diskusage.format_usage(diskusage.measure(path.parent))
                self._send_file(io.BytesIO(usage), len(usage), time.time())
                return
        try:
            stream = path.open("rb")
        except OSError:
            self._page(404)
            return
        with stream:
            stat = os.fstat(stream.fileno())
            self._send_file(stream, stat.st_size, stat.st_mtime)

    do_HEAD = do_GET

    def _is_usage_file(self, path: Path) -> bool:
        """Whether ``path`` is the usage file of an existing device directory (``<docroot>/devN/usage``)."""
        directory = path.parent
        return (
            path.name == diskusage.USAGE_FILE
            and directory.parent == self.server.docroot
            and _DEVICE_DIRECTORY.fullmatch(directory.name) is not None
            and directory.is_dir()
        )

    def _send_file(self, stream: BinaryIO, size: int, modified: float) -> None:
        last_modified = email.utils.formatdate(modified, usegmt=True)
        common: list[tuple[str, str | int]] = [("Last-Modified", last_modified), ("Accept-Ranges", "bytes")]
        if self.headers.get("If-Modified-Since") == last_modified:
            self._start(304, common)
            return
        status, first, last = storage_node_range(self.headers.get("Range"), size)
        if status == 416:
            self._start(416, [("Content-Range", f"bytes */{size}"), ("Content-Length", 0), *common])
            return
        headers = [*common, ("Content-Type", "text/plain")]
        if status == 206:
            headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
        length = max(last - first + 1, 0)
        self._start(status, [*headers, ("Content-Length", length)])
        if self.command == "HEAD":
            return
        stream.seek(first)
        while length > 0:
            chunk = stream.read(min(CHUNK_SIZE, length))
            if not chunk:
                self.close_connection = True  # the file shrank under us; the client sees a short body
                return
            self.wfile.write(chunk)
            length -= len(chunk)

    # -- PUT, DELETE, MKCOL -------------------------------------------------------------------

    def do_PUT(self) -> None:
        """Store the body at the path, creating directories; the file appears only when complete."""
        path = self._local_path()
        if path is None or path.parent == self.server.docroot or path == self.server.docroot:
            self._page(400, "" if path is None else "Does not meet minimum directory requirement", close=True)
            return
        # As mogstored's min_put_directory = 1: the device's directory must be there; deeper ones are made.
        if not self.server.docroot.joinpath(path.relative_to(self.server.docroot).parts[0]).is_dir():
            self._page(404, "Base directory does not exist", close=True)
            return
        declared = self.headers.get("Content-Length", "").strip()
        if declared.startswith("-") and declared[1:].isdigit():  # taken for an empty body, a file stored
            self._page(400, f"Content-length of {int(declared)} is invalid.", close=True)
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as error:
            if error.errno in _DISK_FULL:  # no room for a directory or a file's inode
                log.warning("PUT %r not stored: %s", self.path, error)
                self._page(507, close=True)
                return
            log.warning("cannot write under %r", str(path.parent), exc_info=True)
            self._page(500, close=True)
            return
        try:
            with os.fdopen(fd, "wb") as out:
                self._receive_body(out)
        except (_BodyCut, OSError, ValueError) as exc:
            _discard(temp_name)
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:  # the node's failure, not the client's
                log.warning("PUT %r not stored: %s", self.path, exc)
                self._page(507, close=True)  # read by the client before the body it still sends
                return
            log.debug("PUT %r abandoned: %r", self.path, exc)
            self.close_connection = True  # the client is gone or sent garbage: no answer
            return
        try:
            os.chmod(temp_name, 0o644)
            os.replace(temp_name, path)
        except OSError:
            log.warning("cannot store %r", str(path), exc_info=True)
            _discard(temp_name)
            self._page(500, close=True)
            return
        self._page(200)

    def _receive_body(self, out: BinaryIO) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := self._chunk_size():
                self._copy_body(out, size)
                self.rfile.readline(1024)
            while self.rfile.readline(1024).strip():  # trailers, then the blank line
                pass
        else:
            self._copy_body(out, int(self.headers.get("Content-Length") or 0))

    def _chunk_size(self) -> int:
        line = self.rfile.readline(1024)
        if not line:
            raise _BodyCut("chunked body cut")
        return int(line.split(b";")[0].strip(), 16)

    def _copy_body(self, out: BinaryIO, remaining: int) -> None:
        while remaining > 0:
            chunk = self.rfile.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                raise _BodyCut(f"{remaining} bytes missing")
            out.write(chunk)
            remaining -= len(chunk)

    def do_DELETE(self) -> None:
        """Remove a file: 204, or 404 when there is none; as mogstored, a path ending in ``/`` or
        naming a directory is refused (400)."""
        path = self._local_path()
        if self.path.split("?", 1)[0].endswith("/"):
            self._page(400, "Invalid filename", close=True)
            return
        if path is not None and path.is_dir():
            self._page(400, "Is a directory", close=True)
            return
        try:
            if path is None or not path.is_file():
                raise FileNotFoundError(self.path)
            path.unlink()
        except OSError:
            self._page(404)
            return
        self._start(204, [])

    def do_MKCOL(self) -> None:
        """Refuse, as mogstored does (the tracker then relies on PUT creating directories)."""
        self._page(400, close=True)


def _discard(name: str) -> None:
    with suppress(OSError):
        os.unlink(name)


class _HTTPServer(TrackingThreadingMixIn, http.server.HTTPServer):
    """A threaded HTTP server that knows its docroot and its handlers' timeouts."""

    #: A burst of clients waits in the backlog (socketserver's default, 5, drops connections).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], docroot: Path, idle_timeout: float, head_timeout: float) -> None:
        self.docroot = docroot
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        # The tracker asks for each device's usage file twice a second: one line per 10 s at most.
        self.usage_unwritten = ThrottledLog(log, logging.WARNING, "cannot write %r: %s", REFUSALS_LOG_INTERVAL,
                                            "usage files")
        super().__init__(address, _Handler)


class StorageNode(BackgroundServer):
    """A storage node serving ``docroot`` (which holds ``dev<N>/``) at ``http://host:port``.

    For development and tests only. :meth:`stop` makes it unreachable (connections cut),
    :meth:`start` brings it back on the same port.

    :param idle_timeout: seconds a connection may wait for data (between keep-alive requests, or
        for the next piece of a body) before it is closed; 30 by default, as Perlbal does.
    :param head_timeout: seconds a request line and headers may take from their first byte; 10
        by default, so half-sent requests do not hold a thread each.
    """

    def __init__(
        self,
        docroot: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        idle_timeout: float = 30.0,
        head_timeout: float = 10.0,
    ) -> None:
        if idle_timeout <= 0 or head_timeout <= 0:
            raise ValueError(f"timeouts must be positive: idle {idle_timeout}, head {head_timeout}")
        super().__init__(host, port)
        self.docroot = Path(docroot).resolve()
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout

    @property
    def url(self) -> str:
        """The node's base URL, ``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def _make_server(self) -> socketserver.BaseServer:
        self.docroot.mkdir(parents=True, exist_ok=True)
        return _HTTPServer((self.host, self.port), self.docroot, self.idle_timeout, self.head_timeout)
