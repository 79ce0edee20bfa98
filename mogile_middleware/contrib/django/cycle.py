"""A plain ``authorize`` of the settings, run as Django runs a synchronous view: off the event loop
under ASGI, calls side by side in threads of their own, between the closings of old database
connections Django's request signals make (a connection broken by a database restart, or older
than ``CONN_MAX_AGE``)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import sync_to_async
from django.db import close_old_connections

from ...loopnet import PerLoop

Authorize = Callable[[Any, str], Any]
#: An event loop's runner of a plain ``authorize`` in threads of its own, the threads, and the
#: process that made them.
_Run = tuple[Callable[[Any, str], Awaitable[Any]], ThreadPoolExecutor, int]
#: Calls of a plain ``authorize`` an event loop runs at once; more wait for a thread.
THREADS = 32


def in_request_cycle(authorize: Authorize) -> Authorize:
    """``authorize`` with the database connections too old or broken closed before and after each
    call, as ``request_started`` and ``request_finished`` close them around a view: outside a
    request, one a database restart broke failed every file until a view ran in that thread."""
    def authorized(request: Any, key: str) -> Any:
        close_old_connections()
        try:
            return authorize(request, key)
        finally:
            close_old_connections()
    return authorized


def off_the_event_loop(authorize: Authorize) -> Callable[[Any, str], Awaitable[Any]]:
    """``authorize`` as :func:`in_request_cycle`, awaited in threads of its own, up to
    :data:`THREADS` calls side by side, as Django's ASGI handler runs synchronous views (on the
    event loop, the ORM refuses it; in asgiref's one thread for code outside a request, a slow one
    held up every file; in the loop's default executor, which looks tracker names up and asks
    memcached, slow ones held those up; a thread made per call, as Django's handler makes, cost
    0.3 ms more); an awaitable it gives is awaited on the loop. The threads are the event loop's,
    ended with it (a forked worker's loop makes its own)."""
    runs = PerLoop(functools.partial(_in_threads, in_request_cycle(authorize)), _ended)

    async def authorized(scope: Any, key: str) -> Any:
        allowed = await runs.of(asyncio.get_running_loop())[0](scope, key)
        return await allowed if inspect.isawaitable(allowed) else allowed
    return authorized


def _in_threads(authorize: Authorize) -> _Run:
    threads = ThreadPoolExecutor(THREADS, thread_name_prefix="authorize")
    return sync_to_async(authorize, thread_sensitive=False, executor=threads), threads, os.getpid()


def _ended(run: _Run) -> None:
    """End the threads, unless this is a child forked since, which has none of them (and whose
    copy of their lock a thread of the parent starting one held for ever)."""
    _, threads, made_in = run
    if made_in == os.getpid():
        threads.shutdown(wait=False)
