"""Signal handling shared by the foreground commands, for which SIGINT, SIGTERM and SIGHUP all mean "stop"."""

from __future__ import annotations

import io
import math
import select
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

#: Ctrl-C, a kill, and the terminal or the ssh session going away.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: The longest a read of :class:`InterruptibleReader` waits in one system call.
WAIT_SECONDS = 0.5


@contextmanager
def on_stop_signal(handler: Callable[[int, FrameType | None], Any]) -> Iterator[None]:
    """Call ``handler`` on the stop signals inside the block; the previous handlers come back after
    it. One ignored when the command started stays ignored: ``nohup`` ignores SIGHUP, a shell
    SIGINT for a job it starts in the background."""
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class InterruptibleReader:
    """A raw file (stdin's) read one system call at a time, none waiting more than
    :data:`WAIT_SECONDS`: a stop signal that lands between two reads, which the interpreter acts
    on only once the next returns, is heard even while the writer of a pipe is quiet. A read
    gathers pieces up to its size, as a buffered one does (a pipe gives 64 KiB at a time), or
    what came within that long of its first bytes: a slow writer's bytes still go on (a storage
    node drops a PUT that sends nothing for a while)."""

    def __init__(self, file: io.RawIOBase) -> None:
        self._file = file

    def read(self, size: int) -> bytes | bytearray | None:
        buffer = bytearray(size)
        gathered = 0
        due = math.inf  # once bytes came: when what came so far goes, however slowly more comes
        with memoryview(buffer) as view:
            while gathered < size:
                wait = min(WAIT_SECONDS, due - time.monotonic())
                if wait <= 0:
                    break
                if not select.select([self._file], [], [], wait)[0]:
                    continue  # a signal that came meanwhile is acted on here
                count = self._file.readinto(view[gathered:])
                if not count:  # the end (or, from a non-blocking file, nothing after all)
                    if not gathered:
                        return None if count is None else b""
                    break
                if not gathered:
                    due = time.monotonic() + WAIT_SECONDS
                gathered += count
        del buffer[gathered:]
        return buffer

    def fileno(self) -> int:
        return self._file.fileno()

    def seekable(self) -> bool:
        return self._file.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()
