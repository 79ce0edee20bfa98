"""The ASGI application (``uvicorn djangosite.asgi:application``), with MOGILEFS_MEDIA_URL served from MogileFS."""

import os

from django.core.asgi import get_asgi_application

from mogile_middleware.contrib.django import wrap_asgi

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangosite.settings")

application = wrap_asgi(get_asgi_application())
