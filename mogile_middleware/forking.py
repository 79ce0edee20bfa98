"""What a forked child makes anew of the objects that share state between threads.

``fork()`` copies a process with one thread: a lock another thread of the parent held is copied
held, and the child's first request waited for it for ever; work those threads had begun (a
lookup other requests wait for, a tracker being asked whether it is back) is never finished in
the child. An object registered with :func:`renew_in_child` gets its ``renew_after_fork()``
called in every child forked while it lives, as ``os.fork()`` returns there (a fork made in C,
as uWSGI's by default, runs no such hook: process-number checks stay where sockets are kept).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Protocol

if not hasattr(os, "register_at_fork"):  # Windows: no fork(), and no hooks of one
    raise ImportError("mogile_middleware runs on POSIX systems only: this Python has no os.register_at_fork")


class Renewable(Protocol):
    def renew_after_fork(self) -> None:
        """Make its locks anew and forget the work of the parent's threads."""


_renewable: weakref.WeakSet[Renewable] = weakref.WeakSet()


def renew_in_child(owner: Renewable) -> None:
    """Have ``owner.renew_after_fork()`` called in each child forked from now on, while it lives."""
    _renewable.add(owner)


def new_lock_in_child(namespace: dict[str, Any], name: str) -> None:
    """Have each forked child make the lock ``namespace[name]`` (of a module's ``globals()``) anew."""
    os.register_at_fork(after_in_child=lambda: namespace.__setitem__(name, threading.Lock()))


def _renew() -> None:
    for owner in list(_renewable):
        owner.renew_after_fork()


os.register_at_fork(after_in_child=_renew)
