"""The example site's settings (``examples/djangosite``) as ``test_django_private.py`` runs it
under gunicorn, behind Perlbal on loopback: its own settings, with the database file from the
``DJANGOSITE_DATABASE`` environment variable and the middleware reproxying for the trusted
127.0.0.1. MogileFS is chosen by the example's own MOGILEFS_TRACKERS and MOGILEFS_DOMAIN."""

import os

from djangosite import settings as example

# Django reads the upper-case names of a settings module: the example's, then the changes below.
globals().update({name: getattr(example, name) for name in dir(example) if name.isupper()})

DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["DJANGOSITE_DATABASE"]}}
SERVE_WITH_PERLBAL = True
MOGILEFS_TRUSTED_PROXIES = ["127.0.0.1"]
