"""Deadlines on socket reads: a peer that trickles its answer cannot hold a request past them.

A socket timeout restarts with every byte that arrives; the tracker client and the storage
client both read through :class:`DeadlineReader` to bound a whole reply instead. The timeouts
themselves are checked where they are given (:func:`checked_seconds`).
"""

from __future__ import annotations

import asyncio
import io
import select
import socket
import sys
import time
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


#: The longest duration an option takes: a year (the system's clocks and timeouts take no infinity).
MAX_SECONDS = 365 * 24 * 3600


def checked_seconds(name: str, value: float, *, zero: bool = False) -> float:
    """``value`` if it is a number of seconds above 0 (or 0 itself, with ``zero``) and at most
    :data:`MAX_SECONDS`; otherwise a ValueError naming the option ``name``, raised where it is
    given rather than at a request."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not ((value >= 0 if zero else value > 0) and value <= MAX_SECONDS):
        raise ValueError(f"{name} must be a number of seconds {'>=' if zero else '>'} 0 and at most a year "
                         f"({MAX_SECONDS}), not {value!r}")
    return value


def time_left(deadline: float, now: float | None = None) -> float:
    """Seconds until ``deadline`` (a :func:`time.monotonic` time); :class:`TimeoutError` once it has passed."""
    left = deadline - (time.monotonic() if now is None else now)
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def readable_now(sock: socket.socket) -> bool:
    """True if ``sock`` has something to read (or was closed by its peer), without waiting."""
    if not hasattr(select, "poll"):  # removed by eventlet's monkey-patching, whose select() knows no 1023 limit
        return bool(select.select([sock], [], [], 0)[0])
    poll = select.poll()  # not select(): descriptors past 1023 are common in a busy worker
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(0))


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """``await awaitable``, or :class:`asyncio.TimeoutError` after ``seconds``. A cancellation
    that lands as ``awaitable`` finishes still cancels, where ``asyncio.wait_for`` before Python
    3.12 returns the result and drops it (CPython gh-86296), so that a cancelled call would run
    on; so does one that lands with the timeout."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):  # a timer, rather than the task per call of wait_for
            return await awaitable
    return await _within_timer(seconds, awaitable)


async def _within_timer(seconds: float, awaitable: Awaitable[T]) -> T:
    """:func:`within` on Python 3.10, which has no ``asyncio.timeout``: ``awaitable`` is awaited
    in the caller's task (what it got is never dropped: a slot, a connection, a reply), which a
    timer cancels. 3.10 counts no cancellations, so one from elsewhere in the same loop turn is
    told from the timer's by the task's state (3.10's, which no later release changes): before
    the timer's, the task is cancelled already; after it, it has replaced the timer's message."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("within() is awaited outside a task")
    expired = False

    def expire() -> None:
        nonlocal expired
        waiter = task._fut_waiter  # type: ignore[union-attr]
        if task._must_cancel or (waiter is not None and waiter.cancelled()):  # type: ignore[union-attr]
            return  # cancelled by another already: that cancellation ends the call
        expired = True
        task._cancel_message = _DEADLINE  # type: ignore[union-attr]
        task.cancel(_DEADLINE)  # type: ignore[union-attr]

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if expired and task._cancel_message is _DEADLINE:  # no cancellation came after the timer's
            raise asyncio.TimeoutError from None
        raise
    finally:
        timer.cancel()


#: The message of a deadline's cancellation on Python 3.10, to tell it from another's.
_DEADLINE = "deadline passed"


class DeadlineReader(io.RawIOBase):
    """The bytes of a socket, for an :class:`io.BufferedReader`, each read waiting only until ``deadline``.

    A socket timeout restarts with every byte that arrives, so a peer that trickles a line holds a
    plain reader for ever; here the socket timeout is cut to the time left before a read. With
    ``deadline`` ``None`` the socket's own timeout applies.
    """

    #: A read may end this many seconds past the deadline: the socket timeout is set again only
    #: when more time has passed since it was last set, so the reply read right after a request
    #: (the usual case) costs no extra system call.
    SLACK = 0.001

    def __init__(self, sock: socket.socket, deadline: float | None = None) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline
        #: Bytes received so far: what a buffered reader over this one holds beyond what it gave out.
        self.received = 0
        self._timeout_set_at = float("-inf")
        # Held, not read from: a reader from makefile() is counted, so closing the socket (as
        # http.client does when the response will close it) leaves the descriptor open until this
        # reader is closed too. Reading the socket directly saves a call on every reply.
        self._raw = sock.makefile("rb", buffering=0)

    def set_deadline(self, deadline: float) -> None:
        """Read until ``deadline`` from now on; the socket timeout is cut to it at once (for a send too)."""
        self._timeout_set_at = now = time.monotonic()
        self.deadline = deadline
        self.sock.settimeout(time_left(deadline, now))

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.sock.fileno()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.deadline is not None:
            now = time.monotonic()
            if now - self._timeout_set_at > self.SLACK:
                self.sock.settimeout(time_left(self.deadline, now))
                self._timeout_set_at = now
        count = self.sock.recv_into(buffer)
        self.received += count
        return count

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()
