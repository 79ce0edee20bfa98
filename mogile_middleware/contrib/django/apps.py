"""The Django application of the package: in ``INSTALLED_APPS``, ``manage.py check`` checks its settings."""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class MogileFSConfig(AppConfig):
    name = "mogile_middleware.contrib.django"
    label = "mogile_middleware"
    verbose_name = "MogileFS"

    def ready(self) -> None:
        from .checks import check_settings

        checks.register(check_settings)
