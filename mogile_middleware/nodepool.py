"""Kept-alive connections to storage nodes, reused by the next request to the same node.

A connection to a storage node costs a TCP handshake and, on the node, a new client (mogstored's
Perlbal keeps HTTP/1.1 clients alive for 30 s). :class:`NodePool` keeps the idle ones of each
node: bounded in number and age, thread-safe, and empty again in a forked child (a gunicorn
worker never uses its master's sockets). Only a connection whose response was read to its end,
and that the node keeps open, comes back; one that failed or was left mid-body is closed.
"""

from __future__ import annotations

import http.client
import os
import select
import threading
import time

#: Idle connections kept per node; more are closed.
IDLE_PER_NODE = 16
#: An idle connection older than this is closed rather than reused: well below mogstored's 30 s
#: keep-alive, so the node has not closed its side yet.
IDLE_SECONDS = 10.0

Node = tuple[str, int]


class NodePool:
    """Idle kept-alive ``http.client`` connections, per ``(host, port)``."""

    def __init__(self, per_node: int = IDLE_PER_NODE, idle_seconds: float = IDLE_SECONDS) -> None:
        self.per_node = per_node
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle: dict[Node, list[tuple[float, http.client.HTTPConnection]]] = {}
        self._pid = os.getpid()

    def take(self, node: Node) -> http.client.HTTPConnection | None:
        """The most recently used idle connection to ``node`` that is still open, if any."""
        now = time.monotonic()
        stale = []
        found = None
        with self._lock:
            self._forget_parents()
            idle = self._idle.get(node)
            while idle and found is None:
                since, connection = idle.pop()
                if now - since < self.idle_seconds and _open(connection):
                    found = connection
                else:
                    stale.append(connection)
        for connection in stale:
            connection.close()
        return found

    def give(self, node: Node, connection: http.client.HTTPConnection) -> None:
        """Keep ``connection`` (idle, its last response read to the end) for the next request to ``node``."""
        dropped = None
        with self._lock:
            self._forget_parents()
            idle = self._idle.setdefault(node, [])
            if len(idle) >= self.per_node:
                _, dropped = idle.pop(0)  # the oldest
            idle.append((time.monotonic(), connection))
        if dropped is not None:
            dropped.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for _, connection in connections:
                connection.close()

    def _forget_parents(self) -> None:
        # In a forked child the parent's connections are shared sockets: never used, and closed
        # here only in this process (the parent's stay open).
        if self._pid != os.getpid():
            self._pid = os.getpid()
            for connections in self._idle.values():
                for _, connection in connections:
                    connection.close()
            self._idle = {}


def _open(connection: http.client.HTTPConnection) -> bool:
    """True if the idle connection has nothing to read: a node that closed it (or sent anything
    unasked) makes it readable."""
    sock = connection.sock
    if sock is None:
        return False
    poll = select.poll()  # not select(): descriptors past 1023 are common in a busy worker
    poll.register(sock, select.POLLIN)
    return not poll.poll(0)


#: The pool of this process, used by :func:`~mogile_middleware.storage.open_replica`.
nodes = NodePool()
