"""Connections to MogileFS trackers for asyncio: kept open per event loop, failed over.

:class:`AsyncTrackerPool` is :class:`~mogile_middleware.tracker.TrackerPool` for coroutines: the
same dead-tracker table, retries and deadline (both run the steps of
:meth:`~mogile_middleware.tracker.TrackerPoolBase.steps`), over :func:`asyncio.open_connection`.
A connection belongs to the event loop that opened it: a pool used from several loops (one per
thread, or one ``asyncio.run`` after another) keeps their connections apart and never touches
another loop's.

Example::

    pool = AsyncTrackerPool(["10.0.0.1:7001", "10.0.0.2:7001"])
    reply, tracker = await pool.request("get_paths", {"domain": "media", "key": "avatars/42.png"})
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .deadline import readable_now, time_left, within
from .loopnet import PerLoop, connect
from .nodepool import end_orphaned
from .exceptions import ProtocolError, TrackerUnavailableError
from .protocol import ArgValue, Reply, parse_reply
from .tracker import (
    ANSWERED_AFTER_STORAGE,
    MAX_REPLY_BYTES,
    Address,
    Dial,
    ReadReply,
    Step,
    StepRunner,
    IdleTrackerConnections,
    TakeIdle,
    TrackerPoolBase,
    kept_if_answered,
)


class AsyncTrackerConnection:
    """One TCP connection to a tracker on the running event loop: send a line, read a line."""

    def __init__(self, address: Address, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.address = address
        self._reader = reader
        self._writer = writer
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, address: Address, connect_timeout: float) -> AsyncTrackerConnection:
        """Connect to ``address``, its name looked up and each of its addresses tried within
        ``connect_timeout`` seconds (see :func:`~mogile_middleware.loopnet.connect`)."""
        sock = await connect(*address, connect_timeout)
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_REPLY_BYTES)
        except BaseException:
            sock.close()
            raise
        return cls(address, reader, writer)

    def is_stale(self) -> bool:
        """True if the idle connection has something to read: the tracker closed it or misspoke."""
        # StreamReader shows no buffered bytes publicly; an idle connection must have none. The
        # socket is asked too: a close that arrived while the loop was busy is not read yet.
        return (self._writer.is_closing() or self._reader.at_eof() or bool(self._reader._buffer)
                or readable_now(self._writer.get_extra_info("socket")))

    async def roundtrip(self, request: bytes, deadline: float) -> bytes:
        """Send one request line and return the reply line, whole by ``deadline`` (a
        :func:`time.monotonic` time), else :class:`TimeoutError`; raises on EOF or an oversized line."""
        try:
            return await within(time_left(deadline), self._roundtrip(request))
        except asyncio.TimeoutError:  # not an OSError before Python 3.11
            raise TimeoutError("timed out") from None

    async def _roundtrip(self, request: bytes) -> bytes:
        self._writer.write(request)
        await self._writer.drain()
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise ProtocolError(f"tracker reply longer than {MAX_REPLY_BYTES} bytes") from None
        except asyncio.IncompleteReadError as error:
            if not error.partial:
                raise ConnectionResetError("tracker closed the connection") from None
            raise ProtocolError(f"tracker reply cut short: {error.partial[:80]!r}") from None

    def close(self) -> None:
        """Close the connection; it is not used again."""
        if self._loop.is_closed():
            end_orphaned(self._writer.transport)
        else:
            self._writer.close()


@dataclass
class _LoopConnections:
    """The connections of one event loop: idle ones per tracker, the requests in flight, and per
    tracker the connection of a request given up, with the timer that hears whether it was answered."""

    slots: asyncio.Semaphore
    idle: IdleTrackerConnections[AsyncTrackerConnection]
    given_up: dict[Address, tuple[AsyncTrackerConnection, asyncio.TimerHandle]] = field(default_factory=dict)
    #: Whether :meth:`AsyncTrackerPool.aclose` closed them, and no request began since: the requests
    #: it left in flight (a server's shutdown cancels them after the lifespan's) keep no connection.
    closed: bool = False
    #: The process that made them: a child forked while the loop ran has its copy of the loop.
    made_in: int = field(default_factory=os.getpid)

    def close(self) -> None:
        """Close the idle connections and those of requests given up; in a child forked since,
        none: closing there would take their sockets out of the epoll instance it shares with the
        parent, which still uses them (they are kept there, unused)."""
        if os.getpid() != self.made_in:
            return
        self.idle.close()
        given_up, self.given_up = self.given_up, {}
        for connection, hearing in given_up.values():
            hearing.cancel()
            connection.close()


class AsyncTrackerPool(TrackerPoolBase):
    """Kept-open connections to a set of trackers for asyncio, with a dead-tracker table and failover.

    The arguments are :class:`~mogile_middleware.tracker.TrackerPool`'s. At most
    :attr:`max_connections` requests are in flight at once per event loop, each on its own
    connection (so at most that many connections per tracker and loop, and one of a request given
    up, kept until its deadline); the others wait their turn.
    """

    #: Requests in flight at once per event loop (set it on a pool before its first request).
    max_connections = 10

    def _reset(self) -> None:
        super()._reset()
        self._loops = PerLoop(self._new_loop_connections, _LoopConnections.close)

    def _new_loop_connections(self) -> _LoopConnections:
        return _LoopConnections(asyncio.Semaphore(self.max_connections), IdleTrackerConnections(self._clock))

    def _connections(self) -> _LoopConnections:
        """The running loop's connections."""
        return self._loops.of(asyncio.get_running_loop())

    def _drop_idle(self, address: Address) -> None:
        """Close the running loop's idle connections to ``address`` (other loops' are not touched)."""
        try:
            idle = self._connections().idle
        except RuntimeError:  # no running loop: no connection of ours to close
            return
        idle.drop(address)

    async def request(
        self,
        command: str,
        args: Mapping[str, ArgValue] | None = None,
        read: ReadReply | None = None,
    ) -> tuple[Any, Address]:
        """Send ``command`` and return the decoded ``OK`` arguments (as ``read`` reads them) and
        the tracker that answered.

        As :meth:`TrackerPool.request <mogile_middleware.tracker.TrackerPool.request>`. A
        cancelled request frees its place at once; its connection is closed, or kept until its
        deadline to hear whether the tracker answers (see :meth:`_hear_at_deadline`).
        """
        connections = self._connections()
        connections.closed = False
        # A wait for a slot lasts as long as a request in flight takes to leave a silent tracker for
        # the next: a burst queued behind requests held by a hung tracker is answered by another
        # one, and requests of departed clients queue no one for long.
        waiting = self.io_timeout + self.connect_timeout
        try:
            await within(waiting, connections.slots.acquire())
        except asyncio.TimeoutError:
            raise TrackerUnavailableError(
                f"no tracker asked: the event loop's {self.max_connections} tracker requests in flight took "
                f"longer than io_timeout and connect_timeout ({waiting:g} s)") from None
        try:
            runner = StepRunner(self.steps(command, args, read))
            try:
                for step in runner:
                    try:
                        runner.result = await self._carry_out(connections, step, command)
                    except Exception as error:
                        runner.error = error
            finally:
                runner.close()
            return runner.value
        finally:
            connections.slots.release()

    async def _carry_out(self, connections: _LoopConnections, step: Step, command: str) -> object:
        if isinstance(step, TakeIdle):
            return connections.idle.take(step.address)
        if isinstance(step, Dial):
            return await AsyncTrackerConnection.open(step.address, self.connect_timeout)
        return await self._roundtrip(connections, step.connection, step.line, step.deadline, command)

    async def _roundtrip(self, connections: _LoopConnections, connection: AsyncTrackerConnection, line: bytes,
                         deadline: float | None, command: str) -> Reply:
        due = time.monotonic() + self.io_timeout if deadline is None else deadline
        try:
            reply = await connection.roundtrip(line, due)
        except asyncio.CancelledError:
            if command in ANSWERED_AFTER_STORAGE or connection.address in connections.given_up or connections.closed:
                connection.close()
            else:
                self._hear_at_deadline(connections, connection, due)
            raise
        except BaseException:
            connection.close()
            raise
        with kept_if_answered(connection, lambda kept: kept.close() if connections.closed
                              else connections.idle.give(kept.address, kept)):
            return parse_reply(reply)

    def _hear_at_deadline(self, connections: _LoopConnections, connection: AsyncTrackerConnection,
                          due: float) -> None:
        """Keep the connection of a request given up (its task cancelled: the client left) until
        its deadline, then close it: a tracker that sent nothing by then is marked dead, as if the
        request had waited. Where clients or a front proxy give up sooner than ``io_timeout``, a
        hung tracker would otherwise be asked by every request and never left for another. One
        such connection per tracker is evidence enough: the others are closed at once."""
        def heard() -> None:
            del connections.given_up[connection.address]
            if not connection.is_stale():  # nothing came, not even a close
                self.mark_dead(connection.address, TimeoutError("no reply to a request given up"))
            connection.close()

        hearing = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), heard)
        connections.given_up[connection.address] = connection, hearing

    async def aclose(self) -> None:
        """Close the running loop's idle connections and those of requests given up; connections in
        use are closed as their requests end, until another request begins."""
        connections = self._connections()
        connections.closed = True
        connections.close()
