"""A timer thread for the development tracker's delayed background work (copies and deletions).

mogilefsd replicates and deletes in background jobs, seconds after the command that caused the
work answered; with a ``replication_delay`` the development tracker imitates that by handing
the work to a :class:`Scheduler`: one daemon thread running actions from a heap of due times.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Scheduler:
    """Runs actions once they are due, one at a time, in order of due time, on a daemon thread.

    :meth:`stop` drops the actions not yet due (their owner says what that means for its work).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()  # ties run in the order they were scheduled
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def call_later(self, delay: float, action: Callable[[], None]) -> None:
        """Run ``action`` on the scheduler thread ``delay`` seconds from now (or when it is free then)."""
        with self._changed:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), action))
            self._changed.notify()

    def start(self) -> None:
        """Start the scheduler thread (again, after :meth:`stop`)."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mogile-dev-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Drop the pending actions and stop once the running one, if any, has finished."""
        with self._changed:
            self._stopping = True
            self._heap.clear()
            self._changed.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while (action := self._next_due()) is not None:
            try:
                action()
            except Exception:  # a failed action must not end the scheduler
                log.warning("scheduled action failed", exc_info=True)

    def _next_due(self) -> Callable[[], None] | None:
        """Wait for the earliest action to be due and take it; ``None`` once stopping."""
        with self._changed:
            while not self._stopping:
                if not self._heap:
                    self._changed.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait <= 0:
                    return heapq.heappop(self._heap)[2]
                self._changed.wait(wait)
            return None
