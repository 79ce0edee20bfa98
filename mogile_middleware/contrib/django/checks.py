"""``manage.py check``: the MOGILEFS_* settings and the MogileFS storages of ``STORAGES``, read as
the wrapped application and each storage read them, so that a deploy finds a missing or wrong one
before its first request or save does. Nothing is asked of the trackers."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from . import asgi, wsgi
from .storage import MogileFSStorage


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """An error for settings that neither ``wrap_wsgi`` nor ``wrap_asgi`` takes
    (``mogile_middleware.E001``), and one for each MogileFS storage of ``STORAGES`` whose options or
    settings its saves and ``url()`` would refuse (``mogile_middleware.E002``)."""
    errors = []
    refusals = []
    for configured_middleware in (wsgi.configured_middleware, asgi.configured_middleware):
        try:
            configured_middleware(_never_called)
            break
        except ImproperlyConfigured as error:  # an async authorize is one wrap_asgi alone takes
            refusals.append(error)
    else:
        errors.append(Error(str(refusals[0]), hint="as wrap_wsgi and wrap_asgi read the settings",
                            id="mogile_middleware.E001"))
    for alias, storage in getattr(settings, "STORAGES", {}).items():
        try:
            backend = import_string(storage["BACKEND"])
        except Exception:  # another storage's module failing (boto3 missing): Django's own error, at its first use
            continue
        if isinstance(backend, type) and issubclass(backend, MogileFSStorage):
            try:
                made = backend(**storage.get("OPTIONS", {}))
                made.client  # read for its settings: domain, trackers, client options, memcached
                made.url(None)  # the media URL, the signing key and the links' lifetime
            except ImproperlyConfigured as error:
                errors.append(Error(str(error), obj=f"STORAGES[{alias!r}]", id="mogile_middleware.E002"))
    return errors


def _never_called(*args: Any) -> Any:
    raise AssertionError("the middleware is built to read the settings, never called")
