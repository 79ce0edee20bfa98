"""The WSGI application (``gunicorn djangosite.wsgi``), with MOGILEFS_MEDIA_URL served from MogileFS."""

import os

from django.core.wsgi import get_wsgi_application

from mogile_middleware.contrib.django import wrap_wsgi

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangosite.settings")

application = wrap_wsgi(get_wsgi_application())
