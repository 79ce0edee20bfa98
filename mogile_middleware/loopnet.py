"""The asyncio side's connections to trackers and storage nodes: made by :func:`connect` (each
address of a name given its time), and closed with their event loop (:func:`close_at_loop_end`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

from .deadline import within

T = TypeVar("T")


def close_at_loop_end(close: Callable[[], object]) -> AsyncGenerator[None, None]:
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
