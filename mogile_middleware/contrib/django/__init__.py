"""Django integration: a file storage on MogileFS and the wrapper that serves its files.

In ``settings.py``::

    MOGILEFS_DOMAIN = "media"
    MOGILEFS_TRACKERS = ["10.0.0.1:7001", "10.0.0.2:7001"]
    MOGILEFS_MEDIA_URL = "/media/"
    STORAGES = {
        "default": {"BACKEND": "mogile_middleware.contrib.django.MogileFSStorage"},
        "thumbs": {"BACKEND": "mogile_middleware.contrib.django.MogileFSStorage",
                   "OPTIONS": {"mogile_class": "thumb"}},
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }

and in ``wsgi.py``: ``application = wrap_wsgi(get_wsgi_application())``, or in ``asgi.py``:
``application = wrap_asgi(get_asgi_application())``. A view that checked who asks answers with a
private file through :func:`serve`; with ``MOGILEFS_SIGNING_KEY``, ``url()`` gives signed,
expiring URLs and the middleware answers no other.
"""

import importlib

try:
    importlib.import_module("django")
except ModuleNotFoundError as error:  # the optional extra
    raise ModuleNotFoundError(f"mogile_middleware.contrib.django needs Django: "
                              f"pip install 'mogile_middleware[django]' ({error})", name=error.name) from error

from .asgi import wrap_asgi
from .clients import close_clients, get_client
from .storage import MogileFSStorage
from .views import serve
from .wsgi import wrap_wsgi

__all__ = ["MogileFSStorage", "close_clients", "get_client", "serve", "wrap_asgi", "wrap_wsgi"]
