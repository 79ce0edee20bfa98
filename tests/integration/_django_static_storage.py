"""The staticfiles storage of the ``collectstatic`` tests: a MogileFS storage under ``static/``,
its location its own, as Django 4.2's settings made by ``settings.configure`` and
``override_settings`` keep a staticfiles storage's ``BACKEND`` and drop its ``OPTIONS``."""

from __future__ import annotations

from typing import Any

from mogile_middleware.contrib.django import MogileFSStorage


class StaticStorage(MogileFSStorage):
    def __init__(self, **options: Any) -> None:
        super().__init__(**{"location": "static", **options})
