"""The one call for a project's ``wsgi.py``: serve ``MOGILEFS_MEDIA_URL`` from MogileFS."""

from __future__ import annotations

from ...middleware import MogileFSMiddleware, WSGIApp
from . import conf
from .clients import get_client


def wrap_wsgi(application: WSGIApp) -> MogileFSMiddleware:
    """Wrap Django's WSGI application so that requests under ``MOGILEFS_MEDIA_URL`` get files from
    the ``MOGILEFS_DOMAIN`` domain, with the shared client so saves drop cached paths.

    ``application = wrap_wsgi(get_wsgi_application())``; the settings are read by this call.
    """
    return MogileFSMiddleware(application, client=get_client(), **conf.middleware_options())
