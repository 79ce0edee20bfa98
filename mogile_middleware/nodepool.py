"""Kept-alive connections to storage nodes (and, through :class:`IdlePool`, to trackers),
reused by the next request to the same node.

A connection to a storage node costs a TCP handshake and, on the node, a new client (mogstored's
Perlbal keeps HTTP/1.1 clients alive for 30 s). :class:`IdlePool` keeps the idle ones of each
node: bounded in number and age, thread-safe, and empty again in a forked child (a gunicorn
worker never uses its master's sockets); :class:`NodePool` is the WSGI side's, the asyncio side
keeps one per event loop, and the tracker pools keep theirs in one too. Only a connection whose
response was read to its end, and that the node keeps open, comes back; one that failed or was
left mid-body is closed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .deadline import readable_now
from .forking import renew_in_child

if TYPE_CHECKING:
    from .storage import NodeConnection

#: Idle connections kept per node; more are closed.
IDLE_PER_NODE = 16
#: An idle connection older than this is closed rather than reused: well below mogstored's 30 s
#: keep-alive, so the node has not closed its side yet.
IDLE_SECONDS = 10.0

Node = tuple[str, int]
C = TypeVar("C")


class IdlePool(Generic[C]):
    """Idle kept-alive connections of any kind, per ``(host, port)``: :meth:`usable` says whether
    one may still be used, :meth:`discard` closes one.

    The one used last is taken first, so those a burst opened beyond the steady load sink unused;
    any idle for ``idle_seconds`` are closed as the pool is next used (each node's when a
    connection comes back to it, every node's once per ``idle_seconds``), and beyond ``per_node``
    (``None``: no bound) the oldest is closed at once.
    """

    def __init__(self, per_node: int | None = IDLE_PER_NODE, idle_seconds: float = IDLE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_node = per_node
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: dict[Node, list[tuple[float, C]]] = {}
        self._pid = os.getpid()
        self._swept_at = clock()
        renew_in_child(self)

    def usable(self, connection: C) -> bool:
        raise NotImplementedError

    def discard(self, connection: C) -> None:
        raise NotImplementedError

    def take(self, node: Node) -> C | None:
        """The most recently used idle connection to ``node`` that is still usable, if any."""
        now = self._clock()
        while True:
            # usable() is asked outside the lock: under gevent its poll yields to other greenlets,
            # and a lock made before monkey-patching (gunicorn --preload) is the thread's, so one
            # of them taking it meanwhile would stop the whole worker.
            with self._lock:
                self.forget_parents()
                idle = self._idle.get(node)
                if not idle:
                    return None
                since, connection = idle.pop()
            if now - since < self.idle_seconds and self.usable(connection):
                return connection
            self.discard(connection)

    def give(self, node: Node, connection: C) -> None:
        """Keep ``connection`` (idle, its last response read to the end) for the next request to ``node``."""
        now = self._clock()
        with self._lock:
            self.forget_parents()
            idle = self._idle.setdefault(node, [])
            idle.append((now, connection))
            dropped = self._unused(idle, now)
            if self.per_node is not None and len(idle) > self.per_node:
                dropped.append(idle.pop(0)[1])  # the oldest
            if now - self._swept_at >= self.idle_seconds:
                self._swept_at = now
                for other in self._idle.values():
                    dropped += self._unused(other, now)
        for stale in dropped:
            self.discard(stale)

    def _unused(self, idle: list[tuple[float, C]], now: float) -> list[C]:
        """Take out of ``idle`` (the oldest first) the connections idle for ``idle_seconds``."""
        count = 0
        while count < len(idle) and now - idle[count][0] >= self.idle_seconds:
            count += 1
        unused = [connection for _, connection in idle[:count]]
        del idle[:count]
        return unused

    def drop(self, node: Node) -> None:
        """Close every idle connection to ``node``."""
        with self._lock:
            idle = self._idle.pop(node, [])
        for _, connection in idle:
            self.discard(connection)

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for _, connection in connections:
                self.discard(connection)

    def forget_parents(self) -> None:
        """In a forked child, close its copies of the parent's connections, shared sockets never
        used here (the parent's stay open). Without the lock, which another thread of the parent
        may have held at the fork: in an at-fork hook no other thread runs."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            for connections in self._idle.values():
                for _, connection in connections:
                    self.discard(connection)
            self._idle = {}

    def renew_after_fork(self) -> None:
        self._lock = threading.Lock()


class NodePool(IdlePool["NodeConnection"]):
    """Idle kept-alive connections of the WSGI side, shared by threads."""

    def usable(self, connection: NodeConnection) -> bool:
        # Readable while idle: the node closed it (or sent something unasked). Made in another
        # process (open at a fork, closed on both sides): the other's too, answers would cross.
        return connection.pid == os.getpid() and not connection.closed and not readable_now(connection.sock)

    def discard(self, connection: NodeConnection) -> None:
        connection.close()


#: The pool of this process, used by :func:`~mogile_middleware.storage.open_replica`.
nodes = NodePool()


def end_orphaned(transport: Any) -> None:
    """End the TCP connection of an asyncio ``transport`` whose event loop is closed and can close
    it no more; the socket closes when collected. uvloop closed it with the loop: it gives none, or
    one it kept for an earlier caller, which takes no ``shutdown`` (a TypeError)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, TypeError):
            sock.shutdown(socket.SHUT_RDWR)
