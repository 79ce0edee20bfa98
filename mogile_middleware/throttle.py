"""Log lines of events that come in floods (every request while no tracker answers): one line at
most per interval, the next one counting the events left out since."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class ThrottledLog:
    """Log ``message`` (``%``-formatted with an event's arguments) at ``level`` for the first event
    at once, then at most once per ``interval`` seconds, counting the events left out since the
    line before as ``counted``, with the seconds since it (threads racing may miscount one); those
    after the last line are counted in the next one. ``clock`` tells the seconds."""

    def __init__(self, log: logging.Logger, level: int, message: str, interval: float, counted: str, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._level, self._message, self._interval, self._counted = log, level, message, interval, counted
        self._clock = clock
        self._logged_at = float("-inf")
        self._left_out = 0

    def event(self, *args: object) -> None:
        now = self._clock()
        if now - self._logged_at < self._interval:
            self._left_out += 1
            return
        left_out, self._left_out, logged_at, self._logged_at = self._left_out, 0, self._logged_at, now
        # The span told: the events counted may be those of an earlier flood, minutes before this one.
        self._log.log(self._level, self._message + "%s", *args,
                      f" ({left_out} more {self._counted} in the {now - logged_at:.0f} s since the last line like this)"
                      if left_out else "")
