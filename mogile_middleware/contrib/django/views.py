"""Serving a stored file from a view, after the view's own permission checks."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured, SuspiciousFileOperation
from django.http import HttpRequest, HttpResponse
from django.utils.cache import patch_cache_control

from ...views import WRAPPED_BY, serve_header
from ...exceptions import BadKeyError


def serve(request: HttpRequest, name: str, *, filename: str | None = None) -> HttpResponse:
    """The response that has the middleware answer with the file ``name`` (reproxied for a trusted
    proxy, else streamed, with HEAD, ranges and 304; ``Cache-Control: private``); ``filename``
    makes it a download of that name. Return it from a view that checked who asks, e.g. one under
    ``@login_required``. The application must be wrapped by ``wrap_wsgi`` or ``wrap_asgi``, which
    replace this response, and the view's other headers but its cookies (a refreshed session), by the file's.

    The same key is also answered under ``MOGILEFS_MEDIA_URL`` to anyone, unless the middleware
    keeps it out there (``key_for_path`` mapping it to ``None``, ``authorize``, or signed URLs).
    A name MogileFS cannot hold is a ``SuspiciousFileOperation`` (Django answers 400)."""
    scope = getattr(request, "scope", None)  # an ASGI request's
    if WRAPPED_BY not in request.META and not (scope and WRAPPED_BY in scope):
        raise ImproperlyConfigured("serve() answers through the middleware: wrap the application "
                                   "with wrap_wsgi() or wrap_asgi()")
    try:
        header, value = serve_header(name, filename)
    except BadKeyError as error:
        raise SuspiciousFileOperation(f"{name!r} cannot be a MogileFS key: {error}") from None
    response = HttpResponse()
    response[header] = value
    # For Django's cache (cache_page, the per-site middleware), which sees it before the middleware:
    # kept, it was the answer to the next client of the URL, the view and its checks never run.
    patch_cache_control(response, private=True)
    return response
