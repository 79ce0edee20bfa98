"""ThrottledLog: one line per interval in a flood, the next one counting the events left out and
the seconds they were left out in (which may span an earlier flood, minutes before)."""

from __future__ import annotations

import logging

import pytest

from mogile_middleware.throttle import ThrottledLog


def test_the_line_of_a_later_flood_tells_the_seconds_its_count_spans(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    outage = ThrottledLog(logging.getLogger("mogile_middleware"), logging.ERROR, "no tracker answered for %r",
                          10.0, "requests", clock=lambda: now[0])
    outage.event("a")
    for second in (1.0, 2.0):  # the rest of a short outage: counted, not logged
        now[0] = second
        outage.event("a")
    now[0] = 240.0  # another outage, minutes later
    outage.event("b")
    now[0] = 245.0
    outage.event("b")
    assert [record.getMessage() for record in caplog.records] == [
        "no tracker answered for 'a'",
        "no tracker answered for 'b' (2 more requests in the 240 s since the last line like this)"]
