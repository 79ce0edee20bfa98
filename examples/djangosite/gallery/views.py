"""The upload page: a form that stores an avatar and its thumbnail, and the latest profiles; and
the private files, for logged-in users only."""

import io
from pathlib import PurePosixPath

from django.contrib.auth.decorators import login_required
from django.core.files import File
from django.core.files.base import ContentFile
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from PIL import Image

from mogile_middleware.contrib.django import serve

from .forms import ProfileForm
from .models import Profile, Thumbnail

THUMBNAIL_SIZE = (64, 64)


def make_thumbnail(image: File) -> bytes:
    """A PNG of ``image`` shrunk to fit ``THUMBNAIL_SIZE``."""
    image.seek(0)
    with Image.open(image) as picture:
        picture.thumbnail(THUMBNAIL_SIZE)
        out = io.BytesIO()
        picture.save(out, format="PNG")
    return out.getvalue()


def upload(request: HttpRequest) -> HttpResponse:
    """GET: the form and the latest profiles; POST: store the avatar, then its thumbnail."""
    form = ProfileForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        profile = form.save()
        thumbnail = Thumbnail(profile=profile)
        name = PurePosixPath(profile.avatar.name).stem + ".png"
        thumbnail.image.save(name, ContentFile(make_thumbnail(form.cleaned_data["avatar"])))
        return redirect("upload")
    profiles = Profile.objects.select_related("thumbnail").order_by("-id")[:10]
    return render(request, "gallery/upload.html", {"form": form, "profiles": profiles})


@login_required
def private_file(request: HttpRequest, name: str) -> HttpResponse:
    """The file ``private/<name>``, for any logged-in user; ``?download=1`` makes it a download.

    The middleware sends it, with ``Cache-Control: private``, or has Perlbal fetch it. Under
    ``/media/`` such keys are a 404 (``public_key`` in the settings): only this view hands them out.
    """
    filename = PurePosixPath(name).name if request.GET.get("download") else None
    return serve(request, f"private/{name}", filename=filename)
