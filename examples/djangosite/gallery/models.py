"""Profiles with an avatar in the ``avatar`` class and thumbnails in the ``thumb`` class."""

from django.db import models

from .storage import AvatarStorage, thumbs_storage


class Profile(models.Model):
    """Someone with an avatar image."""

    name = models.CharField(max_length=100)
    avatar = models.ImageField(upload_to="avatars/", storage=AvatarStorage())

    def __str__(self) -> str:
        return self.name


class Thumbnail(models.Model):
    """A small copy of a profile's avatar."""

    profile = models.OneToOneField(Profile, on_delete=models.CASCADE, related_name="thumbnail")
    image = models.ImageField(upload_to="thumbs/", storage=thumbs_storage)

    def __str__(self) -> str:
        return self.image.name
