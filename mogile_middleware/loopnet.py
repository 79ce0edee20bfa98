"""What the asyncio side keeps per event loop: connections to trackers and storage nodes, made by
:func:`connect` (each address of a name given its time), and threads, kept and ended with their
loop by :class:`PerLoop`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Generic, TypeVar

from .deadline import within
from .forking import renew_in_child

T = TypeVar("T")


class PerLoop(Generic[T]):
    """One ``T`` for each event loop, made by ``make`` when the loop first asks, and given to
    ``end`` at the loop's shutdown (see :func:`_close_at_loop_end`); a loop closed without one
    has its ``T`` ended when another loop first asks, as a forked child ends those of its
    parent's loops: ``end`` must do there only what is safe in a child (closing a plain socket,
    not an asyncio transport or a lock the parent's threads take). What the asyncio side keeps
    per loop is thus neither used by another loop nor kept past its own."""

    def __init__(self, make: Callable[[], T], end: Callable[[T], object]) -> None:
        self._make = make
        self._end = end
        self._lock = threading.Lock()  # loops in other threads may share one
        #: Each loop's ``T``, the async generator that ends it (held for the loop's life) and the
        #: process that made it.
        self._kept: dict[asyncio.AbstractEventLoop, tuple[T, AsyncGenerator[None, None] | None, int]] = {}
        renew_in_child(self)

    def renew_after_fork(self) -> None:
        self._lock = threading.Lock()

    def of(self, loop: asyncio.AbstractEventLoop) -> T:
        """``loop``'s ``T``, made now if it has none (ended at its shutdown if it is the running loop)."""
        kept = self._kept.get(loop)
        if kept is not None:
            return kept[0]
        with self._lock:
            kept = self._kept.get(loop)
            if kept is not None:  # made by another thread meanwhile
                return kept[0]
            ended = [self._dropped(other) for other, (_, _, made_in) in list(self._kept.items())
                     if made_in != os.getpid() or other.is_closed()]
            value = self._make()
            ending = None
            if loop is asyncio._get_running_loop():
                ending = _close_at_loop_end(functools.partial(self._ended, loop, value))
            self._kept[loop] = value, ending, os.getpid()
        for other in ended:
            self._end(other)
        return value

    def _ended(self, loop: asyncio.AbstractEventLoop, value: T) -> None:
        """End ``value``, the ``T`` of ``loop``, at its shutdown."""
        with self._lock:
            if self._kept.get(loop, (None,))[0] is value:
                self._dropped(loop)
        self._end(value)

    def _dropped(self, loop: asyncio.AbstractEventLoop) -> T:
        kept = self._kept.pop(loop)
        if kept[2] != os.getpid():
            _inherited.append(kept)
        return kept[0]


#: What a forked child drops of its parent's loops, kept for the child's life: an asyncio
#: transport collected is closed, which takes its socket out of the epoll instance both share,
#: and a loop's ending collected wakes the parent's loop.
_inherited: list[object] = []


def _close_at_loop_end(close: Callable[[], object]) -> AsyncGenerator[None, None]:
    """Have the running event loop's shutdown call ``close`` while the loop still can: what it
    returns, held for the loop's life, is an async generator waiting at its ``yield``, which the
    loop's ``shutdown_asyncgens`` (called by ``asyncio.run``, uvloop's, anyio's and test runners'
    before closing it) closes. Left open, a loop's connections were left to the collector, with a
    ResourceWarning each, or, in a ``--preload`` master that asked once at start, kept there and
    copied into every worker forked from it."""
    ending = _closing(close)
    with contextlib.suppress(StopIteration):  # run to its yield: nothing there awaits
        ending.asend(None).send(None)
    return ending


async def _closing(close: Callable[[], object]) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        close()
        await asyncio.sleep(0)  # the transports' closing, scheduled by close(), runs before the loop ends


async def connect(host: str, port: int, timeout: float | None = None) -> socket.socket:
    """A connected non-blocking socket to the first address of ``host`` that takes one, as
    ``loop.create_connection`` makes them (Nagle's algorithm off). With ``timeout``, the lookup of
    a name and each address get that many seconds, as ``socket.create_connection`` gives each
    address its timeout: a first address that never answers leaves time for the next. (A lookup
    and connect given up in uvloop's ``create_connection`` log "Future exception was never
    retrieved", uvloop#437; these do not.)"""
    loop = asyncio.get_running_loop()
    try:  # an address, as trackers give them, is read at once: a name is looked up in a thread
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        try:
            addresses = await _bounded(timeout, loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except asyncio.TimeoutError:  # not an OSError before Python 3.11
            raise TimeoutError(f"no address for {host!r} within {timeout:g}s") from None
    errors: list[OSError] = []
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await _bounded(timeout, loop.sock_connect(sock, address))
        except (OSError, asyncio.TimeoutError) as error:  # within()'s, an OSError from Python 3.11, says nothing
            sock.close()
            errors.append(TimeoutError(f"no connection within {timeout:g}s") if isinstance(error, asyncio.TimeoutError)
                          and not error.args else error)
        except BaseException:
            sock.close()
            raise
        else:
            return sock
    if not errors:
        raise OSError(f"no address for {host!r}")
    if len({str(error) for error in errors}) == 1:
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(error) for error in errors)}")


async def _bounded(timeout: float | None, awaitable: Awaitable[T]) -> T:
    """``await awaitable``, within ``timeout`` seconds unless it is ``None``."""
    return await (awaitable if timeout is None else within(timeout, awaitable))
