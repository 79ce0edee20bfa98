"""The one call for a project's ``wsgi.py``: serve ``MOGILEFS_MEDIA_URL`` from MogileFS."""

from __future__ import annotations

from ...client import WeakListener
from ...middleware import MogileFSMiddleware, WSGIApp
from . import conf
from .clients import get_client, listen_to_media_changes
from .cycle import in_request_cycle


def wrap_wsgi(application: WSGIApp) -> MogileFSMiddleware:
    """Wrap Django's WSGI application so that requests under ``MOGILEFS_MEDIA_URL`` get files from
    the ``MOGILEFS_DOMAIN`` domain, with the shared client so saves drop cached paths (also those
    of a storage that lists some of ``MOGILEFS_TRACKERS``, or all in another order).

    ``application = wrap_wsgi(get_wsgi_application())``; the settings are read by this call.
    With ``MOGILEFS_MEMCACHED_SERVERS`` the middleware caches paths in the memcached from which
    the client's writes drop them. ``authorize`` runs between the closings of old database
    connections Django makes around a view (:func:`~.cycle.in_request_cycle`).
    """
    middleware = configured_middleware(application)
    # Besides its own client, which it listens to already.
    listen_to_media_changes(WeakListener(middleware.locator.forget), besides=middleware.client)
    return middleware


def configured_middleware(application: WSGIApp) -> MogileFSMiddleware:
    """The middleware the settings describe around ``application``, with the shared client,
    listening to no other client (as ``manage.py check`` builds it)."""
    client = get_client()
    options = conf.middleware_options()
    if client.cache_backend is not None:
        options["cache_backend"] = client.cache_backend
    middleware = conf.configured(lambda: MogileFSMiddleware(application, client=client, **options))
    if middleware.authorize is not None:  # checked as it was given
        middleware.authorize = in_request_cycle(middleware.authorize)
    return middleware
