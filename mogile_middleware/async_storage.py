"""HTTP to MogileFS storage nodes for asyncio: streaming GET with replica failover, streaming PUT.

The asyncio counterpart of :mod:`.storage`, with its guarantees: one deadline per replica until
its status line and headers have arrived, however slowly they trickle in, then ``timeout`` per
read of the body, so a slow but live transfer goes on; bodies move in bounded chunks at the
caller's pace, so memory stays flat whatever the file size. A response read to its end leaves
its connection open for the event loop's next request to that node (as :mod:`.nodepool` does for
threads); one closed early, or whose task is cancelled, closes it. ::

    replica = await open_replica(paths, timeout=5)
    async with replica:
        async for chunk in replica.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

Storage nodes (mogstored's Perlbal, the development node) answer plain HTTP/1.x and give every
body a ``Content-Length``; none chunks a response. So a non-blocking socket and a status-line-
and-headers parser are all this needs: ``python -m bench.async_storage`` measured them against
h11, httpx and aiohttp on the development node; none was faster at small GETs (aiohttp and h11
about half their speed, httpx a fifth), and on a 256 MiB body none reached a third of it (the
same parser over an asyncio protocol, as this module had it before: two thirds at most).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import warnings
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from .deadline import readable_now, within
from .downnodes import down_nodes
from .exceptions import StorageError
from .loopnet import PerLoop, connect
from .nodepool import IdlePool, Node
from .storage import (
    CHUNK_SIZE,
    MAX_HEAD,
    LengthMismatchError,
    NO_BODY,
    ReplicaFailures,
    Resumption,
    Target,
    body_follows,
    byte_view,
    content_length,
    cut_midway,
    put_dropped,
    put_pieces,
    is_interim,
    parse_head,
    range_header,
)

__all__ = ["BODY_CHUNK_SIZE", "CHUNK_SIZE", "GROW_AFTER_BYTES", "SMALL_PIECE_SIZE", "AsyncPutStream",
           "AsyncReplicaResponse", "AsyncResumedReplica", "open_replica"]

#: The largest piece of a body a read takes, reached by a reader that keeps up past
#: :data:`GROW_AFTER_BYTES` and asks for that much: under uvicorn a 256 MiB download took about a
#: third less of the worker's CPU than in 64 KiB pieces. A client that stops reading past that
#: point holds one such piece more in the server (about 450 KiB in all, where one that stops
#: earlier holds 300).
BODY_CHUNK_SIZE = 256 * 1024
#: A connection's reads until :data:`GROW_AFTER_BYTES`, and every read of a reader that was away
#: longer than :data:`KEEPING_UP_SECONDS` (sending to a slow client): a slow client holds about one
#: piece in the server's buffers (200 slow clients under uvicorn: 54 MiB, where 256 KiB pieces from
#: the start cost 116 MiB).
SMALL_PIECE_SIZE = CHUNK_SIZE
#: Bytes read on a connection for a response before its reads may grow. Until the kernel's
#: buffers towards a client are full, sending to it takes no time, however slowly it reads; by
#: default Linux lets them grow to 10 MiB (4 MiB to send, 6 MiB to receive), and on loopback a
#: client reading nothing took 4 MiB.
GROW_AFTER_BYTES = 16 * 1024 * 1024
#: A reader asking again within this long of its last piece keeps up: its next piece may be
#: twice as large. Under uvicorn, 99 in 100 reads of a 256 MiB download came within 0.2 ms.
KEEPING_UP_SECONDS = 0.001


class _Silent(Exception):
    """Raised in a waiting read by a response's watchdog: no data within the read timeout."""


class _Connection:
    """One connection to a storage node, on a non-blocking socket read and written directly. A
    read takes what the kernel holds, in one copy into the bytes handed on, and waits for the
    socket only when it holds nothing: each piece costs the event loop one turn, given to its
    other tasks, and no wait for the socket while the node keeps up (a transport's reads took
    two copies and a pause and resume of reading each: a tenth more of uvicorn's CPU on a 256 MiB
    download). Nothing is read before the reader asks, so a slow reader slows the node. Past
    :data:`GROW_AFTER_BYTES`, a reader that keeps up gets pieces twice as large as the last, up
    to what it asks for; one that was away gets small ones again.

    The single place connections are made and ended, so a pool can take over :meth:`open` and
    :meth:`close` (``reusable`` tells it whether the last response was read to its end).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, node: Node) -> None:
        self._loop = loop
        self._sock = sock
        self.node = node
        self._pid = os.getpid()  # open at a fork, it is each process's: kept by neither
        #: Whether it was kept from an earlier response, and whether anything came on it since.
        self.reused = self.received = False
        #: Whether the node keeps the connection open after the last response head read.
        self.keep_alive = False
        self._held = b""  # read with a head, not yet taken: the start of a body
        self._held_from = 0
        #: Bytes read since the request was sent; the size of the last piece, and when it was read.
        self._bytes_read = 0
        self._piece_size = SMALL_PIECE_SIZE
        self._read_at = 0.0
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._unwatch: Callable[[int], Any] = loop.remove_reader

    @classmethod
    async def open(cls, target: Target, *, kept: bool = False) -> _Connection:
        """A connection to the node of ``target``: with ``kept``, one kept open by an earlier
        response if this event loop has one."""
        loop = asyncio.get_running_loop()
        connection = _idle_connections(loop).take(target.node) if kept else None
        if connection is not None:
            connection.reused, connection.received = True, False
            connection._bytes_read = 0  # a new response: small pieces first
            return connection
        return cls(loop, await connect(target.host, target.port), target.node)

    def interrupt(self, error: BaseException) -> bool:
        """Make a read or send waiting on the socket raise ``error``; False if none waits (yet)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
            return True
        return False

    async def read(self, limit: int) -> bytes:
        """The next piece of at most ``limit`` bytes, as the kernel holds it; ``b""`` once the node
        closed. Raises what ended the connection, or what :meth:`interrupt` gave."""
        if self._held:
            return self._take_held(limit)
        if self._eof:
            return b""
        now = time.perf_counter()  # not the loop's clock: uvloop's stands still within a turn
        if self._bytes_read >= GROW_AFTER_BYTES and now - self._read_at < KEEPING_UP_SECONDS:
            self._piece_size = min(2 * self._piece_size, BODY_CHUNK_SIZE, max(limit, SMALL_PIECE_SIZE))
        else:
            self._piece_size = SMALL_PIECE_SIZE
        await asyncio.sleep(0)  # the loop's other tasks get a turn: a node that keeps up would leave them none
        while True:
            try:
                piece = self._sock.recv(min(limit, self._piece_size))
                break
            except (BlockingIOError, InterruptedError):
                await self._ready(self._loop.add_reader, self._loop.remove_reader)
        self._read_at = time.perf_counter()
        if piece:
            self.received = True
            self._bytes_read += len(piece)
        else:
            self._eof = True
        return piece

    async def _ready(self, watch: Callable[..., Any], unwatch: Callable[[int], Any]) -> None:
        """Wait until the socket can be read or written, as ``watch`` (the loop's ``add_reader``
        or ``add_writer``) tells; ``unwatch`` ends the watch."""
        if self._waiter is not None:
            raise RuntimeError(f"a read or send on the connection to {self.node} waits already")
        waiter = self._waiter = self._loop.create_future()
        self._unwatch = unwatch
        watch(self._sock.fileno(), _settle, waiter)
        try:
            await waiter
        finally:
            self._stop_waiting()

    def _stop_waiting(self) -> None:
        """Stop watching the socket for a read or send that waits no more (before it is closed:
        its number may be a new socket's next)."""
        if self._waiter is not None:
            self._waiter = None
            if not self._loop.is_closed():
                self._unwatch(self._sock.fileno())

    def _take_held(self, limit: int) -> bytes:
        """At most ``limit`` bytes of those held: one copy of each part taken, however many parts."""
        held, start = self._held, self._held_from
        if start == 0 and len(held) <= limit:
            self._held = b""
            return held
        end = min(start + limit, len(held))
        if end == len(held):
            self._held, self._held_from = b"", 0
        else:
            self._held_from = end
        return held[start:end]

    def _unread(self, data: bytes) -> None:
        """Put ``data`` back in front of what is held."""
        self._held, self._held_from = data + self._held[self._held_from:], 0

    async def read_head(self, url: str) -> tuple[int, dict[str, str]]:
        """The status and headers (names lower-cased) of the next final response (past any 1xx)."""
        data = b""
        while True:
            while (end := data.find(b"\r\n\r\n")) < 0:
                if len(data) > MAX_HEAD:
                    break
                piece = await self.read(MAX_HEAD + 4)
                if not piece:
                    raise StorageError(f"{url} closed the connection before its status line and headers", url)
                data += piece
            if end < 0 or end + 4 > MAX_HEAD:
                raise StorageError(f"{url} sent a response head over {MAX_HEAD} bytes", url)
            status, headers, self.keep_alive = parse_head(url, data[:end])
            data = data[end + 4:]
            if not is_interim(url, status):
                break
        if data:  # the start of the body
            self._unread(data)
        return status, headers

    async def await_data(self, url: str) -> None:
        """Return once bytes past the head have come (left to read); a :class:`StorageError` if
        the node closes first."""
        piece = await self.read(SMALL_PIECE_SIZE)
        if not piece:
            raise StorageError(f"{url} closed the connection after its head, before its body", url)
        self._unread(piece)

    async def send(self, data: bytes | memoryview) -> None:
        """Send ``data``, waiting while the node takes none."""
        view = memoryview(data)
        while view:
            try:
                view = view[self._sock.send(view):]
            except (BlockingIOError, InterruptedError):
                await self._ready(self._loop.add_writer, self._loop.remove_writer)

    def close(self, reusable: bool = False) -> None:
        """End the connection, or with ``reusable`` (its last response was read to the end) keep
        it for the next request to its node if it is still open and the node keeps it alive."""
        if reusable and self.usable():
            _idle_connections(self._loop).give(self.node, self)
        else:
            self.abort()

    def usable(self) -> bool:
        """True if a new request may be sent: open, kept alive, nothing unread or unasked for."""
        return (self.keep_alive and not self._held and not self._eof and self._sock.fileno() >= 0
                and self._pid == os.getpid() and not readable_now(self._sock))

    def abort(self) -> None:
        """End the connection at once (a read or send waiting on it raises ConnectionAbortedError)."""
        if self._sock.fileno() < 0:
            return
        self.interrupt(ConnectionAbortedError("connection closed"))
        self._stop_waiting()
        self._sock.close()


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _IdleConnections(IdlePool[_Connection]):
    """The kept-alive connections of one event loop (its one thread takes the pool's lock uncontended)."""

    def usable(self, connection: _Connection) -> bool:
        return connection.usable()

    def discard(self, connection: _Connection) -> None:
        connection.abort()


#: An event loop's idle connections, closed at its shutdown (in a forked child, those of the
#: parent's loops are closed in the child only: their sockets are shared).
_idle_connections = PerLoop(_IdleConnections, _IdleConnections.close).of


def close_idle_connections() -> None:
    """Close the running event loop's kept-alive connections to storage nodes."""
    _idle_connections(asyncio.get_running_loop()).close()


class AsyncReplicaResponse:
    """The answer of one replica: ``url``, ``status``, ``headers`` (lower-cased names), ``length``
    (its ``Content-Length``, if any), and the body read with :meth:`read` or :meth:`chunks`.

    Nothing is read before it is asked for, so the reader's pace drives the transfer. Close it
    with :meth:`aclose` or ``async with``; it closes itself once the body is read, on an error,
    and when the task reading it is cancelled.
    """

    def __init__(self, url: str, connection: _Connection, status: int, headers: dict[str, str],
                 *, method: str, timeout: float) -> None:
        self.url = url
        self.status = status
        self.headers = headers
        self.length = content_length(headers)
        self._connection: _Connection | None = connection
        self._timeout = timeout
        #: Bytes of body still to come; None: until the node closes the connection.
        self._remaining = 0 if method == "HEAD" or status in NO_BODY else self.length
        # The read timeout: one timer per response rather than one per read (asyncio.timeout
        # per read cost a timer and a cancel scope each). Each read moves the deadline; the
        # timer, when it fires, re-arms itself for a moved deadline, and stops a read still
        # waiting past its deadline by raising _Silent in it (never a cancel, so a cancellation
        # from outside stays one); data that came earlier in the same turn of the loop wins.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._reading = False

    def _watch(self) -> None:
        self._watchdog = None
        if self._connection is None or not self._reading or self._loop is None:
            return  # the next read arms it again
        if self._loop.time() < self._deadline:
            self._watchdog = self._loop.call_at(self._deadline, self._watch)
        elif not self._connection.interrupt(_Silent()):
            # The read has not begun to wait (it is giving the loop its turn, or its data came in
            # this turn): once it waits, it is stopped; once it has its data, this does nothing.
            self._watchdog = self._loop.call_soon(self._watch)

    async def read(self, size: int = BODY_CHUNK_SIZE) -> bytes:
        """At most ``size`` bytes of the body, waiting up to ``timeout`` for them; ``b""`` at its end.

        A body that ends short of its ``Content-Length``, a node that goes silent and a dropped
        connection are :class:`StorageError`. Reading a response closed early is a ValueError.
        """
        if size < 1:  # StreamReader.read(-1) would read the whole body into memory
            raise ValueError(f"read size must be positive, not {size}")
        if self._remaining == 0:
            self._end(reusable=True)
            return b""
        if self._connection is None:
            raise ValueError(f"read of the closed response from {self.url}")
        if self._reading:
            raise RuntimeError(f"read of the response from {self.url} while another read of it waits")
        connection = self._connection
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self._timeout
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._deadline, self._watch)
        self._reading = True
        try:
            chunk = await connection.read(size if self._remaining is None else min(size, self._remaining))
        except _Silent:
            self._end()
            silent = StorageError(f"{self.url} sent nothing for {self._timeout:g}s", self.url)
            down_nodes.failed(self.url, silent)  # it made the reader wait, as one silent before its head
            raise silent from None
        except OSError as error:
            self._end()
            raise StorageError(f"{self.url} dropped the connection: {error or type(error).__name__}",
                               self.url) from error
        except BaseException:  # cancelled: whoever reads next would get the rest of a body
            self._end()
            raise
        finally:
            self._reading = False
        if not chunk:
            self._end()
            if self._remaining is not None:
                raise StorageError(f"{self.url} ended {self._remaining} bytes short of its length", self.url)
            self._remaining = 0
            return b""
        if self._remaining is not None:
            self._remaining -= len(chunk)
            if self._remaining == 0:
                self._end(reusable=True)
        return chunk

    async def chunks(self, size: int = BODY_CHUNK_SIZE) -> AsyncIterator[bytes]:
        """Yield the body in chunks of at most ``size`` bytes; :class:`StorageError` if it ends short."""
        while chunk := await self.read(size):
            yield chunk

    def _end(self, reusable: bool = False) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close(reusable)

    def close(self) -> None:
        """Close the connection at once, unless no body is left (a HEAD or a 204: then it is kept
        for the next request to the node); closing again does nothing."""
        self._end(reusable=self._remaining == 0)

    async def aclose(self) -> None:
        """As :meth:`close`, for ``async with`` and callers that await it."""
        self.close()

    def __del__(self) -> None:
        # Dropped open (no aclose, no async with): its connection ends with it, as a blocking
        # response's socket does, rather than stay open to the node for as long as the loop runs.
        connection = self._connection
        if connection is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self._connection = None
            connection.abort()

    async def __aenter__(self) -> AsyncReplicaResponse:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.status} {self.url!r}>"


async def _exchange(target: Target, request: bytes, method: str, timeout: float) -> AsyncReplicaResponse:
    """The response head on a kept connection to the node, or on a fresh one if that one was
    closed before any answer (the node may have closed it while it was idle)."""
    connection = await _Connection.open(target, kept=True)
    try:
        status, headers = await _ask(connection, target.url, request, method)
    except (OSError, StorageError):
        if not connection.reused or connection.received:
            raise
        connection = await _Connection.open(target)
        status, headers = await _ask(connection, target.url, request, method)
    return AsyncReplicaResponse(target.url, connection, status, headers, method=method, timeout=timeout)


async def _ask(connection: _Connection, url: str, request: bytes, method: str) -> tuple[int, dict[str, str]]:
    """Send ``request``; the status and headers of its answer, and for a GET the body's first bytes
    come too (:func:`~mogile_middleware.storage.body_follows`), left to read."""
    try:
        await connection.send(request)
        status, headers = await connection.read_head(url)
        if body_follows(method, status, headers):
            await connection.await_data(url)
    except BaseException:
        connection.abort()
        raise
    return status, headers


async def _request(url: str, method: str, headers: Mapping[str, str], timeout: float) -> AsyncReplicaResponse:
    """Send ``method`` to ``url`` and read the response head, all within ``timeout`` seconds."""
    target = Target(url)
    try:
        return await within(timeout, _exchange(target, target.request_head(method, headers, keep_alive=True), method,
                                                timeout))
    except asyncio.TimeoutError:
        raise StorageError(f"no status line and headers, or no body after them, within {timeout:g}s", url) from None


async def open_replica(
    urls: Sequence[str],
    *,
    method: str = "GET",
    byte_range: tuple[int, int] | None = None,
    size: int | None = None,
    timeout: float = 10.0,
) -> AsyncReplicaResponse:
    """Open the first of ``urls`` that answers as asked (:meth:`~.storage.ReplicaFailures.accepts`:
    of a file of ``size`` bytes, when given), trying the next on a refusal, an error, another
    answer or a bad URL; a node that did not answer lately is not asked (:mod:`.downnodes`).

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
            replica = await _request(url, method, headers, timeout)
        # ValueError: a host name the resolver refuses (UnicodeError from IDNA, a NUL byte).
        except (OSError, StorageError, ValueError) as error:
            failures.failed(url, error, time.monotonic() - started)
            continue
        finally:
            down_nodes.done(url)
        if failures.accepts(url, replica.status, replica.headers, byte_range, size):
            return replica
        await replica.aclose()
    raise failures.error(urls)


async def read_replica(urls: Sequence[str], *, length: int | None = None, timeout: float = 10.0) -> bytes:
    """As :func:`mogile_middleware.storage.read_replica`, awaited."""
    remaining = list(urls)
    while True:
        replica = await open_replica(remaining, size=length, timeout=timeout)
        try:
            return b"".join([chunk async for chunk in replica.chunks()])
        except StorageError as error:
            remaining = cut_midway(remaining, replica.url, error)
        finally:
            await replica.aclose()


class AsyncResumedReplica:
    """As :class:`~mogile_middleware.storage.ResumedReplica`, awaited: the body of an open
    ``replica`` that goes on from a replica again when its transfer is cut midway."""

    def __init__(self, replica: AsyncReplicaResponse, resumption: Resumption, *, timeout: float = 10.0) -> None:
        self.replica = replica
        self._resumption = resumption
        self._timeout = timeout
        self._closed = False

    @property
    def url(self) -> str:
        return self.replica.url

    async def chunks(self, size: int = BODY_CHUNK_SIZE) -> AsyncIterator[bytes]:
        """Yield the body in chunks of at most ``size`` bytes; raise once it cannot go on."""
        done = 0
        while True:
            try:
                async for chunk in self.replica.chunks(size):
                    done += len(chunk)
                    yield chunk
                return
            except (OSError, StorageError) as error:
                if self._closed:  # by close() from a callback or another task: no cut to go on from
                    raise
                urls, part = self._resumption.after(self.replica.url, done, error)
            await self.replica.aclose()
            replica = await open_replica(urls, byte_range=part, size=self._resumption.size, timeout=self._timeout)
            self.replica = replica
            if self._closed:  # meanwhile
                replica.close()

    def close(self) -> None:
        """As :meth:`aclose`, where nothing can be awaited (as in a callback): a read waiting
        meanwhile raises as a closed response's does, and the transfer does not go on."""
        self._closed = True
        self.replica.close()

    async def aclose(self) -> None:
        """Close the storage connection of the replica read now."""
        self.close()


class AsyncPutStream:
    """A PUT to a storage node whose body is written piece by piece.

    Open it with ``await AsyncPutStream.open(url, length=...)``: with ``length`` the body is sent
    with ``Content-Length``, otherwise chunked (mogstored takes both). Each :meth:`write` waits
    up to ``timeout`` for the node to take the data, so memory stays flat; :meth:`finish` reads
    the node's answer; :meth:`abort` drops the connection so the node never sees a complete body.
    Every failure is a :class:`StorageError`, after which the connection is dropped.
    """

    def __init__(self, url: str, connection: _Connection, *, length: int | None, timeout: float) -> None:
        self.url = url
        self._connection: _Connection | None = connection
        self._length = length
        self._timeout = timeout
        self._written = 0

    @classmethod
    async def open(cls, url: str, *, length: int | None = None, timeout: float = 10.0) -> AsyncPutStream:
        """Connect to the node of ``url`` and send the request head, within ``timeout`` seconds."""
        target = Target(url)
        framing = {"Transfer-Encoding": "chunked"} if length is None else {"Content-Length": str(length)}
        request = target.request_head("PUT", framing)

        async def connect() -> _Connection:
            connection = await _Connection.open(target)
            try:
                await connection.send(request)
            except BaseException:
                connection.abort()
                raise
            return connection

        try:
            connection = await within(timeout, connect())
        except asyncio.TimeoutError:
            raise StorageError(f"PUT {url} refused: no connection within {timeout:g}s", url) from None
        # ValueError: a host name the resolver refuses (UnicodeError from IDNA, a NUL byte).
        except (OSError, ValueError) as error:
            raise StorageError(f"PUT {url} refused: {error or type(error).__name__}", url) from error
        return cls(url, connection, length=length, timeout=timeout)

    def _open_connection(self) -> _Connection:
        if self._connection is None:
            raise StorageError(f"PUT {self.url} is already finished or aborted", self.url)
        return self._connection

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send the next piece of the body."""
        connection = self._open_connection()
        data = byte_view(data)
        if not data:
            return
        size = len(data)
        if self._length is not None and self._written + size > self._length:
            self.abort()
            raise LengthMismatchError.longer(self.url, self._length)
        try:
            if self._length is None:
                await within(self._timeout, connection.send(b"%X\r\n" % size))
            for piece in put_pieces(data):  # each taken within the timeout, whatever the whole's size
                await within(self._timeout, connection.send(piece))
                # A send waits only while the node takes nothing: a node taking each piece at once
                # would leave the loop's other tasks no turn until the whole body is sent.
                await asyncio.sleep(0)
            if self._length is None:
                await within(self._timeout, connection.send(b"\r\n"))
        except asyncio.TimeoutError:
            self.abort()
            raise StorageError(f"PUT {self.url} stalled: the node took nothing for {self._timeout:g}s",
                               self.url) from None
        except OSError as error:
            failure = put_dropped(self.url, connection._sock, error)
            self.abort()
            raise failure from error
        except BaseException:
            self.abort()
            raise
        self._written += size

    @property
    def written(self) -> int:
        """The bytes of the body written so far."""
        return self._written

    async def finish(self) -> None:
        """End the body and check that the node stored it (2xx), its answer's head read within
        ``timeout`` (its body, if any, is not read: the connection is closed)."""
        connection = self._open_connection()
        if self._length is not None and self._written != self._length:
            self.abort()
            raise LengthMismatchError.shorter(self.url, self._written, self._length)
        self._connection = None

        async def answer() -> int:
            if self._length is None:
                await connection.send(b"0\r\n\r\n")
            status, _ = await connection.read_head(self.url)
            return status

        try:
            status = await within(self._timeout, answer())
        except asyncio.TimeoutError:
            connection.abort()
            raise StorageError(f"PUT {self.url} failed: no answer within {self._timeout:g}s", self.url) from None
        except (OSError, StorageError) as error:
            connection.abort()
            raise StorageError(f"PUT {self.url} failed: {error or type(error).__name__}", self.url) from error
        except BaseException:
            connection.abort()
            raise
        connection.abort()  # never kept: the request said Connection: close
        if not 200 <= status < 300:
            raise StorageError(f"PUT {self.url} answered HTTP {status}", self.url, status)

    def abort(self) -> None:
        """Drop the connection without finishing the body; aborting again does nothing."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()
