"""The one call for a project's ``asgi.py``: serve ``MOGILEFS_MEDIA_URL`` from MogileFS, natively async."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

from ...asgi import ASGIApp, Message, MogileFSMiddleware, Receive, Scope, Send
from ...async_client import AsyncClient
from ...client import WeakListener
from ...core import async_kind
from . import conf
from .clients import get_client, listen_to_media_changes
from .cycle import off_the_event_loop

#: Django's ASGI application, as any typing of it is taken: django-stubs give it a ``dict`` scope
#: and a ``send`` of any mapping, which a stricter :data:`~mogile_middleware.asgi.ASGIApp` refuses.
DjangoASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def wrap_asgi(application: DjangoASGIApp) -> MogileFSMiddleware:
    """Wrap Django's ASGI application as :func:`~.wsgi.wrap_wsgi` wraps the WSGI one: the same
    settings, the same answers, with an :class:`~mogile_middleware.async_client.AsyncClient`.

    ``application = wrap_asgi(get_asgi_application())``; the settings are read by this call.
    With ``MOGILEFS_MEMCACHED_SERVERS`` the middleware caches paths in the memcached of the shared
    client (asked from a thread, so the event loop never waits on it).

    Storages are synchronous and write through the shared blocking clients, so the middleware's
    locator listens to those of its domain and trackers too: a save drops the cached paths of its
    key before it returns. Django runs a synchronous view in a thread of its own, so the listener runs there,
    not on the event loop; it only marks the key's lookup in flight as outdated (under the path
    cache's locks) and deletes the entry from the backend, which is thread-safe (the in-process
    cache takes a lock, the memcached backend has a connection per thread). A plain ``authorize``
    runs as a synchronous view does (:func:`~.cycle.off_the_event_loop`): Django's ORM refuses
    the event loop.
    """
    middleware = configured_middleware(application)
    listen_to_media_changes(WeakListener(middleware.locator.forget))
    return middleware


def configured_middleware(application: DjangoASGIApp) -> MogileFSMiddleware:
    """The middleware the settings describe around ``application``, listening to no client (as
    ``manage.py check`` builds it)."""
    client = get_client()
    options = conf.middleware_options()
    if client.cache_backend is not None:
        options["cache_backend"] = client.cache_backend
    forced = settings.FORCE_SCRIPT_NAME  # as Django's handler reads it: "" is not set
    if forced:
        options["script_name"] = forced.rstrip("/")
    # One per call, in practice one per process: its tracker connections are kept per event loop.
    middleware = conf.configured(lambda: (_ScriptNamed if forced else MogileFSMiddleware)(
        _answering_lifespan(application), client=AsyncClient(conf.domain(), conf.trackers(), **conf.client_options()),
        **options))
    if middleware.authorize is not None and not async_kind(middleware.authorize):  # checked as it was given
        middleware.authorize = off_the_event_loop(middleware.authorize)
    return middleware


def _answering_lifespan(application: DjangoASGIApp) -> ASGIApp:
    """``application``, the lifespan protocol answered for it when it refuses it as Django's handler
    does (``ValueError`` before reading a message): at shutdown, the middleware closes the event
    loop's tracker and storage connections, which stayed open to the end of the process."""
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await application(scope, receive, send)
            return
        read = False

        async def reading() -> Message:
            nonlocal read
            read = True
            return await receive()

        try:
            await application(scope, reading, send)
        except ValueError:
            if read:
                raise
            while (await receive())["type"] != "lifespan.shutdown":  # lifespan.startup
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
    app.__wrapped__ = application  # type: ignore[attr-defined]  # (what a middleware around it finds inside)
    return app


class _ScriptNamed(MogileFSMiddleware):
    """The middleware under ``FORCE_SCRIPT_NAME``, which Django's ASGI handler takes off every
    path in place of the server's ``root_path`` (and starts its links with): so does the middleware."""

    def __init__(self, app: ASGIApp, *, script_name: str, **options: Any) -> None:
        super().__init__(app, **options)
        self.script_name = script_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> Any:
        if scope["type"] == "http":  # Django reads the setting, never this: the server's scope is left as it is
            scope = {**scope, "root_path": self.script_name}
        await super().__call__(scope, receive, send)
