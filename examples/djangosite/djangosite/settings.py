"""Settings of the example site: a development setup, not one to deploy.

MogileFS is the development one (``mogile-middleware devserver --domain media --class avatar=2
--class thumb=1``) unless the MOGILEFS_TRACKERS and MOGILEFS_DOMAIN environment variables say
otherwise.
"""

import os
import unicodedata
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# A fixed key is fine for an example served on the loopback interface only.
SECRET_KEY = "example-only-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "gallery",
    "mogile_middleware.contrib.django",  # manage.py check reads the MOGILEFS_* settings
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "djangosite.urls"
WSGI_APPLICATION = "djangosite.wsgi.application"
# /private/<name> sends whoever is not logged in to Django's login page, then back.
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "upload"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    },
]

DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

MOGILEFS_DOMAIN = os.environ.get("MOGILEFS_DOMAIN", "media")
MOGILEFS_TRACKERS = os.environ.get("MOGILEFS_TRACKERS", "127.0.0.1:7001")
MOGILEFS_MEDIA_URL = "/media/"
MOGILEFS_CACHE_CONTROL = "public, max-age=3600"


def public_key(path: str) -> str | None:
    """The key of a path under MOGILEFS_MEDIA_URL, or None (404) for the private files: only the
    view ``gallery.views.private_file`` sends those, to logged-in users."""
    # MySQL's collations find a key whatever its case and accents ("PRÍVATE/a.txt" is "private/a.txt"):
    # compare the path so folded, as near as one can (README: Private files).
    folded = unicodedata.normalize("NFKD", path).encode("ascii", "ignore").decode("ascii").lower()
    return None if folded.startswith("private/") else path


MOGILEFS_MIDDLEWARE_OPTIONS = {"key_for_path": public_key}

STORAGES = {
    # Uploads without a storage of their own go to MogileFS' default class.
    "default": {"BACKEND": "mogile_middleware.contrib.django.MogileFSStorage"},
    "thumbs": {
        "BACKEND": "mogile_middleware.contrib.django.MogileFSStorage",
        "OPTIONS": {"mogile_class": "thumb"},
    },
}
