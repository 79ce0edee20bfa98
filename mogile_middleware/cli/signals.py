"""Signal handling shared by the foreground commands, for which SIGINT and SIGTERM both mean "stop"."""

from __future__ import annotations

import io
import select
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: The longest a read of :class:`InterruptibleReader` waits in one system call.
WAIT_SECONDS = 0.5


@contextmanager
def on_stop_signal(handler: Callable[[int, FrameType | None], Any]) -> Iterator[None]:
    """Call ``handler`` on SIGINT and SIGTERM inside the block; the previous handlers come back after it."""
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class InterruptibleReader:
    """A raw file (stdin's) read one system call at a time, none waiting more than
    :data:`WAIT_SECONDS`: a stop signal that lands between two reads, which the interpreter acts
    on only once the next returns, is heard even while the writer of a pipe is quiet."""

    def __init__(self, file: io.RawIOBase) -> None:
        self._file = file

    def read(self, size: int) -> bytes | None:
        while not select.select([self._file], [], [], WAIT_SECONDS)[0]:
            pass  # a signal that came meanwhile is acted on here
        return self._file.read(size)

    def fileno(self) -> int:
        return self._file.fileno()

    def seekable(self) -> bool:
        return self._file.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()
