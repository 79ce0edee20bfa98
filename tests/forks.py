"""Test helper: children forked while another thread of the parent uses a shared object."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import ContextManager


def children_failing(churn: Callable[[], object], use: Callable[[], object], children: int = 20) -> int:
    """How many of ``children`` processes, forked while a thread of this one calls ``churn()``
    over and over, failed to ``use()`` within 2 s: raised, or waited for ever for a lock the
    thread held at the fork (ended by its alarm)."""
    stop = threading.Event()

    def churning() -> None:
        while not stop.is_set():
            churn()

    thread = threading.Thread(target=churning, daemon=True)
    thread.start()
    failing = 0
    try:
        for _ in range(children):
            time.sleep(0.005)
            pid = os.fork()
            if pid == 0:
                signal.alarm(2)
                try:
                    use()
                except BaseException:
                    os._exit(1)
                os._exit(0)
            failing += os.waitpid(pid, 0)[1] != 0
    finally:
        stop.set()
        thread.join(5)
    return failing


def holding(lock: ContextManager[object]) -> Callable[[], None]:
    """A churn that holds ``lock`` most of the time, as a thread inside an object that uses it
    briefly now and then may: the fork comes while it is held."""
    def hold() -> None:
        with lock:
            time.sleep(0.001)
    return hold


def fork_without_hooks() -> int:
    """``fork()`` as a server written in C makes it (uWSGI, unless ``--py-call-osafterfork``):
    no ``os.register_at_fork`` hook runs in the child. Called with the GIL held throughout."""
    return ctypes.PyDLL(None).fork()
