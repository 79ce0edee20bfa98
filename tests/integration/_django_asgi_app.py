"""A tiny Django project for uvicorn: its ASGI application as ``wrap_asgi`` wraps it (``make_app``,
a factory for ``uvicorn --factory``).

Configured by MOGILEFS_DOMAIN and MOGILEFS_TRACKERS. ``/`` is a page of its own; ``POST
/save/<name>`` saves the request body through the default storage (class ``thumb``, overwriting)
in this process, from the thread Django runs synchronous views in. Its ``authorize`` asks the
database, and refuses keys under ``private/``.
"""

from __future__ import annotations

import os

from django.core.files.base import ContentFile
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.urls import path

from mogile_middleware.asgi import MogileFSMiddleware


def home(request: HttpRequest) -> HttpResponse:
    return HttpResponse("hello from django\n", content_type="text/plain")


def save(request: HttpRequest, name: str) -> HttpResponse:
    from django.core.files.storage import default_storage

    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    return HttpResponse(default_storage.save(name, ContentFile(request.body)), content_type="text/plain")


def may_read(scope: object, key: str) -> bool:
    """Asks the database, as a site's ``authorize`` does (which Django refuses on the event loop)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return not key.startswith("private/")


urlpatterns = [path("", home), path("save/<path:name>", save)]


def make_app() -> MogileFSMiddleware:
    import django
    from django.conf import settings
    from django.core.asgi import get_asgi_application

    from mogile_middleware.contrib.django import wrap_asgi

    settings.configure(
        SECRET_KEY="tests-only", ALLOWED_HOSTS=["127.0.0.1"], ROOT_URLCONF=__name__, MIDDLEWARE=[],
        MOGILEFS_DOMAIN=os.environ["MOGILEFS_DOMAIN"], MOGILEFS_TRACKERS=os.environ["MOGILEFS_TRACKERS"],
        MOGILEFS_MEDIA_URL="/media/", MOGILEFS_MIDDLEWARE_OPTIONS={"authorize": may_read},
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        # Long enough that only the save's listener, not the cache's expiry, can show the new file.
        MOGILEFS_PATH_CACHE_SECONDS=300,
        STORAGES={"default": {"BACKEND": "mogile_middleware.contrib.django.MogileFSStorage",
                              "OPTIONS": {"mogile_class": "thumb", "allow_overwrite": True}}},
    )
    django.setup()
    return wrap_asgi(get_asgi_application())
