"""The gallery app's configuration."""

from django.apps import AppConfig


class GalleryConfig(AppConfig):
    """Profiles with avatars and thumbnails stored in MogileFS."""

    name = "gallery"
    default_auto_field = "django.db.models.BigAutoField"
