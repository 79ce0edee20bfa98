"""HTTP to MogileFS storage nodes: streaming GET with replica failover, and streaming PUT.

Storage nodes (``mogstored``) are plain HTTP servers. Bodies move in bounded chunks, so memory
stays flat whatever the file size. A GET's connection is kept open for the next request to the
same node (:mod:`.nodepool`) once its body was read to the end; closing a response early closes it.
"""

from __future__ import annotations

import functools
import http.client
import io
import socket
import time
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

from . import metrics
from .deadline import DeadlineReader, time_left
from .exceptions import StorageError
from .nodepool import Node, NodePool, nodes

#: Bytes moved per read or write: large enough for throughput, small enough to stay flat.
CHUNK_SIZE = 64 * 1024


def _connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """An unconnected connection to the node of ``url`` and the path to ask it for."""
    try:
        parts = urlsplit(url)
        port = parts.port  # a ValueError for a port out of range or not a number
    except ValueError as error:
        raise StorageError(f"bad storage URL {url!r}: {error}", url) from None
    if parts.scheme != "http" or not parts.hostname:
        raise StorageError(f"not an http:// storage URL: {url!r}", url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return http.client.HTTPConnection(parts.hostname, port or 80, timeout=timeout), path


class _HeadByDeadline(http.client.HTTPResponse):
    """A response whose status line and headers must all have arrived by ``deadline`` (a
    :func:`time.monotonic` time), however slowly they trickle in; each read of the body then
    waits up to ``read_timeout`` again, so a slow but live transfer goes on."""

    def __init__(self, sock: socket.socket, *args: object, deadline: float, read_timeout: float,
                 **kwargs: object) -> None:
        super().__init__(sock, *args, **kwargs)  # type: ignore[arg-type]
        self.fp.close()  # http.client's reader: replaced by one that keeps the deadline
        self._head_reader = DeadlineReader(sock, deadline)
        self.fp = io.BufferedReader(self._head_reader)
        self._read_timeout = read_timeout

    def begin(self) -> None:
        super().begin()
        self._head_reader.deadline = None
        self._head_reader.sock.settimeout(self._read_timeout)


def _get(url: str, method: str, headers: dict[str, str], timeout: float, pool: NodePool
         ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send ``method`` to ``url`` and read the response head, all within ``timeout`` seconds, on
    a kept-alive connection to its node if the pool has one (a fresh one if that fails before
    any answer: the node may have closed it meanwhile)."""
    deadline = time.monotonic() + timeout
    connection, path = _connect(url, timeout)
    kept = pool.take((connection.host, connection.port))
    if kept is not None:
        try:
            return kept, _ask(kept, method, path, headers, deadline, timeout)
        except (OSError, http.client.HTTPException):
            kept.close()
    try:
        connection.connect()
        return connection, _ask(connection, method, path, headers, deadline, timeout)
    except BaseException:
        connection.close()
        raise


def _ask(connection: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str],
         deadline: float, timeout: float) -> http.client.HTTPResponse:
    connection.response_class = functools.partial(  # type: ignore[misc]
        _HeadByDeadline, deadline=deadline, read_timeout=timeout)
    connection.sock.settimeout(time_left(deadline))  # sendall() counts it for the whole request
    connection.request(method, path, headers=headers)
    return connection.getresponse()


class ReplicaResponse(io.RawIOBase):
    """The body of one replica as a readable, closeable stream (``read``, ``iter_chunks``)."""

    def __init__(self, url: str, connection: http.client.HTTPConnection,
                 response: http.client.HTTPResponse, pool: NodePool) -> None:
        super().__init__()
        self.url = url
        self.status = response.status
        self.headers = response.headers
        self._connection = connection
        self._response = response
        self._pool = pool

    @property
    def length(self) -> int | None:
        """The body length the node announced (``Content-Length``), if any."""
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        return self._response.readinto(buffer)

    def iter_chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the body in chunks of at most ``size`` bytes, each as one read from the node
        returned it (no copy); raise if it ends short."""
        remaining = self.length
        while True:
            chunk = self._response.read1(size)
            if not chunk:
                break
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk
        if remaining:
            raise StorageError(f"{self.url} ended {remaining} bytes short of its length", self.url)

    def close(self) -> None:
        """Close the response; its connection is kept for reuse if the body was read to its end
        and the node keeps it alive, else closed."""
        if not self.closed:
            complete = self._response.length == 0 and not self._response.will_close
            self._response.close()
            if complete:
                self._pool.give(self.node, self._connection)
            else:
                self._connection.close()
        super().close()

    @property
    def node(self) -> Node:
        return self._connection.host, self._connection.port


def open_replica(
    urls: Sequence[str],
    *,
    method: str = "GET",
    byte_range: tuple[int, int] | None = None,
    length: int | None = None,
    timeout: float = 10.0,
    pool: NodePool = nodes,
) -> ReplicaResponse:
    """Open the first of ``urls`` that answers 2xx (with a body of ``length`` bytes, when given),
    trying the next on a refusal, an error or another length. Connections come from ``pool``
    and go back to it once a response was read to its end.

    ``byte_range`` is an absolute, inclusive ``(first, last)`` pair sent as ``Range``: storage
    nodes answer suffix ranges (``bytes=-N``) wrongly, so callers resolve them first. Raises
    :class:`StorageError` naming every failure when no replica answers.

    ``timeout`` bounds the connect, the request and the whole response head of each replica
    together, then each read of the body (a slow but live transfer goes on).
    """
    headers = range_header(byte_range)
    failures = ReplicaFailures()
    for url in urls:
        try:
            connection, response = _get(url, method, headers, timeout, pool)
        # ValueError: a host name the resolver refuses (UnicodeError from IDNA, a NUL byte).
        except (OSError, http.client.HTTPException, StorageError, ValueError) as error:
            failures.failed(url, error)
            continue
        replica = ReplicaResponse(url, connection, response, pool)
        if failures.accepts(url, replica.status, replica.length, length):
            return replica
        replica.close()
    raise failures.error(urls)


def read_replica(urls: Sequence[str], *, length: int, timeout: float = 10.0, pool: NodePool = nodes) -> bytes:
    """The whole body of a small file of ``length`` bytes from the first of ``urls`` that sends
    it all (:func:`open_replica`, then the next replica when a transfer is cut midway)."""
    remaining = list(urls)
    while True:
        replica = open_replica(remaining, length=length, timeout=timeout, pool=pool)
        try:
            return b"".join(replica.iter_chunks())
        except (OSError, StorageError) as error:
            remaining = cut_midway(remaining, replica.url, error)
        finally:
            replica.close()


def cut_midway(urls: list[str], url: str, error: BaseException) -> list[str]:
    """The replicas after ``url``, whose transfer was cut by ``error``; raises when none is left."""
    metrics.recorder.replica_failover()
    rest = urls[urls.index(url) + 1:]
    if not rest:
        raise StorageError(f"{url} was cut midway: {error or type(error).__name__}", url) from error
    return rest


def range_header(byte_range: tuple[int, int] | None) -> dict[str, str]:
    """The ``Range`` header asking for an absolute, inclusive ``(first, last)`` pair (or none)."""
    return {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else {}


class ReplicaFailures:
    """What went wrong with each replica tried, for the error raised when none answered."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.last_status: int | None = None

    def failed(self, url: str, error: BaseException) -> None:
        """``url`` could not be asked (refused, timed out, a bad URL)."""
        self.lines.append(f"{url}: {error or type(error).__name__}")
        metrics.recorder.replica_failover()

    def accepts(self, url: str, status: int, length: int | None, expected: int | None) -> bool:
        """True for a 2xx with the ``expected`` length (when given); else noted as a failure."""
        if 200 <= status < 300 and (expected is None or length == expected):
            return True
        self.last_status = status
        self.lines.append(f"{url}: HTTP {status}" if status >= 300 else f"{url}: {length} bytes, expected {expected}")
        metrics.recorder.replica_failover()
        return False

    def error(self, urls: Sequence[str]) -> StorageError:
        """The error naming every failure."""
        return StorageError("no replica answered: " + ("; ".join(self.lines) or "no paths"),
                            urls[0] if urls else "", self.last_status)


class PutStream:
    """A PUT to a storage node whose body is written piece by piece.

    With ``length`` the body is sent with ``Content-Length``, otherwise chunked (mogstored takes
    both). :meth:`finish` reads the node's answer; :meth:`abort` drops the connection so the node
    never sees a complete body.
    """

    def __init__(self, url: str, *, length: int | None = None, timeout: float = 10.0) -> None:
        self.url = url
        self._chunked = length is None
        try:
            self._connection, path = _connect(url, timeout)
            self._connection.putrequest("PUT", path, skip_accept_encoding=True)
            if length is None:
                self._connection.putheader("Transfer-Encoding", "chunked")
            else:
                self._connection.putheader("Content-Length", str(length))
            self._connection.endheaders()
        # ValueError: a host name the resolver refuses (UnicodeError from IDNA, a NUL byte).
        except (OSError, http.client.HTTPException, ValueError) as error:
            self.abort()
            raise StorageError(f"PUT {url} refused: {error or type(error).__name__}", url) from error

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send the next piece of the body."""
        if not data:
            return
        try:
            if self._chunked:
                self._connection.send(b"%X\r\n" % len(data))
                self._connection.send(data)
                self._connection.send(b"\r\n")
            else:
                self._connection.send(data)
        except OSError as error:
            self.abort()
            raise StorageError(f"PUT {self.url} dropped: {error or type(error).__name__}", self.url) from error

    def finish(self) -> None:
        """End the body and check that the node stored it (2xx)."""
        try:
            if self._chunked:
                self._connection.send(b"0\r\n\r\n")
            response = self._connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as error:
            raise StorageError(f"PUT {self.url} failed: {error or type(error).__name__}", self.url) from error
        finally:
            self._connection.close()
        if not 200 <= response.status < 300:
            raise StorageError(f"PUT {self.url} answered HTTP {response.status}", self.url, response.status)

    def abort(self) -> None:
        """Drop the connection without finishing the body."""
        connection = getattr(self, "_connection", None)
        if connection is not None:
            connection.close()
