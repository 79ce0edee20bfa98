"""HTTP to MogileFS storage nodes: streaming GET with replica failover, and streaming PUT.

Storage nodes (``mogstored``) are plain HTTP servers. Bodies move in bounded chunks, so memory
stays flat whatever the file size. A GET's connection is kept open for the next request to the
same node (:mod:`.nodepool`) once its body was read to the end; closing a response early closes it.

A GET is written and read here, the asyncio side's way (:func:`parse_head` is both sides'):
storage nodes answer plain HTTP/1.x with a ``Content-Length`` and never chunk a body, and
``http.client``'s head parsing alone took more CPU than the rest of a 100 KiB file's answer
(200 µs against 70 µs per GET, measured in process). A PUT is too: its answer's head is read by
the same reader, within the timeout, past any 1xx, and its body is never read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from . import metrics
from .deadline import DeadlineReader, readable_now, time_left
from .downnodes import down_nodes
from .exceptions import StorageError
from .nodepool import Node, NodePool, nodes
from .protocol import names_a_fid
from .tracker import is_url_authority, own_shortage

T = TypeVar("T")
log = logging.getLogger("mogile_middleware")

#: Bytes moved per read or write: large enough for throughput, small enough to stay flat.
CHUNK_SIZE = 64 * 1024
#: The most of a PUT's body sent at once: each piece must reach the node within the timeout (a
#: blocking ``sendall``'s is a deadline for all it is given), so a write of any size goes on as
#: long as the node takes 256 KiB per timeout.
PUT_PIECE_SIZE = 256 * 1024


def byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """``data`` as a view of its bytes, whose length counts bytes: a view of wider items (an
    ``array('i')``'s) counted items, announcing a quarter of its bytes."""
    return memoryview(data).cast("B")


def put_pieces(data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    """The bytes of ``data`` in pieces of at most :data:`PUT_PIECE_SIZE`, each sent within the timeout."""
    view = byte_view(data)
    return (view[start:start + PUT_PIECE_SIZE] for start in range(0, len(view), PUT_PIECE_SIZE))


#: A replica that failed after this long (or half the timeout) marks its node down (:mod:`.downnodes`).
SLOW_FAILURE_SECONDS = 0.5

#: The longest response head taken.
MAX_HEAD = CHUNK_SIZE
#: The most digits a ``Content-Length`` may have (an exabyte): more is no file a node holds.
MAX_LENGTH_DIGITS = 18
#: Statuses whose response has no body, whatever its headers say.
NO_BODY = frozenset({204, 304})
#: What a request target or a host may not hold (as ``http.client`` checks them): controls and
#: spaces would let a URL forged by whoever wrote it into the tracker add headers or requests.
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")
#: Bytes read at a time while waiting for a response head (the body is read straight from the socket).
_HEAD_READ = 4096


class Target:
    """Where a storage URL points: ``host``, ``port`` and the request target ``path``.

    A URL that is not a plain ``http://`` one whose parts a request line can hold is a
    :class:`StorageError`.
    """

    def __init__(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port  # a ValueError for a port out of range or not a number
        except ValueError as error:
            raise StorageError(f"bad storage URL {url!r}: {error}", url) from None
        if parts.scheme != "http" or not parts.hostname:
            raise StorageError(f"not an http:// storage URL: {url!r}", url)
        if not is_url_authority(parts.netloc):  # "[::1]x:7500" is read as the host ::1
            raise StorageError(f"bad storage URL {url!r}: its host and port", url)
        if port == 0:
            raise StorageError(f"bad storage URL {url!r}: port 0", url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if not (path + parts.hostname).isascii() or _UNSAFE.search(path) or _UNSAFE.search(parts.hostname):
            raise StorageError(f"bad storage URL {url!r}: a space, control or non-ASCII character", url)
        self.url = url
        self.host: str = parts.hostname
        self.port: int = 80 if port is None else port
        self.path = path

    @property
    def node(self) -> Node:
        return self.host, self.port

    def request_head(self, method: str, headers: Mapping[str, str], *, keep_alive: bool = False) -> bytes:
        """The request line and headers of ``method`` on this target; HTTP/1.1 keeps the connection
        open unless ``keep_alive`` is false."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        lines = [
            f"{method} {self.path} HTTP/1.1",
            f"Host: {host}" if self.port == 80 else f"Host: {host}:{self.port}",
            *(() if keep_alive else ("Connection: close",)),
            *(f"{name}: {value}" for name, value in headers.items()),
            "",
            "",
        ]
        return "\r\n".join(lines).encode("ascii")


def parse_head(url: str, head: bytes) -> tuple[int, dict[str, str], bool]:
    """The status and headers (names lower-cased) of a response head, without its blank line (CRLF
    line ends, as storage nodes send), and whether the node keeps the connection open after it
    (mogstored answers HTTP/1.0 with ``Connection: keep-alive``). A ``Transfer-Encoding`` is
    refused: storage nodes never send one, which keeps the readers simple; so is a
    ``Content-Length`` that is not one number (RFC 9112 6.3: where the body ends is unknown)."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    status = rest[:3]
    # RFC 9112 2.3 and 4: "HTTP/1." and a digit, then a status code from 100 to 599 (RFC 9110 15).
    if (len(version) != 8 or not version.startswith("HTTP/1.") or version[7] not in "0123456789"
            or not (status.isascii() and status.isdigit() and "100" <= status <= "599") or rest[3:4] not in ("", " ")):
        raise StorageError(f"{url} sent no HTTP/1.x status line: {status_line[:80]!r}", url)
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise StorageError(f"{url} sent a bad header line: {line[:80]!r}", url)
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if "transfer-encoding" in headers:
        raise StorageError(f"{url} sent Transfer-Encoding: {headers['transfer-encoding'][:80]!r}, "
                           "which storage nodes do not", url)
    if "content-length" in headers:
        # The same length repeated is one length (RFC 9110 8.6); anything else ends the body nowhere.
        lengths = {value.strip() for value in headers["content-length"].split(",")}
        length = lengths.pop()
        if lengths or not (length.isascii() and length.isdigit()) or len(length) > MAX_LENGTH_DIGITS:
            raise StorageError(f"{url} sent Content-Length: {headers['content-length'][:80]!r}", url)
        headers["content-length"] = length
    connection = {token.strip() for token in headers.get("connection", "").lower().split(",")}
    # RFC 9112 9.3: "close" ends it whatever else is listed; HTTP/1.0 keeps it only if asked.
    keep_alive = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
    return int(status), headers, keep_alive


def content_length(headers: Mapping[str, str]) -> int | None:
    """The ``content-length`` of lower-cased ``headers`` checked by :func:`parse_head`, if any."""
    value = headers.get("content-length")
    return None if value is None else int(value)


def body_follows(method: str, status: int, headers: Mapping[str, str]) -> bool:
    """True if the answer to a GET has a body, whose first bytes are then awaited with its head:
    a node that sends its head, then fails or hangs, is passed over as one that fails before it,
    before an answer built on it is promised."""
    return method == "GET" and status not in NO_BODY and bool(content_length(headers))


def is_interim(url: str, status: int) -> bool:
    """True for a 1xx status, whose head the final answer follows (RFC 9110 15.2: a client reads
    past them, expected or not); a switch of protocols, as no GET asks for, is a :class:`StorageError`."""
    if status == 101:
        raise StorageError(f"{url} switched protocols", url)
    return status < 200


class NodeConnection:
    """One connection to a storage node: a request written whole, its response head read by a
    deadline, then its body straight from the socket (kept alive by a :class:`NodePool` between
    responses)."""

    def __init__(self, node: Node, timeout: float) -> None:
        self.node = node
        #: The process that made it: one open at a fork is each process's, and kept by neither.
        self.pid = os.getpid()
        self.sock = socket.create_connection(node, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = DeadlineReader(self.sock)
        self._buffer = memoryview(bytearray(_HEAD_READ))

    def exchange(self, request: bytes, url: str, deadline: float, read_timeout: float, method: str
                 ) -> tuple[int, dict[str, str], bool, bytes]:
        """Send ``request`` (of ``method``); the status, headers and keep-alive of the response,
        all arrived by ``deadline`` however slowly they trickle in, and the start of its body that
        came with them (for a GET, some by the deadline too: :func:`body_follows`). Each later read of
        the body may then wait ``read_timeout``."""
        self._reader.set_deadline(deadline)
        self.sock.sendall(request)
        data = b""
        while True:
            while (end := data.find(b"\r\n\r\n")) < 0:
                if len(data) > MAX_HEAD:
                    break
                count = self._reader.readinto(self._buffer)
                if not count:
                    raise StorageError(f"{url} closed the connection before its status line and headers", url)
                data += self._buffer[:count]
            if end < 0 or end + 4 > MAX_HEAD:
                raise StorageError(f"{url} sent a response head over {MAX_HEAD} bytes", url)
            status, headers, keep_alive = parse_head(url, data[:end])
            data = data[end + 4:]
            if not is_interim(url, status):
                break
        if not data and body_follows(method, status, headers):
            count = self._reader.readinto(self._buffer)
            if not count:
                raise StorageError(f"{url} closed the connection after its head, before its body", url)
            data = bytes(self._buffer[:count])
        self._reader.deadline = None
        self.sock.settimeout(read_timeout)
        return status, headers, keep_alive, data

    @property
    def received(self) -> int:
        """Bytes received on this connection so far."""
        return self._reader.received

    @property
    def closed(self) -> bool:
        """True once its socket is closed. The garbage collector may close it, then give the
        connection to the pool, when it frees a response read to its end and left open in a
        reference cycle (a Django model and its file)."""
        return self.sock.fileno() < 0

    def close(self) -> None:
        """Close the socket; the connection is not used again. A read waiting on it in another
        thread ends at once (it would wait out its timeout): this process's end is shut down
        first, but not one made before a fork, which the other process may still be reading."""
        if self.pid == os.getpid():
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        self._reader.close()
        self.sock.close()


def _get(url: str, method: str, headers: dict[str, str], timeout: float, pool: NodePool) -> ReplicaResponse:
    """Send ``method`` to ``url`` and read the response head, all within ``timeout`` seconds, on
    a kept-alive connection to its node if the pool has one (a fresh one if that fails before
    any answer: the node may have closed it meanwhile)."""
    deadline = time.monotonic() + timeout
    target = Target(url)
    request = target.request_head(method, headers, keep_alive=True)
    kept = pool.take(target.node)
    if kept is not None:
        received = kept.received
        try:
            return ReplicaResponse(url, kept, *kept.exchange(request, url, deadline, timeout, method), method, pool)
        except BaseException as error:
            kept.close()
            # Asked again on a fresh connection only if the node may have closed this one unanswered.
            if not isinstance(error, (OSError, StorageError)) or kept.received > received:
                raise
    connection = NodeConnection(target.node, time_left(deadline))
    try:
        return ReplicaResponse(url, connection, *connection.exchange(request, url, deadline, timeout, method), method,
                               pool)
    except BaseException:
        connection.close()
        raise


class ReplicaResponse(io.RawIOBase):
    """The answer of one replica: ``url``, ``status``, ``headers`` (lower-cased names), ``length``
    (its ``Content-Length``, if any), and the body as a readable, closeable stream (``read``,
    ``iter_chunks``)."""

    def __init__(self, url: str, connection: NodeConnection, status: int, headers: dict[str, str],
                 keep_alive: bool, early: bytes, method: str, pool: NodePool) -> None:
        super().__init__()
        self.url = url
        self.status = status
        self.headers = headers
        self.length = content_length(headers)
        self._connection = connection
        self._pool = pool
        #: Bytes of body still to come; None: until the node closes the connection.
        self._remaining = 0 if method == "HEAD" or status in NO_BODY else self.length
        #: The start of the body, read with the head; more than the body means the node misspoke.
        self._early = early
        self._reusable = keep_alive and self._remaining is not None and len(early) <= self._remaining

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Read into ``buffer`` (straight from the socket once the bytes read with the head are used)."""
        view = memoryview(buffer).cast("B")[:self._limit(len(buffer))]
        if not view:
            return 0
        if self._early:
            count = min(len(view), len(self._early))
            view[:count], self._early = self._early[:count], self._early[count:]
        else:
            count = self._received(self._connection.sock.recv_into, view)
        return self._took(count)

    def iter_chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the body in chunks of at most ``size`` bytes, each as one read from the node
        returned it; raise if it ends short."""
        while limit := self._limit(size):
            if self._early:
                chunk, self._early = self._early[:limit], self._early[limit:]
            else:
                chunk = self._received(self._connection.sock.recv, limit)
            if not self._took(len(chunk)):
                return
            yield chunk

    def _received(self, receive: Callable[[Any], T], into: Any) -> T:
        """``receive(into)`` from the node; a node gone silent or away is a :class:`StorageError`
        naming the replica (as the asyncio client's), not the socket's bare error."""
        try:
            return receive(into)
        except TimeoutError:
            silent = StorageError(f"{self.url} sent nothing for {self._connection.sock.gettimeout():g}s", self.url)
            down_nodes.failed(self.url, silent)  # it made the reader wait, as one silent before its head
            raise silent from None
        except OSError as error:
            raise self._closed_error() or StorageError(f"{self.url} dropped the connection: {error}",
                                                       self.url) from error

    def _limit(self, size: int) -> int:
        """How much of the body the next read may take: at most ``size``, 0 once it was all read."""
        return size if self._remaining is None else min(size, self._remaining)

    def _took(self, count: int) -> int:
        """Count ``count`` bytes read; a read of none before the announced length is a :class:`StorageError`."""
        if self._remaining is not None:
            if not count:
                raise self._closed_error() or StorageError(
                    f"{self.url} ended {self._remaining} bytes short of its length", self.url)
            self._remaining -= count
        return count

    def _closed_error(self) -> StorageError | None:
        """What a read ended by :meth:`close` (from another thread) raises; ``None`` while open."""
        return StorageError(f"{self.url}: the response was closed", self.url) if self.closed else None

    def close(self) -> None:
        """Close the response; its connection is kept for reuse if the body was read to its end
        and the node keeps it alive, else closed. The response is marked closed first: an
        exception raised meanwhile (a signal's) never has the connection given twice."""
        if self.closed:
            return
        super().close()
        if self._reusable and self._remaining == 0:
            self._pool.give(self.node, self._connection)
        else:
            self._connection.close()

    @property
    def node(self) -> Node:
        return self._connection.node


def open_replica(
    urls: Sequence[str],
    *,
    method: str = "GET",
    byte_range: tuple[int, int] | None = None,
    size: int | None = None,
    timeout: float = 10.0,
    pool: NodePool = nodes,
) -> ReplicaResponse:
    """Open the first of ``urls`` that answers as asked (:meth:`ReplicaFailures.accepts`: of a file
    of ``size`` bytes, when given), trying the next on a refusal, an error or another answer; a node
    that did not answer lately is not asked (:mod:`.downnodes`). Connections come from ``pool``
    and go back to it once a response was read to its end.

    ``byte_range`` is an absolute, inclusive ``(first, last)`` pair sent as ``Range``: storage
    nodes answer suffix ranges (``bytes=-N``) wrongly, so callers resolve them first. Raises
    :class:`StorageError` naming every failure when no replica answers.

    ``timeout`` bounds the connect, the request and the whole response head of each replica
    together, then each read of the body (a slow but live transfer goes on).
    """
    headers = range_header(byte_range)
    failures = ReplicaFailures(timeout)
    for url in down_nodes.ordered(urls):
        if not failures.may_ask(url):
            continue
        started = time.monotonic()
        try:
            replica = _get(url, method, headers, timeout, pool)
        # ValueError: a host name the resolver refuses (UnicodeError from IDNA).
        except (OSError, StorageError, ValueError) as error:
            failures.failed(url, error, time.monotonic() - started)
            continue
        finally:
            down_nodes.done(url)
        if failures.accepts(url, replica.status, replica.headers, byte_range, size):
            return replica
        replica.close()
    raise failures.error(urls)


def read_replica(urls: Sequence[str], *, length: int | None = None, timeout: float = 10.0,
                 pool: NodePool = nodes) -> bytes:
    """The whole body of a small file (of ``length`` bytes, when given) from the first of ``urls``
    that sends it all (:func:`open_replica`, then the next replica when a transfer is cut midway)."""
    remaining = list(urls)
    while True:
        replica = open_replica(remaining, size=length, timeout=timeout, pool=pool)
        try:
            return b"".join(replica.iter_chunks())
        except (OSError, StorageError) as error:
            remaining = cut_midway(remaining, replica.url, error)
        finally:
            replica.close()


#: How many times one body cut midway goes on from a replica again (each time after more of it came).
RESUMES = 16


class Resumption:
    """Where the rest of a body cut midway comes from: the other replicas of ``urls`` first, then
    the one cut (mogstored closes a connection whose reader took nothing for 30 s, and the node
    still serves), for the part of ``byte_range`` left (all of a file of ``size`` bytes without
    one). The replicas of one fid hold the same bytes; URLs that do not name one (``same_bytes``
    false: they name the key alone) may serve another version by then, so a cut ends the
    transfer. Only after more of the body came since the last time, at most :data:`RESUMES`
    times: a node cutting every transfer at once ends it."""

    def __init__(self, urls: Sequence[str], byte_range: tuple[int, int] | None, size: int | None, *,
                 same_bytes: bool = True) -> None:
        self.urls = list(urls)
        self.size = size
        self._same_bytes = same_bytes
        self._first, self._last = byte_range or (0, None if size is None else size - 1)
        self._resumed_at = -1
        self._resumes = 0

    def after(self, url: str, done: int, error: BaseException) -> tuple[list[str], tuple[int, int]]:
        """The replicas to open, and the range left, once ``url`` was cut with ``done`` bytes of
        the body read; the :class:`StorageError` that ends the transfer when it cannot go on."""
        metrics.recorder.replica_failover()
        if not self._same_bytes or self._last is None or self._resumes == RESUMES or done <= self._resumed_at:
            raise StorageError(f"{url} was cut midway: {error or type(error).__name__}", url) from error
        self._resumes += 1
        self._resumed_at = done
        log.warning("transfer from %r cut midway after %d bytes (%r): going on from a replica again", url, done, error)
        return [other for other in self.urls if other != url] + [url], (self._first + done, self._last)


class ResumedReplica:
    """The body of an open ``replica`` that goes on from a replica again when its transfer is cut
    midway (:class:`Resumption`), so that a long download ends whole. ``url`` is the replica read now."""

    def __init__(self, replica: ReplicaResponse, resumption: Resumption, *, timeout: float = 10.0,
                 pool: NodePool = nodes) -> None:
        self.replica = replica
        self._resumption = resumption
        self._timeout = timeout
        self._pool = pool
        self._closed = False

    @property
    def url(self) -> str:
        return self.replica.url

    def iter_chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the body in chunks of at most ``size`` bytes; raise once it cannot go on."""
        done = 0
        while True:
            try:
                for chunk in self.replica.iter_chunks(size):
                    done += len(chunk)
                    yield chunk
                return
            except (OSError, StorageError) as error:
                if self._closed:  # by close() from another thread: no cut to go on from
                    raise
                urls, part = self._resumption.after(self.replica.url, done, error)
            self.replica.close()
            self.replica = open_replica(urls, byte_range=part, size=self._resumption.size, timeout=self._timeout,
                                        pool=self._pool)
            if self._closed:  # meanwhile
                self.replica.close()

    def close(self) -> None:
        """Close the storage connection of the replica read now; a read waiting on it in another
        thread raises at once, and the transfer does not go on."""
        self._closed = True
        self.replica.close()


class SeekableBody(io.RawIOBase):
    """The body of a file at ``urls`` (its replicas), read from the first that answers, and
    seekable: a read elsewhere than where the transfer is opens a replica again from there (a
    ``Range``) of the same version (the same URLs), and so does a transfer cut midway, from the
    other replicas, then the one cut (:class:`Resumption`). ``length`` is known from the first
    answer; given (the tracker's), a replica of another length is passed over. URLs that name no
    fid may serve another version by the next request: a cut ends the transfer, and a replica
    opened again must have the ``Last-Modified`` of the first."""

    def __init__(self, urls: Sequence[str], *, length: int | None = None, timeout: float = 10.0,
                 pool: NodePool = nodes) -> None:
        super().__init__()
        self._urls = list(urls)
        self._timeout = timeout
        self._pool = pool
        self._replica: ReplicaResponse | None = open_replica(self._urls, size=length, timeout=timeout, pool=pool)
        self.length: int = self._replica.length  # type: ignore[assignment] # accepts() requires one
        self._position = 0  # where the next read starts
        self._transfer_at = 0  # where the open transfer is
        same_bytes = names_a_fid(self._urls)
        self._resumption = Resumption(self._urls, None, self.length, same_bytes=same_bytes)
        #: What a replica opened again must say of its version, for URLs naming no fid.
        self._version = None if same_bytes else self._replica.headers.get("last-modified")
        self._received = 0  # in all: what a transfer cut must have added to for another

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def url(self) -> str | None:
        """The replica read now (``None`` between transfers)."""
        return None if self._replica is None else self._replica.url

    def tell(self) -> int:
        self._checkClosed()  # type: ignore[attr-defined]
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move where the next read starts (nothing is asked of a replica until then)."""
        self._checkClosed()  # type: ignore[attr-defined]
        if whence not in (io.SEEK_SET, io.SEEK_CUR, io.SEEK_END):
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        position = offset + (0, self._position, self.length)[whence]
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Read from the position into ``buffer``: from the open transfer when it is there, else
        from a replica opened there; a transfer cut midway goes on from a replica again."""
        self._checkClosed()  # type: ignore[attr-defined]
        while self._position < self.length:
            replica = self._replica
            if replica is None or self._transfer_at != self._position:
                replica = self._reopen()
            try:
                count = replica.readinto(buffer)
            except (OSError, StorageError) as error:
                if self.closed:  # by close() from another thread: no cut to go on from
                    raise
                self._urls, _ = self._resumption.after(replica.url, self._received, error)
                self._drop_transfer()
                continue
            self._position += count
            self._transfer_at += count
            self._received += count
            return count
        return 0

    def _reopen(self) -> ReplicaResponse:
        """A replica's body from the position on (the transfer left midway is closed)."""
        self._drop_transfer()
        replica = open_replica(self._urls, byte_range=(self._position, self.length - 1), size=self.length,
                               timeout=self._timeout, pool=self._pool)
        if self._version is not None and replica.headers.get("last-modified") != self._version:
            replica.close()
            raise StorageError(f"{replica.url} holds another version since it was opened (Last-Modified: "
                               f"{replica.headers.get('last-modified')!r}, not {self._version!r})", replica.url)
        self._replica = replica
        self._transfer_at = self._position
        if self.closed:  # from another thread, meanwhile
            self._drop_transfer()
        return replica

    def _drop_transfer(self) -> None:
        replica, self._replica = self._replica, None
        if replica is not None:
            replica.close()

    def close(self) -> None:
        """Close the open transfer, if any; a read waiting on it in another thread raises at
        once, and opens no replica again."""
        super().close()
        self._drop_transfer()


def cut_midway(urls: list[str], url: str, error: BaseException) -> list[str]:
    """The replicas but ``url``, whose transfer was cut by ``error``; raises when none is left.
    Those listed before it too: one that did not answer lately is asked last, after it (:mod:`.downnodes`)."""
    metrics.recorder.replica_failover()
    rest = [other for other in urls if other != url]
    if not rest:
        raise StorageError(f"{url} was cut midway: {error or type(error).__name__}", url) from error
    return rest


def range_header(byte_range: tuple[int, int] | None) -> dict[str, str]:
    """The ``Range`` header asking for an absolute, inclusive ``(first, last)`` pair (or none)."""
    return {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else {}


class ReplicaFailures:
    """What went wrong with each replica tried, for the error raised when none answered; a node
    that made a request wait (half its ``timeout``, or :data:`SLOW_FAILURE_SECONDS`) before
    failing is marked down (a refusal costs nothing, and a node restarting soon answers)."""

    def __init__(self, timeout: float) -> None:
        self.lines: list[str] = []
        self.last_status: int | None = None
        self._slow = min(SLOW_FAILURE_SECONDS, timeout / 2)
        # This process's own shortage (out of file descriptors) when it is all that failed.
        self._shortage: OSError | None = None
        self._nodes_failed = False

    def may_ask(self, url: str) -> bool:
        """True unless the node of ``url`` is marked down (then noted as a failure)."""
        if down_nodes.may_ask(url):
            return True
        self.lines.append(f"{url}: not asked, its node failed lately (again in {down_nodes.seconds_down(url):.1f}s)")
        self._nodes_failed = True
        return False

    def failed(self, url: str, error: BaseException, seconds: float) -> None:
        """``url`` could not be asked (refused, timed out, a bad URL), which took ``seconds``."""
        self.lines.append(f"{url}: {error or type(error).__name__}")
        if own_shortage(error):
            self._shortage = error  # type: ignore[assignment]
        else:
            self._nodes_failed = True
        if seconds >= self._slow:
            down_nodes.failed(url, error)
        metrics.recorder.replica_failover()

    def accepts(self, url: str, status: int, headers: Mapping[str, str], byte_range: tuple[int, int] | None,
                size: int | None) -> bool:
        """True for the answer asked for, with a ``Content-Length`` (storage nodes always send
        one): a 200, or for ``byte_range`` a 206 of that range (or a 200 of the whole file, when
        the range is all of it), of a file of ``size`` bytes when given (a replica of another
        length is another file, whatever part of it is asked); else noted as a failure."""
        down_nodes.answered(url)
        length = content_length(headers)
        if byte_range is None:
            answered, expected = status == 200, size
        else:
            first, last = byte_range
            part = f"bytes {first}-{last}/"
            told = headers.get("content-range", "")
            answered = (status == 206 and told.startswith(part) and (size is None or told == f"{part}{size}")
                        or status == 200 and first == 0 and size in (None, last + 1))
            expected = last - first + 1
        if answered and length is not None and (expected is None or length == expected):
            return True
        self._nodes_failed = True
        self.last_status = status
        if not answered:
            told = f" ({headers['content-range']})" if "content-range" in headers else ""
            asked = f" to Range: {range_header(byte_range)['Range']}" if byte_range else ""
            self.lines.append(f"{url}: HTTP {status}{told}{asked}")
        elif length is None:
            self.lines.append(f"{url}: HTTP {status} without a Content-Length")
        else:
            self.lines.append(f"{url}: {length} bytes, expected {expected}")
        metrics.recorder.replica_failover()
        return False

    def error(self, urls: Sequence[str]) -> StorageError:
        """The error naming every failure: an :class:`OwnShortageError` when no node failed."""
        kind = OwnShortageError if self._shortage is not None and not self._nodes_failed else StorageError
        error = kind("no replica answered: " + ("; ".join(self.lines) or "no paths"), urls[0] if urls else "",
                     self.last_status)
        if kind is OwnShortageError:
            error.__cause__ = self._shortage
        return error


class OwnShortageError(StorageError):
    """No replica could be asked because this process could open no connection (out of file
    descriptors): no node failed, and an answer says to come back rather than that nodes did."""


class LengthMismatchError(StorageError):
    """A PUT body that is not the length announced: the source's doing, so no other node would
    take it either."""

    @classmethod
    def longer(cls, url: str, length: int) -> LengthMismatchError:
        """The error of a body that went on past its announced ``length``."""
        return cls(f"PUT {url}: the source gave more than the {length} bytes announced (a file that grew while "
                   f"read?)", url)

    @classmethod
    def shorter(cls, url: str, written: int, length: int) -> LengthMismatchError:
        """The error of a body that ended after ``written`` of its announced ``length``."""
        return cls(f"PUT {url}: the source ended after {written} of the {length} bytes announced (a body cut "
                   f"short, a file that shrank while read or whose size is not its length?)", url)


class PutStream:
    """A PUT to a storage node whose body is written piece by piece.

    With ``length`` the body is sent with ``Content-Length``, otherwise chunked (mogstored takes
    both). :meth:`finish` reads the node's answer; :meth:`abort` drops the connection so the node
    never sees a complete body.
    """

    def __init__(self, url: str, *, length: int | None = None, timeout: float = 10.0) -> None:
        self.url = url
        self._chunked = length is None
        self._length = length
        self._written = 0
        self._timeout = timeout
        self._connection: NodeConnection | None = None
        target = Target(url)
        try:
            self._connection = NodeConnection(target.node, timeout)
            framing = {"Transfer-Encoding": "chunked"} if length is None else {"Content-Length": str(length)}
            self._connection.sock.sendall(target.request_head("PUT", framing))
        # ValueError: a host name the resolver refuses (UnicodeError from IDNA, a NUL byte).
        except (OSError, ValueError) as error:
            self.abort()
            raise StorageError(f"PUT {url} refused: {error or type(error).__name__}", url) from error

    def _open_connection(self) -> NodeConnection:
        if self._connection is None:
            raise StorageError(f"PUT {self.url} is already finished or aborted", self.url)
        return self._connection

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send the next piece of the body."""
        sock = self._open_connection().sock
        data = byte_view(data)
        if not data:
            return
        if self._length is not None and self._written + len(data) > self._length:
            self.abort()
            raise LengthMismatchError.longer(self.url, self._length)
        try:
            if self._chunked:
                sock.sendall(b"%X\r\n" % len(data))
            for piece in put_pieces(data):
                sock.sendall(piece)
            if self._chunked:
                sock.sendall(b"\r\n")
        except OSError as error:
            failure = put_dropped(self.url, sock, error)
            self.abort()
            raise failure from error
        self._written += len(data)

    def finish(self) -> None:
        """End the body and check that the node stored it (2xx), its answer's head read within
        ``timeout`` (its body, if any, is not read: the connection is closed)."""
        connection = self._open_connection()
        if self._length is not None and self._written != self._length:  # the node would wait for the rest
            self.abort()
            raise LengthMismatchError.shorter(self.url, self._written, self._length)
        self._connection = None
        try:
            end = b"0\r\n\r\n" if self._chunked else b""
            status, *_ = connection.exchange(end, self.url, time.monotonic() + self._timeout, self._timeout, "PUT")
        except (OSError, StorageError) as error:
            # The whole body in the socket's buffers, the node may have answered it before taking it all.
            answered = put_dropped(self.url, connection.sock, error) if isinstance(error, OSError) else None
            if answered is not None and answered.status is not None:
                raise answered from error
            raise StorageError(f"PUT {self.url} failed: {error or type(error).__name__}", self.url) from error
        finally:
            connection.close()
        if not 200 <= status < 300:
            raise StorageError(f"PUT {self.url} answered HTTP {status}", self.url, status)

    def abort(self) -> None:
        """Drop the connection without finishing the body; aborting again does nothing."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def put_dropped(url: str, sock: socket.socket, error: OSError) -> StorageError:
    """The error of a PUT whose body the node stopped taking: its own answer when it sent one
    before closing (a 507 when its disk is full, 500, 403), read without waiting, as RFC 9112 9.5
    has a client sending a body watch for; else what the connection gave."""
    try:  # a socket with a timeout waits for data before any recv: asked first whether it has some
        status_line = sock.recv(MAX_HEAD, socket.MSG_DONTWAIT).partition(b"\r\n")[0] if readable_now(sock) else b""
        status = parse_head(url, status_line)[0] if status_line else 0
    except (OSError, StorageError, ValueError):
        status = 0
    if status < 200:
        return StorageError(f"PUT {url} dropped: {error or type(error).__name__}", url)
    return StorageError(f"PUT {url} answered HTTP {status} before taking all of the body", url, status)
