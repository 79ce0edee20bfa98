"""``manage.py check``: the MOGILEFS_* settings and the MogileFS storages of ``STORAGES``, read as
the wrapped application and each storage read them, so that a deploy finds a missing or wrong one
before its first request or save does. Nothing is asked of the trackers."""

from __future__ import annotations

from typing import Any

import django
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from . import asgi, wsgi
from .storage import MogileFSStorage


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """An error for settings that neither ``wrap_wsgi`` nor ``wrap_asgi`` takes
    (``mogile_middleware.E001``), one for each MogileFS storage of ``STORAGES`` whose options or
    settings its saves and ``url()`` would refuse (``mogile_middleware.E002``), and a warning for
    a storage whose backend cannot be imported, which may be one (``mogile_middleware.W001``),
    and for a MogileFS storage named where Django ignores it (``mogile_middleware.W002``)."""
    messages: list[checks.CheckMessage] = []
    refusals: dict[str, str] = {}
    for name, configured_middleware in (("wrap_wsgi", wsgi.configured_middleware),
                                        ("wrap_asgi", asgi.configured_middleware)):
        try:
            configured_middleware(_never_called)
            break
        except ImproperlyConfigured as error:  # an async authorize is one wrap_asgi alone takes
            refusals[name] = str(error)
    else:
        said = refusals["wrap_wsgi"] if len(set(refusals.values())) == 1 else \
            "; ".join(f"{name}: {text}" for name, text in refusals.items())  # an ASGI project's error is the second
        messages.append(checks.Error(said, hint="as wrap_wsgi and wrap_asgi read the settings",
                                     id="mogile_middleware.E001"))
    messages += _ignored_storage_setting()
    for alias, storage in getattr(settings, "STORAGES", {}).items():
        try:
            backend = import_string(storage["BACKEND"])
        except Exception as error:  # its own module's error (another storage's: boto3 missing, say)
            messages.append(checks.Warning(f"its backend cannot be imported: {error!r}",
                                           obj=f"STORAGES[{alias!r}]", id="mogile_middleware.W001"))
            continue
        if isinstance(backend, type) and issubclass(backend, MogileFSStorage):
            try:
                made = backend(**storage.get("OPTIONS", {}))
                made.client  # read for its settings: domain, trackers, client options, memcached
                made.url(None)  # the media URL, the signing key and the links' lifetime
            except ImproperlyConfigured as error:
                messages.append(checks.Error(str(error), obj=f"STORAGES[{alias!r}]", id="mogile_middleware.E002"))
    return messages


def _ignored_storage_setting() -> list[checks.CheckMessage]:
    """A warning (``mogile_middleware.W002``) for ``DEFAULT_FILE_STORAGE`` naming a MogileFS
    storage (this package's, or the old backend's, ``storages.backends.mogile.MogileFSStorage``)
    on Django 5.1 or later, which ignore the setting: a project that changed that line alone, or
    kept it, saved its files on the local disk, ``wrap_wsgi`` serving the old ones as before."""
    path = getattr(settings, "DEFAULT_FILE_STORAGE", None)
    if not isinstance(path, str) or django.VERSION < (5, 1):
        return []
    try:
        backend = import_string(path)
    except Exception:  # gone (the old backend, which django-storages dropped), or another's
        backend = None
    if isinstance(backend, type) and issubclass(backend, MogileFSStorage):
        meant = path
    elif "mogile" in path.lower():
        meant = "mogile_middleware.contrib.django.MogileFSStorage"
    else:
        return []
    return [checks.Warning(f"DEFAULT_FILE_STORAGE names {path}, but Django {django.get_version()} ignores the "
                           "setting: files are saved by STORAGES['default'] instead",
                           hint=f"name {{'BACKEND': {meant!r}}} as STORAGES['default'] (keeping STORAGES' other "
                                "entries, 'staticfiles' among them) and remove DEFAULT_FILE_STORAGE",
                           obj="DEFAULT_FILE_STORAGE", id="mogile_middleware.W002")]


def _never_called(*args: Any) -> Any:
    raise AssertionError("the middleware is built to read the settings, never called")
