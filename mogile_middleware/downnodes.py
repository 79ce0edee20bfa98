"""Storage nodes that did not answer lately: not asked again for a while.

A hung storage node (stopped, its disk stuck, a network black hole) costs each request that asks
it a whole ``storage_timeout``, and mogilefsd goes on listing it (its monitor notices no hang).
So a node that made a request wait before failing it (silent past the timeout, or slow to refuse:
see :class:`~mogile_middleware.storage.ReplicaFailures`) is marked down for :data:`DOWN_SECONDS`,
as a tracker is marked dead (a quick refusal costs nothing, so it marks nothing): meanwhile it is not
asked, so a file with a replica elsewhere is read from there at once and one it alone holds
fails at once, rather than each request holding a worker for the timeout. Then one request at a
time asks it again (the others still pass it by); any answer, a 404 too, clears the mark, and
another failure renews it. Per process, shared by threads and event loops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from .forking import renew_in_child
from .nodepool import Node
from .tracker import describe_address

log = logging.getLogger("mogile_middleware")

#: How long a storage node that did not answer is passed by.
DOWN_SECONDS = 5.0


class DownNodes:
    """The storage nodes marked down, and those a request is asking again."""

    def __init__(self, seconds: float = DOWN_SECONDS) -> None:
        self.seconds = seconds
        self._until: dict[Node, float] = {}
        self._asking: set[Node] = set()
        self._lock = threading.Lock()
        renew_in_child(self)

    def ordered(self, urls: Sequence[str]) -> Sequence[str]:
        """``urls``, those on nodes marked down last (where the others answer, none is asked), and
        those being asked again by another request. A node whose mark has run out is in its place
        again: kept last until it answered, a node back up would get no reads for good wherever
        another replica answers, and its mark would never be cleared."""
        if not self._until:  # the usual case, at no cost
            return urls
        now = time.monotonic()
        return sorted(urls, key=lambda url: self._passed_by(_node(url), now))

    def _passed_by(self, node: Node | None, now: float) -> bool:
        until = self._until.get(node)  # type: ignore[arg-type]
        return until is not None and (now < until or node in self._asking)

    def may_ask(self, url: str) -> bool:
        """False while the node of ``url`` is marked down, or is being asked again by another
        request; True otherwise (then, for a node whose mark has run out, this request asks it
        and must call :meth:`done`)."""
        if not self._until:
            return True
        node = _node(url)
        with self._lock:
            until = self._until.get(node)
            if until is None:
                return True
            if time.monotonic() < until or node in self._asking:
                return False
            self._asking.add(node)
            return True

    def seconds_down(self, url: str) -> float:
        """How long until the node of ``url`` may be asked again (0 when it may)."""
        until = self._until.get(_node(url))
        return 0.0 if until is None else max(until - time.monotonic(), 0.0)

    def failed(self, url: str, error: BaseException) -> None:
        """The node of ``url`` did not answer (``error``): mark it down (again)."""
        node = _node(url)
        if node is None:  # not a URL a node could be asked at
            return
        with self._lock:
            marked = node in self._until
            self._until[node] = time.monotonic() + self.seconds
            self._asking.discard(node)
        if not marked:
            log.warning("storage node %s failed (%s): not asked for %gs", describe_address(*node),
                        str(error) or type(error).__name__, self.seconds)

    def answered(self, url: str) -> None:
        """The node of ``url`` answered: it is up."""
        if self._until:
            node = _node(url)
            with self._lock:
                self._until.pop(node, None)  # type: ignore[arg-type]
                self._asking.discard(node)  # type: ignore[arg-type]

    def done(self, url: str) -> None:
        """A request that asked the node of ``url`` again has its answer, or gave up."""
        if self._asking:
            with self._lock:
                self._asking.discard(_node(url))  # type: ignore[arg-type]

    def clear(self) -> None:
        """Forget every mark."""
        with self._lock:
            self._until.clear()
            self._asking.clear()

    def renew_after_fork(self) -> None:
        # In a forked child no request is asking anything, whatever the parent's threads were doing.
        self._lock = threading.Lock()
        self._asking = set()


def _node(url: str) -> Node | None:
    try:
        parts = urlsplit(url)
        return (parts.hostname or "", parts.port or 80)
    except ValueError:
        return None


#: The marks of this process, used by both sides' ``open_replica``.
down_nodes = DownNodes()
