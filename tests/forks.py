"""Test helper: children forked while another thread of the parent uses a shared object."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
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
    no ``os.register_at_fork`` hook runs in the child. Called with the GIL held throughout.

    Nor does CPython's own reset of the GIL: a request for it that another thread of this one made
    as it forked made the child hand it over for ever to a thread it does not have (seen once in
    a run, Python 3.10). Those threads ask only after the switch interval, made long here around
    the fork, once they had their turn (uWSGI forks its workers before threads start).
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    try:
        time.sleep(0.02)  # who waits for the GIL with the short interval gets it now
        pid: int = ctypes.PyDLL(None).fork()
    finally:
        sys.setswitchinterval(interval)
    return pid


def exit_code(pid: int, seconds: float = 30.0) -> int:
    """The exit code of child ``pid`` within ``seconds``; one still running then is killed, and
    its code is -9: a test fails, rather than the whole run waiting for ever."""
    deadline = time.monotonic() + seconds
    while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            waited = os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    return os.waitstatus_to_exitcode(waited[1])
