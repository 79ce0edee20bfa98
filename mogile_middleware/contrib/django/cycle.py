"""A plain ``authorize`` of the settings, run as Django runs a synchronous view: off the event loop
under ASGI, calls side by side in threads, between the closings of old database connections
Django's request signals make (a connection broken by a database restart, or older than
``CONN_MAX_AGE``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.db import close_old_connections

Authorize = Callable[[Any, str], Any]


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


def off_the_event_loop(authorize: Authorize) -> Callable[[Any, str], Any]:
    """``authorize`` as :func:`in_request_cycle`, awaited in one of asgiref's pool threads, calls
    side by side as Django's ASGI handler runs synchronous views (on the event loop, the ORM
    refuses it; in asgiref's one thread for code outside a request, a slow one held up every
    file; a thread made per call, as Django's handler makes, cost 0.3 ms more); an awaitable it
    gives is awaited on the loop."""
    run = sync_to_async(in_request_cycle(authorize), thread_sensitive=False)

    async def authorized(scope: Any, key: str) -> Any:
        allowed = await run(scope, key)
        return await allowed if inspect.isawaitable(allowed) else allowed
    return authorized
