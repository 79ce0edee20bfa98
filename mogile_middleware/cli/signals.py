"""Signal handling shared by the foreground commands, for which SIGINT and SIGTERM both mean "stop"."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def on_stop_signal(handler: Callable[[int, FrameType | None], Any]) -> Iterator[None]:
    """Call ``handler`` on SIGINT and SIGTERM inside the block; the previous handlers come back after it."""
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
