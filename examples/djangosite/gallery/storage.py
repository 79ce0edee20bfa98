"""The storages of the gallery: one per MogileFS class."""

from django.core.files.storage import Storage, storages

from mogile_middleware.contrib.django import MogileFSStorage


class AvatarStorage(MogileFSStorage):
    """Avatars go to the ``avatar`` class (two copies): the class is set on a subclass."""

    mogile_class = "avatar"


def thumbs_storage() -> Storage:
    """The ``thumbs`` storage of the STORAGES setting (the ``thumb`` class, one copy).

    A callable, so that migrations refer to it rather than freezing the options of the setting.
    """
    return storages["thumbs"]
