"""The Django integration over the embedded MogileFS: the example site's models, its upload page,
the storage API, the settings, the wrapped WSGI application (WebTest, lint on) and the wrapped
ASGI application (in process, and a tiny project under a real uvicorn)."""

from __future__ import annotations

import asyncio
import gc
import http.client
import io
import os
import random
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import django
import pytest
from conftest import CLASSES, DOMAIN, require_module
from forks import children_failing, holding
from integration._async_facade import LoopThread
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.checks import WARNING, run_checks
from django.core.exceptions import ImproperlyConfigured, SuspiciousFileOperation
from django.core.files.base import ContentFile, File
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.files.storage import FileSystemStorage
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.core.wsgi import get_wsgi_application
from django.db.migrations.writer import MigrationWriter
from django.templatetags.static import static as static_url
from django.test import override_settings
from django.urls import clear_script_prefix, set_script_prefix
from django.utils.module_loading import import_string
from integration._gunicorn import run_uvicorn
from integration._memcached import start_memcached
from integration._slow_clients import node_connections, storage_port
from PIL import Image
from webtest import TestApp, Upload

from mogile_middleware import (
    Client, MogileFSMiddleware, OutcomeUnknownError, TrackerError, TrackerUnavailableError, UploadError,
    UploadOutcomeUnknownError,
)
from mogile_middleware.cli import main
from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware
from mogile_middleware.async_client import AsyncClient
from mogile_middleware.cache import entry_key
from mogile_middleware.contrib.django import clients, cycle
from mogile_middleware.contrib.django import MogileFSStorage, close_clients, get_client, wrap_asgi, wrap_wsgi
from mogile_middleware.contrib.django.storage import TEMPORARY_PREFIX
from mogile_middleware.core import wrapped_middlewares
from mogile_middleware.views import WRAPPED_BY
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.memcache import MemcachedBackend
from mogile_middleware.tracker import TrackerConnection

from integration.test_client import _scripted_open, dropping_node  # noqa: F401 (a fixture)
from wiretools import ScriptedTracker

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "djangosite"

#: ``allow_overwrite`` needs Django 5.1 or newer (the storage says so when made with it before).
overwriting = pytest.mark.skipif(django.VERSION < (5, 1), reason="allow_overwrite needs Django 5.1 or newer")
#: Both ways of saving a taken name, where the Django installed has both.
BOTH_SAVES = [False, pytest.param(True, marks=overwriting)]


def _configure_django() -> None:
    """The example site's settings with an in-memory database, once per process."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    if settings.configured:
        return
    from djangosite import settings as site

    options = {name: getattr(site, name) for name in dir(site) if name.isupper()}
    options["DATABASES"] = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
    settings.configure(**options)
    django.setup()


_configure_django()

from gallery.models import Profile, Thumbnail  # needs the settings above
from gallery.storage import AvatarStorage

#: Marks a setting to remove in ``with_settings``.
MISSING = object()


@pytest.fixture(scope="module", autouse=True)
def database() -> None:
    """The example's migrations applied to the in-memory database."""
    call_command("migrate", verbosity=0)


@pytest.fixture(autouse=True)
def fresh_clients() -> Iterator[None]:
    """Each test's shared clients are closed after it: its trackers go away."""
    yield
    close_clients()


@pytest.fixture
def mogile(devmogile: DevMogileFS) -> Iterator[DevMogileFS]:
    """The settings pointed at the test MogileFS (domain ``testdom``: avatar=2, thumb=1)."""
    with override_settings(MOGILEFS_DOMAIN=DOMAIN, MOGILEFS_TRACKERS=devmogile.trackers):
        yield devmogile


@pytest.fixture
def app(mogile: DevMogileFS) -> TestApp:
    """The example site's application as its ``wsgi.py`` wraps it."""
    return TestApp(wrap_wsgi(get_wsgi_application()), lint=True)


def png(color: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> bytes:
    """A tiny real PNG."""
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


@contextmanager
def with_settings(**changes: Any) -> Iterator[None]:
    """``override_settings`` that also removes the settings given as ``MISSING``."""
    with override_settings(**{name: value for name, value in changes.items() if value is not MISSING}):
        for name in [name for name, value in changes.items() if value is MISSING]:
            delattr(settings, name)
        yield


# -- models and the upload page -----------------------------------------------------------------


def test_image_fields_store_in_their_classes_and_are_served(app: TestApp) -> None:
    avatar, thumb = png((200, 30, 30)), png((30, 30, 200), size=(4, 4))
    profile = Profile(name="Ada")
    profile.avatar.save("ada.png", ContentFile(avatar))
    thumbnail = Thumbnail(profile=profile)
    thumbnail.image.save("ada.png", ContentFile(thumb))

    client = get_client()
    assert (client.file_info(profile.avatar.name).cls, client.file_info(profile.avatar.name).devcount) == ("avatar", 2)
    assert (client.file_info(thumbnail.image.name).cls, client.file_info(thumbnail.image.name).devcount) == ("thumb", 1)
    for field, data in [(profile.avatar, avatar), (thumbnail.image, thumb)]:
        response = app.get(field.url)
        assert (response.status_int, response.content_type, response.body) == (200, "image/png", data)
    stored = Profile.objects.get(pk=profile.pk).avatar
    with stored.open() as file:
        assert (file.size, file.read()) == (len(avatar), avatar)
    # Read from the stored file itself, which Django and Pillow seek in: UnsupportedOperation.
    assert (stored.width, stored.height) == (12, 8)
    with Image.open(thumbnail.image.storage.open(thumbnail.image.name)) as image:
        assert (image.size, image.getpixel((0, 0))) == ((4, 4), (30, 30, 200))


def test_upload_page_stores_avatar_and_thumbnail(app: TestApp) -> None:
    avatar = png((10, 160, 10), size=(200, 100))
    form = app.get("/").forms[0]
    form["name"] = "Grace"
    form["avatar"] = Upload("grace hopper.png", avatar, "image/png")
    page = form.submit().follow()

    avatar_url, thumbnail_url = re.findall(r'<img src="([^"]+)"', page.text)[:2]  # the newest profile
    assert (avatar_url, thumbnail_url) == ("/media/avatars/grace_hopper.png", "/media/thumbs/grace_hopper.png")
    assert app.get(avatar_url).body == avatar
    with Image.open(io.BytesIO(app.get(thumbnail_url).body)) as thumbnail:
        assert thumbnail.size == (64, 32)
    client = get_client()
    assert [client.file_info(name).cls for name in ("avatars/grace_hopper.png", "thumbs/grace_hopper.png")] == [
        "avatar", "thumb"]


def test_upload_page_refuses_a_post_without_csrf_token(app: TestApp) -> None:
    app.post("/", {"name": "Eve"}, status=403)


def test_migrations_match_the_models() -> None:
    call_command("makemigrations", "gallery", check=True, dry_run=True, verbosity=0)


# -- the storage API ----------------------------------------------------------------------------


def test_missing_names(mogile: DevMogileFS) -> None:
    storage = MogileFSStorage()
    assert not storage.exists("nothing.txt")
    storage.delete("nothing.txt")
    with pytest.raises(FileNotFoundError):
        storage.size("nothing.txt")
    with pytest.raises(FileNotFoundError):
        storage.open("nothing.txt")


def test_save_exists_size_open_delete(mogile: DevMogileFS) -> None:
    storage = MogileFSStorage(mogile_class="thumb")
    name = storage.save("docs/a.txt", ContentFile(b"hello"))
    assert name == "docs/a.txt"
    assert storage.exists(name) and storage.size(name) == 5
    assert get_client().file_info(name).cls == "thumb"
    with storage.open(name) as file:
        assert (file.name, file.size, file.read()) == (name, 5, b"hello")
    with pytest.raises(ValueError):
        storage.open(name, "wb")
    storage.delete(name)
    assert not storage.exists(name)


def test_an_opened_file_opened_again_reads_the_key_again(mogile: DevMogileFS, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where a local file has the stored file's name
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "report.txt").write_bytes(b"a local file")
    storage = MogileFSStorage()
    name = storage.save("docs/report.txt", ContentFile(b"stored"))
    file = storage.open(name)
    assert file.read(3) == b"sto"
    with file.open():  # still open: from the start again, not a seek the stream cannot do
        assert file.read() == b"stored"
    assert file.closed
    with file.open():  # closed: the key again, never the local file
        assert (file.read(), file.size) == (b"stored", 6)


def test_an_opened_file_reads_what_is_asked_and_seeks_anywhere(mogile: DevMogileFS) -> None:
    # A read gave what one recv from the node brought (3847 of a million bytes asked), and a seek
    # raised: code written for files on disk (f.read(f.size), Pillow, ImageField.width) broke.
    data = random.Random(3).randbytes(3 * 65536 + 123)
    storage = MogileFSStorage()
    name = storage.save("big.bin", ContentFile(data))
    with storage.open(name) as file:
        assert file.read(100_000) == data[:100_000] and file.tell() == 100_000
        assert file.seekable() and file.seek(5) == 5 and file.read(10) == data[5:15]
        assert file.seek(-10, io.SEEK_END) == len(data) - 10 and file.read() == data[-10:]
        assert file.seek(70_000) == 70_000 and file.read(70_000) == data[70_000:140_000]
        file.seek(0)
        assert b"".join(file.chunks()) == data
        assert file.seek(len(data) + 5) == len(data) + 5 and file.read() == b""
        with pytest.raises(ValueError, match="negative seek position"):
            file.seek(-1)


def test_an_opened_file_passes_over_a_replica_cut_short_on_its_disk(mogile: DevMogileFS) -> None:
    """A replica whose file is shorter than the tracker's length was read as the whole file."""
    body = bytes(range(256)) * 400
    storage = MogileFSStorage(mogile_class="avatar")  # two replicas
    name = storage.save("cut.bin", ContentFile(body))
    first = get_client().get_paths(name)[0]
    damaged = next(node for node in mogile.nodes if first.startswith(node.url))
    (damaged.docroot / first.split("/", 3)[3]).write_bytes(body[:5000])
    for _ in range(4):  # whichever replica the tracker names first
        with storage.open(name) as file:
            assert (file.size, file.read()) == (len(body), body)


def test_names_with_control_characters_are_refused_as_the_middleware_would_not_serve_them(
        mogile: DevMogileFS) -> None:
    storage = MogileFSStorage()
    for name in ("tab\there.txt", "del\x7f.txt", "esc\x1b[31m.txt"):
        with pytest.raises(SuspiciousFileOperation, match="control characters"):
            storage.save(name, ContentFile(b"x"))
    assert list(get_client().keys("")) == []


def test_a_name_that_is_not_utf8_is_refused_as_no_url_names_it(mogile: DevMogileFS) -> None:
    """A file name os.listdir gives for bytes that are not UTF-8 (as collectstatic copies one):
    it was saved, never served, and its url() raised UnicodeEncodeError."""
    storage = MogileFSStorage()
    with pytest.raises(SuspiciousFileOperation, match="not UTF-8"):
        storage.save("uni/bad\udcff.txt", ContentFile(b"x"))
    assert list(get_client().keys("")) == []
    with pytest.raises(SuspiciousFileOperation, match="not UTF-8"):
        storage.url("uni/bad\udcff.txt")


def test_no_url_is_given_for_a_key_with_a_dot_segment(mogile: DevMogileFS) -> None:
    """Another client's key ``a/../b.txt``: a browser would ask for ``b.txt``, another key."""
    storage = MogileFSStorage()
    for name in ("a/../b.txt", "./b.txt", "a/.", "..", "a/./b.txt"):
        with pytest.raises(SuspiciousFileOperation, match="segment, which clients remove from a URL"):
            storage.url(name)
    assert storage.url("a/.b/c..txt") == "/media/a/.b/c..txt"
    assert storage.url("a\\..\\b.txt") == "/media/a%5C..%5Cb.txt"  # no browser reads an escaped backslash
    with pytest.raises(SuspiciousFileOperation, match="control character"):
        storage.url("another\x7fclient's.txt")  # the middleware answers its link with a 400


def test_a_url_names_the_key_as_it_is_with_its_backslashes_and_leading_slash(app: TestApp) -> None:
    """Another client's ``dj\\report.txt`` and ``/secret.txt`` were linked (and signed) as
    ``dj/report.txt`` and ``secret.txt``: a link served another key's file."""
    client = get_client()
    names = ("dj\\report.txt", "dj/report.txt", "/secret.txt", "secret.txt", "//a.txt", "a.txt")
    for name in names:
        client.store_content(name, name.encode(), cls="thumb")
    for signing_key in (None, "s3cret"):
        with with_settings(MOGILEFS_SIGNING_KEY=signing_key):
            storage = MogileFSStorage()
            for name in names:
                assert app.get(storage.url(name)).body == name.encode(), (signing_key, name)
    with with_settings(MOGILEFS_MEDIA_URL="/"):
        assert MogileFSStorage().url("/evil.example/x.png") == "/%2Fevil.example/x.png"  # not the host evil.example
    with with_settings(MOGILEFS_MEDIA_URL="//cdn.example/"):
        assert MogileFSStorage().url("/x.png") == "//cdn.example//x.png"


def test_a_relative_media_url_links_and_serves_below_the_script_prefix(mogile: DevMogileFS) -> None:
    """As Django reads a relative MEDIA_URL: a site under /app (SCRIPT_NAME, FORCE_SCRIPT_NAME or
    ASGI's root_path) links its files at /app/media/..., and serves them there."""
    name = MogileFSStorage().save("sub/path.txt", ContentFile(b"below the script prefix"))
    with with_settings(MOGILEFS_MEDIA_URL="media/"):
        set_script_prefix("/app/")  # what Django's handler does for a request under /app
        try:
            assert MogileFSStorage().url(name) == "/app/media/sub/path.txt"
        finally:
            clear_script_prefix()
        assert MogileFSStorage().url(name) == "/media/sub/path.txt"  # a site at the root
        site = TestApp(wrap_wsgi(get_wsgi_application()), extra_environ={"SCRIPT_NAME": "/app"})
        assert site.get("/media/sub/path.txt").body == b"below the script prefix"  # the URL /app/media/...
        # Django's ASGI handler takes FORCE_SCRIPT_NAME off the path, or else the server's root path
        # ("" is not set, as Django reads it; a "/" at its end is not the path's).
        for forced, root_path in [("/app", ""), ("/app/", "/app"), ("", "/app")]:
            with with_settings(FORCE_SCRIPT_NAME=forced):
                served = asgi_get(wrap_asgi(get_asgi_application()), "/app/media/sub/path.txt", root_path=root_path)
            assert (served[0], served[2]) == (200, b"below the script prefix"), forced


@pytest.mark.parametrize("allow_overwrite", BOTH_SAVES)
@pytest.mark.parametrize(("name", "content_name"), [
    pytest.param("a//b/x.txt", None, id="double-slash"),
    pytest.param("./dot.txt", None, id="dot-first"),
    pytest.param("q/./r//dot.txt", None, id="dot-and-double-slash"),
    # Django reads backslashes as slashes, and saves a content's name when the name is None.
    pytest.param("norm\\\\dbl.txt", None, id="double-backslash"),
    pytest.param("norm\\.\\dot.txt", None, id="backslash-dot"),
    pytest.param(None, "norm//cn.txt", id="content-name-double-slash"),
    pytest.param(None, "norm/./cn.txt", id="content-name-dot"),
])
def test_names_are_saved_normalised_as_the_file_system_storage_saves_them(
        mogile: DevMogileFS, tmp_path: Path, allow_overwrite: bool, name: str | None, content_name: str | None) -> None:
    """A URL with ``//`` or ``/./`` reaches the application normalised (by the browser, or nginx):
    the file must be saved under the name that URL asks for."""
    storage = MogileFSStorage(allow_overwrite=allow_overwrite)
    saved = storage.save(name, ContentFile(b"x", name=content_name))
    assert saved == FileSystemStorage(location=tmp_path).save(name, ContentFile(b"x", name=content_name))
    assert storage.exists(saved) and storage.url(saved) == settings.MOGILEFS_MEDIA_URL + saved


@pytest.mark.parametrize("allow_overwrite", BOTH_SAVES)
def test_absolute_and_parent_names_are_refused(mogile: DevMogileFS, allow_overwrite: bool) -> None:
    storage = MogileFSStorage(allow_overwrite=allow_overwrite)
    for name in ("/abs.txt", "a/../b.txt", "a/./"):
        with pytest.raises(SuspiciousFileOperation):
            storage.save(name, ContentFile(b"x"))
    assert storage.url(None) == settings.MOGILEFS_MEDIA_URL  # as files.url(None) is its base URL


@pytest.mark.parametrize("allow_overwrite", BOTH_SAVES)
def test_a_name_among_the_saves_in_progress_is_refused(mogile: DevMogileFS, allow_overwrite: bool) -> None:
    """A file saved there was listed by no listdir() and deleted as a save left behind."""
    storage = MogileFSStorage(allow_overwrite=allow_overwrite)
    for name in (TEMPORARY_PREFIX + "report.pdf", "./" + TEMPORARY_PREFIX + "0" * 32, ".Mogile-Upload/a.txt"):
        with pytest.raises(SuspiciousFileOperation, match="holds the saves in progress"):
            storage.save(name, ContentFile(b"x"))
    assert get_client().list_keys(TEMPORARY_PREFIX) == []
    assert MogileFSStorage(location="docs").save(TEMPORARY_PREFIX + "a.txt", ContentFile(b"x")) == \
        TEMPORARY_PREFIX + "a.txt"  # docs/.mogile-upload/a.txt


@pytest.mark.parametrize("allow_overwrite", BOTH_SAVES)
def test_text_content_is_stored_as_utf8_as_djangos_own_storages_take_it(mogile: DevMogileFS,
                                                                        allow_overwrite: bool) -> None:
    storage = MogileFSStorage(mogile_class="thumb", allow_overwrite=allow_overwrite)
    name = storage.save("docs/note.txt", ContentFile("héllo, text"))
    with storage.open(name) as file:
        assert file.read() == "héllo, text".encode()
    # As the old MogileFS backend's save(name, raw_contents): Django's File of them had no read().
    for raw in (b"raw bytes", bytearray(b"raw bytearray"), memoryview(b"raw view"), "raw t\u00e9xt"):
        with storage.open(storage.save("docs/raw.txt", raw)) as file:
            assert file.read() == (raw.encode() if isinstance(raw, str) else bytes(raw))


def test_listdir_and_the_directories_that_exist(mogile: DevMogileFS) -> None:
    storage = MogileFSStorage()
    for name in ["docs/a.txt", "docs/sub/b.txt", "docs/sub/c.txt", "top.txt"]:
        storage.save(name, ContentFile(b"x"))
    get_client().store_content(TEMPORARY_PREFIX + "0" * 32, b"a save in progress")
    for odd in ("/abs.txt", "docs//odd.txt", "docs/"):  # another client's keys, which no saved name is
        get_client().store_content(odd, b"x")
    assert storage.listdir("") == (["docs"], ["top.txt"])
    assert storage.listdir("docs") == storage.listdir("/docs/") == (["sub"], ["a.txt"])
    # Read as FileSystemStorage reads a directory's name.
    assert storage.listdir("./docs") == storage.listdir("docs//sub/..") == (["sub"], ["a.txt"])
    assert storage.listdir("docs//sub") == storage.listdir("docs/./sub/") == ([], ["b.txt", "c.txt"])
    assert storage.listdir(".") == storage.listdir("docs/..") == (["docs"], ["top.txt"])
    for outside in ("..", "../docs", "docs/../.."):
        with pytest.raises(SuspiciousFileOperation, match="outside the storage"):
            storage.listdir(outside)
    assert storage.listdir("empty") == ([], [])
    # As FileSystemStorage answers for directories: collectstatic --clear clears what exists.
    assert [storage.exists(name) for name in ("", "docs", "docs/", "docs/sub", "doc", "docs/su", "empty", "empty/")] == [
        True, True, True, True, False, False, False, False]


def test_collectstatic_clear_replaces_every_file_of_its_location_and_nothing_else(
        app: TestApp, tmp_path: Path) -> None:
    """``collectstatic --clear`` into a storage with a ``location`` clears what is under it: it asks
    whether the root exists (it raised) and clears only the directories that exist (it left every
    file in one). Without a location it cleared the whole domain: every uploaded file."""
    for source, names in (("old", ["old.txt", "css/a.css", "img/icons/b.png"]), ("new", ["new.txt", "css/c.css"])):
        for name in names:
            (tmp_path / source / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / source / name).write_bytes(name.encode())
    uploaded = MogileFSStorage().save("css/upload.png", ContentFile(b"a user's upload"))
    static = {"BACKEND": "integration._django_static_storage.StaticStorage"}
    in_progress = TEMPORARY_PREFIX + "0" * 32
    with override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, "django.contrib.staticfiles"],
                           STORAGES={**settings.STORAGES, "staticfiles": static}, STATIC_URL="/static/"):
        with override_settings(STATICFILES_DIRS=[tmp_path / "old"]):
            call_command("collectstatic", "--noinput", verbosity=0)
        assert sorted(get_client().keys("static/")) == ["static/css/a.css", "static/img/icons/b.png", "static/old.txt"]
        get_client().store_content(in_progress, b"another process's save")
        get_client().store_content("static/css//legacy.css", b"another client's key")  # "" recursed for ever
        with override_settings(STATICFILES_DIRS=[tmp_path / "new"]):
            call_command("collectstatic", "--noinput", "--clear", verbosity=0)
        assert app.get(static_url("css/c.css")).body == b"css/c.css"
    assert sorted(get_client().keys("")) == [
        in_progress, uploaded, "static/css//legacy.css", "static/css/c.css", "static/new.txt"]
    assert app.get(MogileFSStorage().url(uploaded)).body == b"a user's upload"


def test_static_files_beside_uploads_keep_their_types_where_trusted(mogile: DevMogileFS) -> None:
    """The README's static storage: its scripts and stylesheets were sent as text, which browsers
    neither run nor apply, unless every user's upload was trusted with them."""
    static = MogileFSStorage(location="static")
    for name in ("app.js", "site.css"):
        static.save(name, ContentFile(b"/* the site's */"))
        MogileFSStorage().save(name, ContentFile(b"/* a user's */"))
    with with_settings(MOGILEFS_MIDDLEWARE_OPTIONS={"trusted_files": ["static/"]}):
        app = TestApp(wrap_wsgi(get_wsgi_application()), lint=True)
    for name, media_type in (("app.js", "text/javascript"), ("site.css", "text/css")):
        assert app.get(static.url(name)).headers["Content-Type"] == f"{media_type}; charset=utf-8"
        assert app.get(MogileFSStorage().url(name)).headers["Content-Type"] == "text/plain; charset=utf-8"


def test_collectstatic_again_passes_over_the_files_that_did_not_change(mogile: DevMogileFS, tmp_path: Path) -> None:
    """Without the stored files' time, every run deleted each file and stored it anew: missing
    meanwhile, a 404 for the site's pages."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("same.css", "changed.js"):
        (source / name).write_bytes(b"first " + name.encode())
        os.utime(source / name, (time.time() - 60, time.time() - 60))
    static = {"BACKEND": "integration._django_static_storage.StaticStorage"}
    with override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, "django.contrib.staticfiles"],
                           STORAGES={**settings.STORAGES, "staticfiles": static}, STATICFILES_DIRS=[source],
                           STATIC_URL="/static/"):
        call_command("collectstatic", "--noinput", verbosity=0)
        fids = {key: get_client().file_info(key).fid for key in ("static/same.css", "static/changed.js")}
        stored = MogileFSStorage(location="static").get_modified_time("same.css")
        assert stored.tzinfo is not None and abs(stored.timestamp() - time.time()) < 60
        (source / "changed.js").write_bytes(b"second")
        os.utime(source / "changed.js", (time.time() + 5, time.time() + 5))  # after it was stored
        call_command("collectstatic", "--noinput", verbosity=0)
    assert get_client().file_info("static/same.css").fid == fids["static/same.css"]  # not deleted and stored again
    assert get_client().file_info("static/changed.js").fid != fids["static/changed.js"]
    assert get_client().get_file_data("static/changed.js") == b"second"
    with pytest.raises(FileNotFoundError):
        MogileFSStorage(location="static").get_modified_time("none.css")


def test_the_modified_time_is_the_earliest_replicas_as_later_copies_are_dated_when_made(mogile: DevMogileFS) -> None:
    """mogilefsd copies a file to its other devices later (a second later, or months after a
    device failed), each copy dated when made: the time of whichever replica the tracker listed
    first made collectstatic pass over a file changed since its upload, once in two runs."""
    name = MogileFSStorage(mogile_class="avatar").save("app.js", ContentFile(b"v1"))
    paths = get_client().get_paths(name)
    assert len(paths) == 2
    stored = int(time.time()) - 100
    for made, url in zip((stored, stored + 3600), paths):
        (replica,) = mogile.data_dir.glob("stor*" + urlsplit(url).path)  # type: ignore[union-attr]
        os.utime(replica, (made, made))
    assert {MogileFSStorage().get_modified_time(name).timestamp() for _ in range(12)} == {stored}
    assert MogileFSStorage().get_created_time(name).timestamp() == stored  # a file stored is never changed
    with pytest.raises(NotImplementedError):
        MogileFSStorage().get_accessed_time(name)  # MogileFS keeps no time of reads
    (replica,) = mogile.data_dir.glob("stor*" + urlsplit(paths[0]).path)  # type: ignore[union-attr]
    replica.unlink()  # one replica gone: the other's time
    assert MogileFSStorage().get_modified_time(name).timestamp() == stored + 3600


def test_a_location_keeps_the_storages_names_under_a_directory_of_keys(app: TestApp) -> None:
    storage = MogileFSStorage(location="/site assets/")
    name = storage.save("a b.txt", ContentFile(b"asset"))
    assert name == "a b.txt" and get_client().get_file_data("site assets/a b.txt") == b"asset"
    assert storage.exists("a b.txt") and not MogileFSStorage().exists("a b.txt")
    assert storage.size(name) == 5 and storage.open(name).read() == b"asset"
    assert storage.url(name) == "/media/site%20assets/a%20b.txt" and storage.url(None) == "/media/site%20assets/"
    assert app.get(storage.url(name)).body == b"asset"
    taken = storage.save("a b.txt", ContentFile(b"again"))
    assert taken != name and storage.open(taken).read() == b"again"  # the name is taken within the location
    assert storage.listdir("") == ([], sorted([name, taken]))
    # A name fits a key with the location before it.
    long = storage.save("n" * 300 + ".txt", ContentFile(b"long"), max_length=250)
    assert len(("site assets/" + long).encode()) <= 255 and storage.size(long) == 4
    storage.delete(name)
    assert not storage.exists(name) and MogileFSStorage().exists("site assets")
    for location in ("a//b", "../up", "a/./b", "a\tb", 5, "x" * 254, TEMPORARY_PREFIX, TEMPORARY_PREFIX + "a"):
        with pytest.raises(ImproperlyConfigured, match="MogileFSStorage option 'location'"):
            MogileFSStorage(location=location)
    # The location as given, not with a file name made up after it ('../up/x').
    for location, named in (("../up", "'../up' has a '..' segment"), ("static/..", "'static/..' has a '..' segment"),
                            ("x" * 254, f"'{'x' * 254}' leaves no room for a file name in a key of 255 bytes at most")):
        with pytest.raises(ImproperlyConfigured, match=re.escape(named)):
            MogileFSStorage(location=location)


def test_url_quotes_spaces_and_non_ascii_and_is_served(app: TestApp) -> None:
    storage = MogileFSStorage()
    name = storage.save("with space/café 日本.png", ContentFile(b"pixels"))
    url = storage.url(name)
    assert url == "/media/with%20space/caf%C3%A9%20%E6%97%A5%E6%9C%AC.png"
    assert app.get(url).body == b"pixels"
    assert MogileFSStorage(media_url="https://cdn.example/files/").url("a b") == "https://cdn.example/files/a%20b"


def test_a_storage_of_another_domain_needs_its_own_media_url(mogile: DevMogileFS) -> None:
    """The wrapped application serves MOGILEFS_MEDIA_URL from MOGILEFS_DOMAIN: a link there to a
    key of another domain would give that domain's file of the same name, or a 404."""
    with pytest.raises(ImproperlyConfigured, match="'other'.*media_url.*middleware of its domain"):
        MogileFSStorage(domain="other").url("a.png")
    assert MogileFSStorage(domain="other", media_url="/other/").url("a.png") == "/other/a.png"
    assert MogileFSStorage(domain=DOMAIN).url("a.png") == "/media/a.png"


def test_a_storage_of_other_trackers_needs_its_own_media_url(mogile: DevMogileFS) -> None:
    """A domain of the same name on another MogileFS: MOGILEFS_MEDIA_URL would answer 404, or that
    MogileFS's file of the same key. One tracker in common, in any order, is the same MogileFS."""
    with pytest.raises(ImproperlyConfigured, match="none of MOGILEFS_TRACKERS.*media_url"):
        MogileFSStorage(trackers="127.0.0.1:1").url("a.png")
    assert MogileFSStorage(trackers="127.0.0.1:1", media_url="/elsewhere/").url("a.png") == "/elsewhere/a.png"
    assert MogileFSStorage(trackers=["127.0.0.1:1", *mogile.trackers]).url("a.png") == "/media/a.png"
    with override_settings(MOGILEFS_TRACKERS=["Tracker1.Example.com:7001"]):  # DNS names know no case, nor a final dot
        assert MogileFSStorage(trackers="tracker1.example.com.").url("a.png") == "/media/a.png"
    for listed, same in (("[::1]:7001", "[0:0:0:0:0:0:0:1]:7001"), ("10.0.0.1:7001", "[::ffff:10.0.0.1]:7001")):
        with override_settings(MOGILEFS_TRACKERS=[listed]):  # one address, written another way
            assert MogileFSStorage(trackers=same).url("a.png") == "/media/a.png"


def test_available_name_is_suffixed(mogile: DevMogileFS) -> None:
    storage = MogileFSStorage()
    assert storage.get_available_name("docs/a.txt") == "docs/a.txt"
    storage.save("docs/a.txt", ContentFile(b"first"))
    assert re.fullmatch(r"docs/a_\w{7}\.txt", storage.get_available_name("docs/a.txt"))


@overwriting
def test_available_name_is_the_name_when_overwrite_is_allowed(mogile: DevMogileFS) -> None:
    MogileFSStorage().save("docs/a.txt", ContentFile(b"first"))
    storage = MogileFSStorage(allow_overwrite=True)
    assert storage.get_available_name("docs/a.txt") == "docs/a.txt"
    assert storage.save("docs/a.txt", ContentFile(b"second")) == "docs/a.txt"
    assert storage.size("docs/a.txt") == 6


def test_concurrent_saves_of_one_name_keep_every_file(mogile: DevMogileFS) -> None:
    storage = MogileFSStorage(mogile_class="thumb")
    start = threading.Barrier(8)

    def save(n: int) -> str:
        content = ContentFile(f"saved by thread {n}".encode())
        start.wait()
        return storage.save("race/same.txt", content)

    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(save, range(8), timeout=60))
    assert len(set(names)) == 8 and "race/same.txt" in names
    assert all(re.fullmatch(r"race/same(_\w{7})?\.txt", name) for name in names)
    for n, name in enumerate(names):
        with storage.open(name) as file:
            assert file.read() == f"saved by thread {n}".encode()
    assert get_client().list_keys(TEMPORARY_PREFIX) == []


class _ContentTakingItsName(ContentFile):
    """Content whose reading stores another file under ``name``, as a concurrent save would."""

    def __init__(self, content: bytes, name: str) -> None:
        super().__init__(content)
        self.taken_name = name

    def chunks(self, chunk_size: int | None = None) -> Iterator[bytes]:
        get_client().store_content(self.taken_name, b"saved meanwhile")
        yield from super().chunks(chunk_size)


def test_a_name_taken_during_the_upload_is_not_renamed_onto(mogile: DevMogileFS,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """mogilefsd 2.73 answers a rename onto a taken key with ERR and then OK, and closes the
    connection of whichever request its worker serves next: the storage asks before renaming."""
    renamed_to: list[str] = []
    rename = Client.rename

    def recorded_rename(client: Client, key: str, new_key: str) -> None:
        renamed_to.append(new_key)
        rename(client, key, new_key)

    monkeypatch.setattr(Client, "rename", recorded_rename)
    storage = MogileFSStorage()
    name = storage.save("during.txt", _ContentTakingItsName(b"mine", "during.txt"))
    assert re.fullmatch(r"during_\w{7}\.txt", name) and renamed_to == [name]
    with storage.open(name) as mine, storage.open("during.txt") as theirs:
        assert (mine.read(), theirs.read()) == (b"mine", b"saved meanwhile")


class _FreedMeanwhileStorage(MogileFSStorage):
    """Where another request deletes the name a save found taken before the save asks for another."""

    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        self.delete(name)
        return super().get_available_name(name, max_length)


def test_a_name_freed_after_it_was_found_taken_is_saved_to(mogile: DevMogileFS) -> None:
    """Django's get_available_name offers the name found taken once it is free again: the save takes it."""
    storage = _FreedMeanwhileStorage()
    name = storage.save("freed.txt", _ContentTakingItsName(b"mine", "freed.txt"))
    assert name == "freed.txt"
    with storage.open(name) as file:
        assert file.read() == b"mine"
    assert get_client().list_keys(TEMPORARY_PREFIX) == []


class _Decrypting(File):
    """A file whose ``read()`` of its own gives other bytes than the file it holds (here, with
    its ``#`` lines left out), read through by Django's ``chunks()``."""

    def read(self, size: int = -1) -> bytes:
        return b"".join(line for line in self.file.read(size).splitlines(True) if not line.startswith(b"#"))


def test_a_file_reading_other_bytes_than_it_holds_stores_what_it_reads(mogile: DevMogileFS, tmp_path: Path) -> None:
    """As FileSystemStorage stores it: the upload, given the file it holds, announced its length
    and sent what read() gave, and the storage node refused the save (an UploadError)."""
    held = b"#the key\nthe text\n"
    on_disk = FileSystemStorage(location=tmp_path).save("a.txt", _Decrypting(io.BytesIO(held), "a.txt"))
    name = MogileFSStorage().save("a.txt", _Decrypting(io.BytesIO(held), "a.txt"))
    assert get_client().get_file_data(name) == (tmp_path / on_disk).read_bytes() == b"the text\n"


class _BrokenContent(ContentFile):
    """Content whose reading fails after the first chunk, as an interrupted request body would."""

    def chunks(self, chunk_size: int | None = None) -> Iterator[bytes]:
        yield b"the first part"
        raise OSError("the request body was cut")


def test_a_failed_upload_leaves_no_temporary_key(mogile: DevMogileFS) -> None:
    storage = MogileFSStorage()
    with pytest.raises(OSError, match="cut"):
        storage.save("broken.txt", _BrokenContent(b""))
    assert not storage.exists("broken.txt")
    assert get_client().list_keys(TEMPORARY_PREFIX) == []


def test_a_temporary_key_the_trackers_could_not_delete_is_named_with_how_to_delete_it(
        mogile: DevMogileFS, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def unavailable(self: Client, *args: Any) -> None:
        raise TrackerUnavailableError("every tracker failed")

    monkeypatch.setattr(Client, "rename", unavailable)
    monkeypatch.setattr(Client, "delete", unavailable)
    with pytest.raises(TrackerUnavailableError):
        MogileFSStorage().save("outage.txt", ContentFile(b"kept aside"))
    [temporary] = get_client().list_keys(TEMPORARY_PREFIX)
    monkeypatch.undo()
    [warning] = [record.getMessage() for record in caplog.records if "temporary key" in record.getMessage()]
    command = warning.split("delete it with: ")[1]
    assert repr(temporary) in warning and command == f"mogile-middleware rm {temporary}"
    assert main(["--trackers", ",".join(mogile.trackers), "--domain", DOMAIN, *command.split()[1:]]) == 0
    assert get_client().list_keys(TEMPORARY_PREFIX) == []


def test_a_failed_upload_names_the_file_saved_and_warns_of_no_temporary_key(
        mogile: DevMogileFS, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No storage node took the upload, so no temporary key was stored: nothing to delete, and no
    warning sending the operator after a key that does not exist (with the trackers down too)."""
    for node in mogile.nodes:
        node.stop()

    def unavailable(self: Client, *args: Any) -> None:
        raise TrackerUnavailableError("every tracker failed")

    monkeypatch.setattr(Client, "delete", unavailable)
    with pytest.raises(UploadError, match=r"^save of 'photos/refused\.jpg' failed: no storage node took '\.mogile-upload/"):
        MogileFSStorage().save("photos/refused.jpg", ContentFile(b"never stored"))
    assert not [record for record in caplog.records if "temporary key" in record.getMessage()]
    assert get_client().list_keys(TEMPORARY_PREFIX) == []


@pytest.mark.parametrize(("reply", "error", "cause"), [
    (b"ERR failure Operation+failed\r\n", UploadError, TrackerError),
    (None, UploadOutcomeUnknownError, OutcomeUnknownError),  # the connection closed: the answer lost
], ids=["failure", "answer-lost"])
def test_a_create_close_that_may_have_stored_leaves_no_temporary_key(
        mogile: DevMogileFS, reply: bytes | None, error: type[UploadError], cause: type[Exception]) -> None:
    """mogilefsd answers ``ERR failure`` when a step of create_close dies, also once it recorded
    the key (queuing its replication); an answer lost, with the upload not carried out, says
    nothing either: the temporary key may be stored, and is deleted. The error names the file and
    keeps the tracker's as its cause."""
    upstream = TrackerConnection(mogile.tracker_address, 1.0, 5.0)

    def stored_then(line: bytes) -> bytes | None:
        if line.startswith(b"create_close"):
            if reply is not None:  # failed after recording the key: recorded
                upstream.roundtrip(line)
            return reply
        return upstream.roundtrip(line)

    relay = ScriptedTracker(stored_then)
    try:
        storage = MogileFSStorage(trackers=relay.tracker)
        with pytest.raises(error, match="^save of 'recorded.txt' failed: upload of '.mogile-upload/") as raised:
            storage.save("recorded.txt", ContentFile(b"stored all the same"))
        assert isinstance(raised.value.__cause__, cause)
        assert any(entry.path.name == "upload.py" for entry in raised.traceback)  # where the upload failed
        assert get_client().list_keys(TEMPORARY_PREFIX) == [] and not storage.exists("recorded.txt")
    finally:
        relay.stop()
        upstream.close()


def _piped(data: bytes) -> File:
    """A file of ``data`` read from a pipe: once, as it cannot seek."""
    read, write = os.pipe()
    os.write(write, data)
    os.close(write)
    return File(os.fdopen(read, "rb"))


@overwriting
@pytest.mark.parametrize(("content", "stored"), [
    (lambda: ContentFile(b"ours"), b"ours"),
    (lambda: ContentFile("ours"), b"ours"),
    (lambda: _Decrypting(io.BytesIO(b"ours"), "a.png"), b"ours"),  # its own read(), over a seekable file
    (lambda: _piped(b"ours"), b"theirs"),  # given once: no second upload
], ids=["bytes", "text", "own-read", "piped"])
def test_an_overwrite_failed_by_another_saves_close_is_uploaded_again(
        mogile: DevMogileFS, content: Callable[[], File], stored: bytes) -> None:
    """mogilefsd 2.73 answers ``ERR failure`` to one of two saves of a key closing at once (both
    drop the old file, and the second drop is refused), the key holding the other's file: 1 save
    in 13 of 16 workers thumbnailing one image failed with a 500 against it."""
    upstream = TrackerConnection(mogile.tracker_address, 1.0, 5.0)
    closes = []

    def beaten_once(line: bytes) -> bytes | None:
        if line.startswith(b"create_close"):
            closes.append(line)
            if len(closes) == 1:  # another save's close of the key won: it holds their file, not ours
                get_client().store_content("thumbs/a.png", b"theirs")
                return b"ERR failure Operation+failed\r\n"
        return upstream.roundtrip(line)

    relay = ScriptedTracker(beaten_once)
    try:
        storage = MogileFSStorage(trackers=relay.tracker, allow_overwrite=True)
        with content() as file:
            if stored == b"ours":
                assert storage.save("thumbs/a.png", file) == "thumbs/a.png"
            else:
                with pytest.raises(UploadError, match="failed create_close"):
                    storage.save("thumbs/a.png", file)
        assert (len(closes), get_client().get_file_data("thumbs/a.png")) == (2 if stored == b"ours" else 1, stored)
    finally:
        relay.stop()
        upstream.close()


@pytest.mark.parametrize("delay", [0.0, 1.0], ids=["carried-out", "carried-out-late"])
def test_a_save_whose_create_close_answer_was_lost_is_told_by_its_temporary_key(
        mogile: DevMogileFS, delay: float) -> None:
    """mogilefsd 2.73 closes the connection of the request a query worker serves after another
    process's rename onto a taken key (a stray OK), then carries that request out: concurrent
    saves of one name from several processes failed (5 of 160 against 2.73), deleting a file
    that was stored, or, carried out after the delete, leaving its temporary key behind."""
    upstream = TrackerConnection(mogile.tracker_address, 1.0, 5.0)
    late = TrackerConnection(mogile.tracker_address, 1.0, 5.0)

    def losing_the_answer(line: bytes) -> bytes | None:
        if line.startswith(b"create_close"):
            threading.Timer(delay, late.roundtrip, [line]).start()
            return None
        return upstream.roundtrip(line)

    relay = ScriptedTracker(losing_the_answer)
    try:
        storage = MogileFSStorage(trackers=relay.tracker)
        assert storage.save("kept.txt", ContentFile(b"stored after all")) == "kept.txt"
        assert storage.open("kept.txt").read() == b"stored after all"
        assert get_client().list_keys(TEMPORARY_PREFIX) == []
    finally:
        relay.stop()
        upstream.close()
        late.close()


@pytest.mark.parametrize(("carried_out", "lost_answers"),
                         [("at once", 1), ("late", 1), ("late", 2), ("never", 1), ("never", 3)],
                         ids=["carried-out", "carried-out-late", "carried-out-late-then-another-lost",
                              "not-carried-out", "never-carried-out"])
def test_a_rename_whose_answer_was_lost_is_told_by_the_temporary_key(mogile: DevMogileFS, carried_out: str,
                                                                     lost_answers: int) -> None:
    """A save whose rename answer was lost raised, though the tracker had renamed the file: the
    name held it, with no row pointing at it, and the next save of the name took another one.
    Late: the tracker carries it out after the temporary key was found still there."""
    upstream = TrackerConnection(mogile.tracker_address, 1.0, 5.0)
    lost: list[bytes] = []

    def losing_renames(line: bytes) -> bytes | None:
        if line.startswith(b"rename ") and len(lost) < lost_answers:
            lost.append(line)
            if carried_out == "at once":
                upstream.roundtrip(line)
            return None
        answer = upstream.roundtrip(line)
        asks_for_the_temporary_key = line.startswith(b"file_info ") and TEMPORARY_PREFIX.encode() in unquote_to_bytes(line)
        if carried_out == "late" and asks_for_the_temporary_key:
            upstream.roundtrip(lost[0])
        return answer

    relay = ScriptedTracker(losing_renames)
    try:
        storage = MogileFSStorage(trackers=relay.tracker)
        if lost_answers > 2:
            with pytest.raises(UploadError, match="^save of 'lost.txt' failed: the answers to 3 renames were lost"):
                storage.save("lost.txt", ContentFile(b"content"))
            assert not storage.exists("lost.txt")
        else:
            assert storage.save("lost.txt", ContentFile(b"content")) == "lost.txt"
            assert get_client().get_file_data("lost.txt") == b"content"
        assert len(lost) == lost_answers and get_client().list_keys(TEMPORARY_PREFIX) == []
    finally:
        relay.stop()
        upstream.close()


def test_a_rename_whose_outcome_cannot_be_known_says_the_name_may_hold_the_file(mogile: DevMogileFS) -> None:
    upstream = TrackerConnection(mogile.tracker_address, 1.0, 5.0)

    def silent_after_the_rename(line: bytes) -> bytes | None:
        if line.startswith(b"rename "):
            upstream.roundtrip(line)
            return None
        if line.startswith(b"file_info ") and TEMPORARY_PREFIX.encode() in unquote_to_bytes(line):
            return None
        return upstream.roundtrip(line)

    relay = ScriptedTracker(silent_after_the_rename)
    try:
        with pytest.raises(UploadOutcomeUnknownError, match="^save of 'unknown.txt': the answer to its rename was lost"):
            MogileFSStorage(trackers=relay.tracker).save("unknown.txt", ContentFile(b"content"))
        assert get_client().get_file_data("unknown.txt") == b"content"
    finally:
        relay.stop()
        upstream.close()


def test_a_save_interrupted_once_stored_leaves_no_temporary_key(mogile: DevMogileFS,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the stored key's change is told (to memcached, say): it is deleted on the way out."""
    told = Client._changed
    interrupted: list[Any] = []

    def interrupted_once(client: Client, *keys: str | bytes) -> Any:
        if any(str(key).startswith(TEMPORARY_PREFIX) for key in keys) and not interrupted:
            interrupted.append(keys)
            raise KeyboardInterrupt
        return told(client, *keys)

    monkeypatch.setattr(Client, "_changed", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        MogileFSStorage().save("interrupted.txt", ContentFile(b"stored"))
    assert interrupted and get_client().list_keys(TEMPORARY_PREFIX) == []


class _NoAlternativeStorage(MogileFSStorage):
    """Offers the name asked for even when it is taken, so a save's rename cannot succeed."""

    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        return name


def test_a_save_that_cannot_be_renamed_deletes_its_temporary_key(mogile: DevMogileFS) -> None:
    storage = _NoAlternativeStorage()
    storage.save("taken.txt", ContentFile(b"first"))
    with pytest.raises(FileExistsError, match="'taken.txt'"):
        storage.save("taken.txt", ContentFile(b"second"))
    with storage.open("taken.txt") as file:
        assert file.read() == b"first"
    assert get_client().list_keys(TEMPORARY_PREFIX) == []


@overwriting
@pytest.mark.parametrize("content", [ContentFile, lambda data: SimpleUploadedFile("up.bin", data)],
                         ids=["content-file", "uploaded-in-memory"])
def test_a_save_goes_on_to_the_next_storage_node_when_one_drops_it(mogile: DevMogileFS, dropping_node: str,
                                                                   content: Callable[[bytes], File]) -> None:
    # The storage gave the upload the file's chunks, which are sent once: a node that dropped the
    # PUT midway failed the save that store_file of the same file survives.
    good = mogile.nodes[1].url.rstrip("/") + "/dev2"
    tracker = _scripted_open([dropping_node + "/dev1", good])
    opening = tracker.script
    tracker.script = lambda line: (  # the upload asks whether the class keeps checksums
        f"OK domains=1&domain1={DOMAIN}&domain1classes=1&domain1class1name=thumb&domain1class1mindevcount=1\r\n"
        .encode() if line.startswith(b"get_domains") else opening(line))
    try:
        payload = bytes(range(256)) * 400
        storage = MogileFSStorage(trackers=tracker.tracker, allow_overwrite=True)
        assert storage.save("fallback.bin", content(payload)) == "fallback.bin"
        close = [line for line in tracker.requests if line.startswith(b"create_close")]
        assert len(close) == 1 and b"devid=2" in close[0] and f"size={len(payload)}".encode() in close[0]
    finally:
        tracker.stop()


def test_a_name_longer_than_any_key_is_shortened_to_the_fields_max_length(mogile: DevMogileFS) -> None:
    # A FileField saves with max_length=100: Django shortens the name when exists() allows it,
    # where exists() raised for a name over 255 bytes and the save failed.
    name = "docs/" + "n" * 300 + ".txt"
    storage = MogileFSStorage()
    assert not storage.exists(name)
    saved = storage.save(name, ContentFile(b"long"), max_length=100)
    assert re.fullmatch(r"docs/n+_\w{7}\.txt", saved) and len(saved) == 100
    assert storage.size(saved) == 4
    with pytest.raises(SuspiciousFileOperation, match="over the 255"):  # no max_length: it cannot fit
        storage.save(name, ContentFile(b"long"))
    # Within the field's max_length, but not within a key: 100 characters of 3 bytes each, or 286
    # ASCII ones under max_length=300, were refused at the upload.
    for long_name, max_length in (("docs/" + "中" * 91 + ".txt", 100), ("docs/" + "n" * 277 + ".txt", 300),
                                  ("docs/" + "\U00020000" * 85 + ".txt", 100), ("docs/" + "中" * 127 + "é.txt", 255),
                                  ("docs/" + "\U0001f600" * 90 + ".txt", 100)):  # 4-byte characters: cut by 4
        saved = storage.save(long_name, ContentFile(b"long"), max_length=max_length)
        assert len(saved.encode()) <= 255 and saved.startswith(long_name[:10]) and saved.endswith(".txt")
        assert storage.size(saved) == 4
    with pytest.raises(SuspiciousFileOperation, match="control byte"):  # too long, and no key at any length
        storage.exists(name + "\x00")
    with pytest.raises(TypeError, match="a key is a str"):
        storage.exists(PurePosixPath("docs/a.txt"))


def test_a_file_object_with_read_alone_is_saved(mogile: DevMogileFS) -> None:
    class ReadOnly:
        def __init__(self) -> None:
            self.parts = [b"read ", b"alone", b""]

        def read(self, size: int = -1) -> bytes:
            return self.parts.pop(0)

    storage = MogileFSStorage()
    name = storage.save("read-alone.txt", File(ReadOnly()))
    with storage.open(name) as file:
        assert file.read() == b"read alone"


@pytest.mark.parametrize("call", [
    pytest.param(lambda storage: storage.exists("line\nbreak"), id="exists-newline"),
    pytest.param(lambda storage: storage.save("é" * 130 + ".txt", ContentFile(b"x")), id="save-too-long"),
    pytest.param(lambda storage: storage.url("nul\x00"), id="url-nul"),
])
def test_names_the_storage_never_saves_are_suspicious(mogile: DevMogileFS, call: Callable[[Any], Any]) -> None:
    with pytest.raises(SuspiciousFileOperation):
        call(MogileFSStorage())


@overwriting
def test_deconstruct_round_trip() -> None:
    storage = MogileFSStorage(mogile_class="thumb", trackers="127.0.0.1:7001", allow_overwrite=True)
    path, args, kwargs = storage.deconstruct()
    assert path == "mogile_middleware.contrib.django.MogileFSStorage"
    rebuilt = import_string(path)(*args, **kwargs)
    assert (rebuilt.mogile_class, rebuilt.allow_overwrite) == ("thumb", True)
    assert rebuilt.deconstruct() == (path, args, kwargs)
    assert AvatarStorage().deconstruct() == ("gallery.storage.AvatarStorage", (), {})
    assert MigrationWriter.serialize(storage)[0] == (
        "mogile_middleware.contrib.django.MogileFSStorage("
        "allow_overwrite=True, mogile_class='thumb', trackers='127.0.0.1:7001')"
    )


# -- the wrapped application --------------------------------------------------------------------


@overwriting
def test_a_save_through_a_storage_drops_the_cached_paths(app: TestApp) -> None:
    storage = MogileFSStorage(allow_overwrite=True)
    assert storage.client is app.app.client
    name = storage.save("news.txt", ContentFile(b"old news"))
    url = storage.url(name)
    assert app.get(url).body == b"old news"
    assert app.get(url).body == b"old news"  # now from the path cache
    assert storage.save(name, ContentFile(b"fresh news")) == name
    assert app.get(url).body == b"fresh news"
    storage.delete(name)
    app.get(url, status=404)


@overwriting
def test_writes_drop_the_key_from_the_shared_memcached(mogile: DevMogileFS) -> None:
    with start_memcached() as server, with_settings(MOGILEFS_MEMCACHED_SERVERS=f"{server.address},"):
        backend = MemcachedBackend([server.address])

        def cache(name: str) -> None:
            backend.set(entry_key(DOMAIN, name), None, time.time(), 60)  # a cached "no such key"

        def cached(name: str) -> bool:
            return backend.get(entry_key(DOMAIN, name)) is not None

        storage, overwriter = MogileFSStorage(), MogileFSStorage(allow_overwrite=True)
        cache("shared.txt")
        assert storage.save("shared.txt", ContentFile(b"v1")) == "shared.txt" and not cached("shared.txt")
        cache("shared.txt")
        overwriter.save("shared.txt", ContentFile(b"v2"))
        assert not cached("shared.txt")
        cache("shared.txt")
        storage.delete("shared.txt")
        assert not cached("shared.txt")

        middleware = wrap_wsgi(get_wsgi_application())
        assert middleware.client is get_client() and get_client().cache_backend is not None
        app = TestApp(middleware, lint=True)
        overwriter.save("served.txt", ContentFile(b"old"))
        assert app.get("/media/served.txt").body == b"old"
        overwriter.save("served.txt", ContentFile(b"new"))
        assert app.get("/media/served.txt").body == b"new"


def test_the_middleware_cache_is_chosen_by_one_setting_only(mogile: DevMogileFS) -> None:
    with with_settings(MOGILEFS_MEMCACHED_SERVERS="127.0.0.1:11211",
                       MOGILEFS_MIDDLEWARE_OPTIONS={"cache_backend": MemcachedBackend("127.0.0.1:11211")}):
        with pytest.raises(ImproperlyConfigured, match="MOGILEFS_MEMCACHED_SERVERS"):
            _wrap()


@pytest.mark.usefixtures("mogile", "without_pymemcache")
def test_the_memcached_setting_without_pymemcache_names_the_extra() -> None:
    with with_settings(MOGILEFS_MEMCACHED_SERVERS="127.0.0.1:11211"):
        with pytest.raises(ImproperlyConfigured, match=re.escape(
                "MOGILEFS_MEMCACHED_SERVERS: mogile_middleware.memcache needs pymemcache: "
                "pip install 'mogile_middleware[memcached]'")):
            _wrap()


def test_other_paths_reach_django(app: TestApp) -> None:
    assert "<form" in app.get("/").text
    app.get("/nothing-here/", status=404)


def test_settings_reach_the_middleware(mogile: DevMogileFS) -> None:
    MogileFSStorage().save("a.png", ContentFile(b"pixels"))
    with with_settings(MOGILEFS_CACHE_CONTROL="public, max-age=60", MOGILEFS_PATH_CACHE_SECONDS=0,
                       MOGILEFS_MIDDLEWARE_OPTIONS={"retry_after_seconds": 9}):
        middleware = wrap_wsgi(get_wsgi_application())
    app = TestApp(middleware, lint=True)
    assert app.get("/media/a.png").headers["Cache-Control"] == "public, max-age=60"
    app.get("/media/a.png")
    assert (middleware.locator.paths.lookups, middleware.retry_after_seconds) == (2, 9)

    with with_settings(SERVE_WITH_PERLBAL=True, MOGILEFS_TRUSTED_PROXIES=["10.0.0.0/8"]):
        app = TestApp(wrap_wsgi(get_wsgi_application()), lint=True)
    assert "X-REPROXY-URL" in app.get("/media/a.png", extra_environ={"REMOTE_ADDR": "10.1.2.3"}).headers
    assert app.get("/media/a.png", extra_environ={"REMOTE_ADDR": "192.0.2.1"}).body == b"pixels"

    with with_settings(SERVE_WITH_PERLBAL=True, MOGILEFS_REPROXY="nginx", MOGILEFS_NGINX_LOCATION="/internal"):
        app = TestApp(wrap_wsgi(get_wsgi_application()), lint=True)
    assert app.get("/media/a.png").headers["X-Accel-Redirect"].startswith("/internal")
    with with_settings(SERVE_WITH_PERLBAL=True, MOGILEFS_REPROXY="nginx", MOGILEFS_NGINX_LOCATION="@reproxy"):
        app = TestApp(wrap_wsgi(get_wsgi_application()), lint=True)
    assert app.get("/media/a.png").headers["X-Accel-Redirect"] == "@reproxy"

    with with_settings(SERVE_WITH_PERLBAL=True, MOGILEFS_REPROXY=None, MOGILEFS_MEDIA_URL="https://cdn.example/m/"):
        app = TestApp(wrap_wsgi(get_wsgi_application()), lint=True)
        assert MogileFSStorage().url("a.png") == "https://cdn.example/m/a.png"
    assert app.get("/m/a.png").body == b"pixels"

    with with_settings(SERVE_WITH_PERLBAL=None, MOGILEFS_MIDDLEWARE_OPTIONS=None):  # None: as if unset
        app = TestApp(wrap_wsgi(get_wsgi_application()), lint=True)
    assert app.get("/media/a.png").body == b"pixels"


def test_signed_urls_from_the_storage_open_their_file_until_they_expire(mogile: DevMogileFS) -> None:
    MogileFSStorage().save("docs/ré sumé.pdf", ContentFile(b"%PDF private"))
    with with_settings(MOGILEFS_SIGNING_KEY=["new-secret", "old-secret"], MOGILEFS_URL_EXPIRES=60):
        app = TestApp(wrap_wsgi(get_wsgi_application()), lint=True)
        url = MogileFSStorage().url("docs/ré sumé.pdf")
    path, _, query = url.partition("?")
    assert path == "/media/docs/r%C3%A9%20sum%C3%A9.pdf"
    expires = int(re.fullmatch(r"expires=(\d+)&signature=[\w-]{43}", query)[1])
    assert 55 <= expires - time.time() <= 61
    assert app.get(url).body == b"%PDF private"
    assert app.get(url).headers["Cache-Control"] == "public, max-age=3600"  # the site's MOGILEFS_CACHE_CONTROL
    assert b"signed link" in app.get(path, status=403).body
    with with_settings(MOGILEFS_SIGNING_KEY="old-secret"):  # signed with the key being retired: still valid
        old_url = MogileFSStorage().url("docs/ré sumé.pdf")
    assert app.get(old_url).body == b"%PDF private"
    with with_settings(MOGILEFS_SIGNING_KEY="a-stranger"):
        assert b"not valid" in app.get(MogileFSStorage().url("docs/ré sumé.pdf"), status=403).body


def test_serve_needs_the_wrapped_application(mogile: DevMogileFS) -> None:
    from django.test import RequestFactory

    from mogile_middleware.contrib.django import serve

    with pytest.raises(ImproperlyConfigured, match="wrap_wsgi"):
        serve(RequestFactory().get("/private/a.png"), "a.png")
    wrapped = RequestFactory().get("/private/", **{WRAPPED_BY: object()})
    # What the view gives, not a file that exists: Django's 400. "\udcff" is the byte 0xff, as
    # list_keys gives such a key back: no URL names it.
    for name in ("a" * 300, "x\x00y", "x\udcff"):
        with pytest.raises(SuspiciousFileOperation, match="cannot be a MogileFS key"):
            serve(wrapped, name)


def test_client_options_reach_the_storages_and_both_middlewares(mogile: DevMogileFS) -> None:
    options = {"connect_timeout": 0.25, "io_timeout": 3, "dead_seconds": 30, "storage_timeout": 4}
    with with_settings(MOGILEFS_CLIENT_OPTIONS=options):
        wsgi, asgi = wrap_wsgi(get_wsgi_application()), wrap_asgi(get_asgi_application())
        storage_client = get_client()
    for client in (storage_client, wsgi.client, asgi.client):
        pool = client.pool
        assert (pool.connect_timeout, pool.io_timeout, pool.dead_seconds, client.storage_timeout) == (0.25, 3, 30, 4)
    assert wsgi.storage_timeout == asgi.storage_timeout == 4


def test_an_application_wrapped_already_is_refused(mogile: DevMogileFS) -> None:
    """The outer middleware answered every request of the inner one's prefix (the same) itself
    (ASGI: without a word); one of another prefix inside is the order the README gives."""
    options = {"domain": DOMAIN, "trackers": mogile.trackers, "prefix": "/avatars/"}
    for wrap, application, middleware in [(wrap_wsgi, get_wsgi_application, MogileFSMiddleware),
                                          (wrap_asgi, get_asgi_application, ASGIMiddleware)]:
        with pytest.raises(ImproperlyConfigured, match="prefix '/media/' is the prefix of the middleware it wraps"):
            wrap(wrap(application()))
        wrapped = wrap(middleware(application(), **options))
        assert [inner.prefix for inner in wrapped_middlewares(wrapped)] == ["/media/", "/avatars/"]


def test_wrapped_applications_dropped_go_with_their_path_caches(mogile: DevMogileFS) -> None:
    """A test suite or an application factory wraps the application again and again: each one's
    path cache stayed alive, listening to the shared clients' saves, until the process ended."""
    site = TestApp(wrap_wsgi(get_wsgi_application()), lint=True)
    dropped = [weakref.ref(wrap(application()).locator) for wrap, application in
               [(wrap_wsgi, get_wsgi_application), (wrap_asgi, get_asgi_application)] * 3]
    gc.collect()
    assert [locator() for locator in dropped] == [None] * 6
    storage = MogileFSStorage()
    storage.save("dropped.txt", ContentFile(b"old"))
    assert site.get("/media/dropped.txt").body == b"old"
    locator = site.app.locator
    assert locator.paths.backend.get(locator.cache_key("dropped.txt")) is not None
    storage.delete("dropped.txt")  # the living one still hears of changes
    assert locator.paths.backend.get(locator.cache_key("dropped.txt")) is None


# -- the wrapped ASGI application ---------------------------------------------------------------


def asgi_get(middleware: ASGIMiddleware, path: str, client: str = "127.0.0.1",
             root_path: str = "") -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` from ``middleware`` on an event loop of its own: the status, headers and body."""
    async def get() -> tuple[int, dict[str, str], bytes]:
        try:
            return await asyncio.wait_for(asgi_answer(middleware, path, client, root_path), 10)
        finally:
            await middleware.client.aclose()  # this loop's tracker connections

    return asyncio.run(get())


async def asgi_answer(middleware: ASGIMiddleware, path: str, client: str = "127.0.0.1",
                      root_path: str = "") -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` from ``middleware`` on the running event loop: the status, headers and body."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)  # the client stays until the answer ends
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": root_path, "headers": [(b"host", b"testserver")], "client": (client, 50000)}
    await middleware(scope, receive, send)
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in sent[0]["headers"]}
    return sent[0]["status"], headers, b"".join(message.get("body", b"") for message in sent[1:])


@pytest.fixture
def lingering_mogile(tmp_path: Path) -> Iterator[DevMogileFS]:
    """As ``mogile``, but the files of an overwritten version stay on the nodes for a minute, as on
    a real tracker: a stale cached location still serves the old bytes, so only a dropped cache
    entry shows the new ones."""
    with DevMogileFS(data_dir=tmp_path / "mogdata", domains={DOMAIN: CLASSES}, replication_delay=60) as devmogile, \
            override_settings(MOGILEFS_DOMAIN=DOMAIN, MOGILEFS_TRACKERS=devmogile.trackers):
        yield devmogile


def test_asgi_settings_reach_the_middleware(mogile: DevMogileFS) -> None:
    MogileFSStorage().save("a.png", ContentFile(b"pixels"))
    with with_settings(MOGILEFS_CACHE_CONTROL="public, max-age=60", MOGILEFS_PATH_CACHE_SECONDS=0,
                       MOGILEFS_MIDDLEWARE_OPTIONS={"retry_after_seconds": 9}):
        middleware = wrap_asgi(get_asgi_application())
    assert isinstance(middleware, ASGIMiddleware) and isinstance(middleware.client, AsyncClient)
    status, headers, body = asgi_get(middleware, "/media/a.png")
    assert (status, headers["content-type"], headers["cache-control"], body) == (
        200, "image/png", "public, max-age=60", b"pixels")
    asgi_get(middleware, "/media/a.png")
    assert (middleware.locator.paths.lookups, middleware.retry_after_seconds) == (2, 9)

    with with_settings(SERVE_WITH_PERLBAL=True, MOGILEFS_TRUSTED_PROXIES=["10.0.0.0/8"]):
        middleware = wrap_asgi(get_asgi_application())
    assert "x-reproxy-url" in asgi_get(middleware, "/media/a.png", client="10.1.2.3")[1]
    assert asgi_get(middleware, "/media/a.png", client="192.0.2.1")[2] == b"pixels"

    with with_settings(SERVE_WITH_PERLBAL=True, MOGILEFS_REPROXY="nginx", MOGILEFS_NGINX_LOCATION="/internal"):
        middleware = wrap_asgi(get_asgi_application())
    assert asgi_get(middleware, "/media/a.png")[1]["x-accel-redirect"].startswith("/internal")

    with with_settings(MOGILEFS_MEDIA_URL="https://cdn.example/m/"):
        middleware = wrap_asgi(get_asgi_application())
    assert asgi_get(middleware, "/m/a.png")[2] == b"pixels"

    with with_settings(MOGILEFS_REPROXY="apache"), pytest.raises(ImproperlyConfigured, match="MOGILEFS_REPROXY"):
        wrap_asgi(get_asgi_application())


def test_wrap_asgi_runs_the_authorize_wrap_wsgi_takes_where_django_runs_synchronous_code(mogile: DevMogileFS) -> None:
    """One that asks the database: on the event loop, Django refused it (SynchronousOnlyOperation,
    a 500) where wrap_wsgi served the same settings."""
    from django.db import connection

    MogileFSStorage().save("mine.png", ContentFile(b"pixels"))

    def authorize(request: Any, key: str) -> bool:
        with connection.cursor() as cursor:  # refused on an event loop
            cursor.execute("SELECT 1")
        return key == "mine.png"

    with with_settings(MOGILEFS_MIDDLEWARE_OPTIONS={"authorize": authorize}, MOGILEFS_CACHE_CONTROL=MISSING):
        middleware = wrap_asgi(get_asgi_application())
        wsgi = TestApp(wrap_wsgi(get_wsgi_application()))
    assert asgi_get(middleware, "/media/mine.png")[::2] == (200, b"pixels")
    assert asgi_get(middleware, "/media/other.png")[0] == 403
    assert wsgi.get("/media/mine.png").body == b"pixels"
    assert wsgi.get("/media/other.png", status=403)


def test_a_plain_authorize_runs_between_closings_of_old_database_connections(
        mogile: DevMogileFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """As Django closes them around a view (``request_started``, ``request_finished``): outside a
    request, a connection a database restart broke failed every file until a view ran in that
    thread, and under ASGI for good."""
    MogileFSStorage().save("mine.png", ContentFile(b"pixels"))
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(cycle, "close_old_connections", lambda: calls.append(("closing", threading.get_ident())))

    def authorize(request: Any, key: str) -> bool:
        calls.append(("authorize", threading.get_ident()))
        return True

    with with_settings(MOGILEFS_MIDDLEWARE_OPTIONS={"authorize": authorize}, MOGILEFS_CACHE_CONTROL=MISSING):
        served = [TestApp(wrap_wsgi(get_wsgi_application())).get("/media/mine.png").body,
                  asgi_get(wrap_asgi(get_asgi_application()), "/media/mine.png")[2]]
    assert served == [b"pixels", b"pixels"]
    assert [name for name, _ in calls] == ["closing", "authorize", "closing"] * 2
    assert len({thread for _, thread in calls[:3]}) == len({thread for _, thread in calls[3:]}) == 1


def test_the_plain_authorize_of_concurrent_asgi_requests_runs_at_once_in_threads_of_its_own(
        mogile: DevMogileFS) -> None:
    """As Django runs synchronous views, and apart from the event loop's default executor, which
    looks tracker names up and asks memcached: in asgiref's one thread for code outside a request,
    a slow authorize held up every file of the process; in that executor, slow ones held those up."""
    MogileFSStorage().save("mine.png", ContentFile(b"pixels"))

    def authorize(scope: Any, key: str) -> bool:
        time.sleep(0.5)
        return True

    with with_settings(MOGILEFS_MIDDLEWARE_OPTIONS={"authorize": authorize}, MOGILEFS_CACHE_CONTROL=MISSING):
        middleware = wrap_asgi(get_asgi_application())

    async def lookup(started: float) -> float:
        await asyncio.sleep(0.1)  # the authorize calls have begun
        await asyncio.get_running_loop().getaddrinfo("localhost", 7001)
        return time.monotonic() - started - 0.1

    async def many() -> tuple[list[int], float, float]:
        started = time.monotonic()
        try:
            *answers, looked_up = await asyncio.gather(
                *(asgi_answer(middleware, "/media/mine.png") for _ in range(40)), lookup(started))
        finally:
            await middleware.client.aclose()
        return [status for status, _, _ in answers], time.monotonic() - started, looked_up

    statuses, took, looked_up = asyncio.run(many())
    assert statuses == [200] * 40 and took < 1.8  # 32 at once, then 8: one after another, 20 s
    assert looked_up < 0.3  # the default executor's 32 threads at most were all asleep: 0.5 s


def test_wrap_asgi_awaits_what_a_plain_authorize_gives_when_it_is_awaitable(mogile: DevMogileFS) -> None:
    """A decorator's wrapper of a coroutine function, or a lambda calling one: as before it ran in a
    thread, where the coroutine came back unawaited (a 500 for every file)."""
    MogileFSStorage().save("mine.png", ContentFile(b"pixels"))

    async def allowed(key: str) -> bool:
        await asyncio.sleep(0)
        return key == "mine.png"

    with with_settings(MOGILEFS_MIDDLEWARE_OPTIONS={"authorize": lambda scope, key: allowed(key)},
                       MOGILEFS_CACHE_CONTROL=MISSING):
        middleware = wrap_asgi(get_asgi_application())
    assert asgi_get(middleware, "/media/mine.png")[0] == 200
    assert asgi_get(middleware, "/media/other.png")[0] == 403


def test_the_threads_of_a_plain_authorize_end_with_their_event_loop(mogile: DevMogileFS) -> None:
    """At its shutdown, or, for a loop closed without one (``run_until_complete``, then ``close``),
    when the next loop asks: those of such loops were kept for the process's life."""
    MogileFSStorage().save("mine.png", ContentFile(b"pixels"))
    with with_settings(MOGILEFS_MIDDLEWARE_OPTIONS={"authorize": lambda scope, key: True},
                       MOGILEFS_CACHE_CONTROL=MISSING):
        middleware = wrap_asgi(get_asgi_application())

    def threads() -> list[threading.Thread]:
        return [thread for thread in threading.enumerate() if thread.name.startswith("authorize")]

    loop = asyncio.new_event_loop()
    assert loop.run_until_complete(asgi_answer(middleware, "/media/mine.png"))[0] == 200
    loop.close()  # without shutdown_asyncgens
    assert threads()
    assert asyncio.run(asgi_answer(middleware, "/media/mine.png"))[0] == 200
    for thread in threads():
        thread.join(2)
    assert not threads()


def test_a_child_forked_while_the_parent_starts_an_authorize_thread_answers_its_files(mogile: DevMogileFS) -> None:
    """A worker forked from a process whose loop was starting one of its threads for a plain
    ``authorize``: its first file ended the parent's threads, and waited for ever for their lock."""
    MogileFSStorage().save("mine.png", ContentFile(b"pixels"))
    with with_settings(MOGILEFS_MIDDLEWARE_OPTIONS={"authorize": lambda scope, key: True},
                       MOGILEFS_CACHE_CONTROL=MISSING):
        middleware = wrap_asgi(get_asgi_application())
    parents_loop = LoopThread()
    try:
        assert parents_loop.run(asgi_answer(middleware, "/media/mine.png"))[0] == 200
        threads = next(thing for thing in gc.get_objects() if type(thing) is ThreadPoolExecutor  # not a lazy object's
                       and thing._thread_name_prefix.startswith("authorize"))

        def first_file() -> None:
            assert asyncio.run(asgi_answer(middleware, "/media/mine.png"))[0] == 200

        assert children_failing(holding(threads._shutdown_lock), first_file, children=5) == 0
    finally:
        parents_loop.stop()


@overwriting
def test_a_storage_save_drops_the_asgi_middlewares_cached_paths(lingering_mogile: DevMogileFS) -> None:
    middleware = wrap_asgi(get_asgi_application())
    storage = MogileFSStorage(mogile_class="thumb", allow_overwrite=True)  # one copy: cached as complete
    storage.save("news.txt", ContentFile(b"old news"))
    assert asgi_get(middleware, "/media/news.txt")[2] == b"old news"
    assert asgi_get(middleware, "/media/news.txt")[2] == b"old news"  # now from the path cache
    storage.save("news.txt", ContentFile(b"fresh news"))  # the old version's file stays on its node
    assert asgi_get(middleware, "/media/news.txt")[2] == b"fresh news"
    assert middleware.locator.paths.lookups == 2
    storage.delete("news.txt")
    assert asgi_get(middleware, "/media/news.txt")[0] == 404


@overwriting
def test_the_asgi_middleware_caches_paths_in_the_shared_memcached(lingering_mogile: DevMogileFS) -> None:
    with start_memcached() as server, with_settings(MOGILEFS_MEMCACHED_SERVERS=[server.address]):
        backend = MemcachedBackend([server.address])
        middleware = wrap_asgi(get_asgi_application())
        storage = MogileFSStorage(mogile_class="thumb", allow_overwrite=True)
        storage.save("shared.txt", ContentFile(b"v1"))
        assert asgi_get(middleware, "/media/shared.txt")[2] == b"v1"
        assert backend.get(entry_key(DOMAIN, "shared.txt")) is not None
        storage.save("shared.txt", ContentFile(b"v2"))
        assert backend.get(entry_key(DOMAIN, "shared.txt")) is None
        assert asgi_get(middleware, "/media/shared.txt")[2] == b"v2"


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, str, bytes]:
    """One request to the loopback ``port``: the status, ``Content-Type`` and body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


@overwriting
def test_wrap_asgi_under_uvicorn(lingering_mogile: DevMogileFS) -> None:
    """``tests/integration/_django_asgi_app.py`` under uvicorn: files, with an ``authorize`` asking
    the database (a 500 for every file, ``SynchronousOnlyOperation``, when it ran on the event
    loop), Django's pages, and a save in a view (in Django's thread for synchronous views) that the
    next request sees."""
    require_module("uvicorn")
    client = Client(DOMAIN, lingering_mogile.trackers)
    client.store_content("news.txt", b"old news", cls="thumb")
    client.store_content("private/plans.txt", b"plans", cls="thumb")
    env = {"MOGILEFS_DOMAIN": DOMAIN, "MOGILEFS_TRACKERS": lingering_mogile.trackers[0]}
    # Django's ASGI handler answers only HTTP: wrap_asgi answers the lifespan (uvicorn stopped at start up).
    with run_uvicorn(env, app="_django_asgi_app:make_app", extra_args=["--lifespan", "on"]) as server:
        assert _request(server.port, "GET", "/media/news.txt") == (200, "text/plain; charset=utf-8", b"old news")
        assert _request(server.port, "GET", "/media/news.txt")[2] == b"old news"  # now from the path cache
        assert _request(server.port, "GET", "/") == (200, "text/plain", b"hello from django\n")
        assert _request(server.port, "GET", "/nothing-here/")[0] == 404
        assert _request(server.port, "GET", "/media/nothing.txt")[0] == 404
        assert _request(server.port, "GET", "/media/private/plans.txt")[0] == 403
        assert _request(server.port, "POST", "/save/news.txt", b"fresh news") == (200, "text/plain", b"news.txt")
        assert _request(server.port, "GET", "/media/news.txt")[2] == b"fresh news"


def test_wrap_asgi_closes_the_event_loops_connections_at_shutdown(lingering_mogile: DevMogileFS) -> None:
    """Django's ASGI handler refuses the lifespan: wrap_asgi answers it, so that the middleware
    closes its idle tracker and storage connections at shutdown (they stayed open to the end of
    the process, a ResourceWarning each under ``python -X dev``)."""
    client = Client(DOMAIN, lingering_mogile.trackers)
    client.store_content("closing.txt", b"served", cls="thumb")
    tracker_port, node_port = int(lingering_mogile.trackers[0].rsplit(":", 1)[1]), storage_port(client, "closing.txt")
    client.close()
    with with_settings(MOGILEFS_TRACKERS=lingering_mogile.trackers):
        middleware = wrap_asgi(get_asgi_application())

    def open_now() -> tuple[int, int]:
        return node_connections(tracker_port, os.getpid()), node_connections(node_port, os.getpid())

    async def lifespan() -> list[Any]:
        incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        outgoing: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        running = asyncio.create_task(middleware({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                                 incoming.get, outgoing.put))
        await incoming.put({"type": "lifespan.startup"})
        started = (await outgoing.get())["type"]
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/media/closing.txt", "raw_path": b"/media/closing.txt",
                 "query_string": b"", "root_path": "", "headers": [], "client": ("127.0.0.1", 50000)}
        await middleware(scope, asyncio.Event().wait, send)
        counts = [open_now()]
        await incoming.put({"type": "lifespan.shutdown"})
        ended = (await outgoing.get())["type"]
        await running
        await asyncio.sleep(0.1)  # the transports' closing callbacks
        return [started, b"".join(message.get("body", b"") for message in sent), *counts, ended, open_now()]

    assert asyncio.run(asyncio.wait_for(lifespan(), 10)) == [
        "lifespan.startup.complete", b"served", (1, 1), "lifespan.shutdown.complete", (0, 0)]


# -- configuration errors -----------------------------------------------------------------------


def _wrap() -> object:
    return wrap_wsgi(get_wsgi_application())


SETTINGS_ERRORS = [
    pytest.param("MOGILEFS_DOMAIN", MISSING, _wrap, id="domain-missing"),
    pytest.param("MOGILEFS_DOMAIN", "", _wrap, id="domain-empty"),
    pytest.param("MOGILEFS_DOMAIN", 42, lambda: MogileFSStorage().exists("a"), id="domain-not-text-storage"),
    # Read from a secrets file with its line break: every request was a 502.
    pytest.param("MOGILEFS_DOMAIN", "media\n", _wrap, id="domain-line-break"),
    pytest.param("MOGILEFS_DOMAIN", "media\n", lambda: MogileFSStorage().exists("a"), id="domain-line-break-storage"),
    pytest.param("MOGILEFS_TRACKERS", MISSING, _wrap, id="trackers-missing"),
    pytest.param("MOGILEFS_TRACKERS", [], _wrap, id="trackers-empty"),
    pytest.param("MOGILEFS_TRACKERS", ["127.0.0.1:port"], _wrap, id="trackers-bad-port"),
    pytest.param("MOGILEFS_TRACKERS", 7001, lambda: MogileFSStorage().exists("a"), id="trackers-number-storage"),
    pytest.param("MOGILEFS_MEDIA_URL", MISSING, _wrap, id="media-url-missing"),
    pytest.param("MOGILEFS_MEDIA_URL", "media/?v=2/", _wrap, id="media-url-query"),
    pytest.param("MOGILEFS_MEDIA_URL", "/media", lambda: MogileFSStorage().url("a"), id="media-url-no-slash-storage"),
    pytest.param("MOGILEFS_REPROXY", "apache", _wrap, id="reproxy-unknown"),
    pytest.param("SERVE_WITH_PERLBAL", "yes", _wrap, id="perlbal-not-bool"),
    pytest.param("SERVE_WITH_PERLBAL", 0, _wrap, id="perlbal-zero"),  # was taken for False
    pytest.param("SERVE_WITH_PERLBAL", "", _wrap, id="perlbal-empty"),
    pytest.param("MOGILEFS_TRUSTED_PROXIES", "10.0.0.0/8", _wrap, id="proxies-string"),
    pytest.param("MOGILEFS_TRUSTED_PROXIES", ["10.0.0.0/8", "proxy"], _wrap, id="proxies-bad-address"),
    pytest.param("MOGILEFS_CACHE_CONTROL", 3600, _wrap, id="cache-control-number"),
    pytest.param("MOGILEFS_PATH_CACHE_SECONDS", -1, _wrap, id="path-cache-negative"),
    pytest.param("MOGILEFS_PATH_CACHE_SECONDS", "60", _wrap, id="path-cache-string"),
    pytest.param("MOGILEFS_NGINX_LOCATION", "reproxy", _wrap, id="nginx-location-relative"),
    pytest.param("MOGILEFS_MIDDLEWARE_OPTIONS", ["stale_seconds"], _wrap, id="options-not-dict"),
    pytest.param("MOGILEFS_MIDDLEWARE_OPTIONS", [], _wrap, id="options-empty-list"),
    pytest.param("MOGILEFS_MIDDLEWARE_OPTIONS", {"no_such": 1}, _wrap, id="options-unknown"),
    pytest.param("MOGILEFS_MIDDLEWARE_OPTIONS", {"reproxy": "nginx"}, _wrap, id="options-own-setting"),
    pytest.param("MOGILEFS_MIDDLEWARE_OPTIONS", {"io_timeout": 3}, _wrap, id="options-client-timeout"),
    pytest.param("MOGILEFS_CLIENT_OPTIONS", {"timeout": 3}, _wrap, id="client-options-unknown"),
    pytest.param("MOGILEFS_CLIENT_OPTIONS", {"io_timeout": "3"}, lambda: MogileFSStorage().exists("a"),
                 id="client-options-string-storage"),
    pytest.param("MOGILEFS_SIGNING_KEY", "", _wrap, id="signing-key-empty"),
    pytest.param("MOGILEFS_SIGNING_KEY", 42, lambda: MogileFSStorage().url("a"), id="signing-key-number-storage"),
    pytest.param("MOGILEFS_URL_EXPIRES", -5, lambda: MogileFSStorage().url("a"), id="url-expires-negative"),
    pytest.param("MOGILEFS_URL_EXPIRES", 0, lambda: MogileFSStorage().url("a"), id="url-expires-zero"),
    pytest.param("MOGILEFS_URL_EXPIRES", 0, _wrap, id="url-expires-zero-at-start-up"),
    # Past the clocks: a bare ValueError from wrap_wsgi, or from every url() of a started site.
    pytest.param("MOGILEFS_URL_EXPIRES", float("inf"), lambda: MogileFSStorage().url("a"), id="url-expires-infinite"),
    pytest.param("MOGILEFS_CLIENT_OPTIONS", {"io_timeout": 1e10}, _wrap, id="client-io-timeout-past-the-clocks"),
    pytest.param("MOGILEFS_CLIENT_OPTIONS", {"dead_seconds": float("nan")}, _wrap, id="client-dead-seconds-nan"),
    pytest.param("MOGILEFS_PATH_CACHE_SECONDS", float("inf"), _wrap, id="path-cache-seconds-infinite"),
    pytest.param("MOGILEFS_CLIENT_OPTIONS", {"connect_timeout": 0}, _wrap, id="client-connect-timeout-zero"),
    pytest.param("MOGILEFS_CLIENT_OPTIONS", {"storage_timeout": 0}, lambda: MogileFSStorage().exists("a"),
                 id="client-storage-timeout-zero-storage"),
    pytest.param("MOGILEFS_MEDIA_URL", "https://media.example.com/", _wrap, id="media-url-at-the-root"),
    pytest.param("MOGILEFS_MIDDLEWARE_OPTIONS", {"retry_after_seconds": -1}, _wrap, id="middleware-option-value"),
    pytest.param("MOGILEFS_CACHE_CONTROL", "public\nmax-age=60", _wrap, id="cache-control-line-break"),
    pytest.param("MOGILEFS_CACHE_CONTROL", "max-age=60 # a minute", _wrap, id="cache-control-comment"),
    pytest.param("MOGILEFS_MEMCACHED_SERVERS", 11211, _wrap, id="memcached-number"),
    pytest.param("MOGILEFS_MEMCACHED_SECRET", "s3cret", _wrap, id="memcached-secret-without-servers"),
    pytest.param("MOGILEFS_MEMCACHED_PREFIX", "staging:", _wrap, id="memcached-prefix-without-servers"),
    pytest.param("MOGILEFS_MEMCACHED_SERVERS", ["127.0.0.1:port"], lambda: MogileFSStorage().exists("a"),
                 id="memcached-bad-port-storage"),
]


@pytest.mark.parametrize(("name", "value", "call"), SETTINGS_ERRORS)
def test_wrong_or_missing_setting(name: str, value: object, call: Callable[[], object]) -> None:
    with with_settings(**{name: value}), pytest.raises(ImproperlyConfigured, match=name):
        call()


@pytest.mark.parametrize(("name", "value", "call"), SETTINGS_ERRORS)
def test_manage_py_check_names_a_wrong_or_missing_setting(name: str, value: object, call: Callable[[], object]) -> None:
    """Before a deploy, where it was found at the first request or save."""
    with with_settings(**{name: value}), pytest.raises(SystemCheckError, match=re.escape(name)):
        call_command("check")


@pytest.mark.parametrize(("name", "value", "problem"), [
    ("MOGILEFS_MEMCACHED_PREFIX", "two words", "prefix 'two words' cannot start"),
    ("MOGILEFS_MEMCACHED_PREFIX", "", "expected a non-empty string"),
    # A template left unfilled: it was blamed on MOGILEFS_MEMCACHED_SERVERS.
    ("MOGILEFS_MEMCACHED_SECRET", "   ", "expected a non-empty string"),
    ("MOGILEFS_MEMCACHED_SECRET", ["new", " "], "expected a non-empty string"),
])
def test_a_memcached_setting_no_server_could_use_is_named(name: str, value: object, problem: str) -> None:
    with with_settings(MOGILEFS_MEMCACHED_SERVERS=["127.0.0.1:1"], **{name: value}):
        with pytest.raises(ImproperlyConfigured, match=f"{name}: {problem}"):
            _wrap()
        with pytest.raises(SystemCheckError, match=name):
            call_command("check")


def test_manage_py_check_passes_the_example_sites_settings() -> None:
    assert [message for message in run_checks() if message.id.startswith("mogile_middleware.")] == []


def test_manage_py_check_takes_what_wrap_asgi_alone_takes_and_warns_of_a_storage_it_cannot_import(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An async ``authorize`` (wrap_wsgi refuses it) was an error, and a storage whose module fails
    to import (django-storages' S3 without boto3, or a typo in the project's own) ended the check
    with a traceback."""
    async def authorize(scope: Any, key: str) -> bool:
        return True

    async def of_the_scope_alone(scope: Any) -> bool:
        return True

    (tmp_path / "broken_storage.py").write_text(
        "from django.core.exceptions import ImproperlyConfigured\nraise ImproperlyConfigured('boto3 is missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    other = {"BACKEND": "broken_storage.S3Storage"}

    def ours() -> list[Any]:
        return [message for message in run_checks() if message.id.startswith("mogile_middleware.")]

    private = {"MOGILEFS_CACHE_CONTROL": "private, max-age=3600"}  # authorize refuses the example site's public one
    with override_settings(MOGILEFS_MIDDLEWARE_OPTIONS={"authorize": authorize},
                           STORAGES={**settings.STORAGES, "s3": other}, **private):
        (warning,) = ours()
        assert (warning.id, warning.obj) == ("mogile_middleware.W001", "STORAGES['s3']")
        assert "boto3 is missing" in warning.msg
    with override_settings(MOGILEFS_MIDDLEWARE_OPTIONS={"authorize": of_the_scope_alone}, **private):
        (error,) = ours()  # each wrapper's own reason: an ASGI project's is not the WSGI one's
        assert error.id == "mogile_middleware.E001"
        assert "wrap_wsgi: " in error.msg and "wrap_asgi: " in error.msg and "of the request and the key" in error.msg


def test_manage_py_check_names_a_cache_control_that_would_share_authorized_files() -> None:
    def authorize(environ: Any, key: str) -> bool:
        return True

    with override_settings(MOGILEFS_MIDDLEWARE_OPTIONS={"authorize": authorize},
                           MOGILEFS_CACHE_CONTROL="public, max-age=3600"):
        (error,) = [message for message in run_checks() if message.id.startswith("mogile_middleware.")]
        assert error.id == "mogile_middleware.E001"
        assert error.msg.startswith("MOGILEFS_CACHE_CONTROL: cache_control 'public, max-age=3600' lets a shared cache")
    with override_settings(MOGILEFS_MIDDLEWARE_OPTIONS={"authorize": authorize},
                           MOGILEFS_CACHE_CONTROL="private, max-age=3600"):
        assert [message for message in run_checks() if message.id.startswith("mogile_middleware.")] == []


def test_manage_py_check_warns_of_a_mogilefs_storage_named_where_django_ignores_it() -> None:
    """Django 5.1 dropped ``DEFAULT_FILE_STORAGE``: a project migrating from django-storages that
    changed that line alone saved its files on the local disk, and the check said nothing."""
    if django.VERSION < (5, 1):  # the setting still works there (and may not be set beside STORAGES)
        pytest.skip("Django reads DEFAULT_FILE_STORAGE before 5.1")
    path = "mogile_middleware.contrib.django.MogileFSStorage"
    with override_settings(DEFAULT_FILE_STORAGE=path):
        (warning,) = [message for message in run_checks() if message.id.startswith("mogile_middleware.")]
    assert (warning.id, warning.obj, warning.level) == ("mogile_middleware.W002", "DEFAULT_FILE_STORAGE", WARNING)
    assert warning.msg.startswith(f"DEFAULT_FILE_STORAGE names {path}, but Django ")
    assert "STORAGES['default']" in warning.hint
    with override_settings(DEFAULT_FILE_STORAGE="django.core.files.storage.FileSystemStorage"):  # not ours to say
        assert [message for message in run_checks() if message.id.startswith("mogile_middleware.")] == []
    old = "storages.backends.mogile.MogileFSStorage"  # the old backend, kept: files went to the disk, unsaid
    with override_settings(DEFAULT_FILE_STORAGE=old):
        (warning,) = [message for message in run_checks() if message.id.startswith("mogile_middleware.")]
    assert warning.msg.startswith(f"DEFAULT_FILE_STORAGE names {old}, but Django ")
    assert warning.hint.startswith(f"name {{'BACKEND': {path!r}}} as STORAGES['default']")


STORAGE_OPTION_ERRORS = [
    pytest.param({"bucket": "media"}, "'bucket'", id="unknown"),
    pytest.param({"mogile_class": ""}, "'mogile_class'", id="class-empty"),
    pytest.param({"domain": 5}, "'domain'", id="domain-number"),
    pytest.param({"trackers": "tracker:port"}, "'trackers'", id="trackers-bad"),
    pytest.param({"media_url": "media"}, "'media_url'", id="media-url-no-slash"),
    pytest.param({"allow_overwrite": "yes"}, "'allow_overwrite'", id="overwrite-not-bool"),
]


@pytest.mark.parametrize(("options", "named"), STORAGE_OPTION_ERRORS)
def test_wrong_storage_option(options: dict[str, object], named: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=named):
        MogileFSStorage(**options)
    thumbs = {"BACKEND": "gallery.storage.AvatarStorage", "OPTIONS": options}  # a subclass too
    with override_settings(STORAGES={**settings.STORAGES, "thumbs": thumbs}), \
            pytest.raises(SystemCheckError, match=re.escape("STORAGES['thumbs']") + ".*" + named):
        call_command("check")


def test_a_child_forked_while_a_thread_gets_the_shared_client_can_get_it(mogile: DevMogileFS) -> None:
    assert children_failing(holding(clients._lock), get_client) == 0


def test_a_file_a_view_served_is_not_kept_by_djangos_cache_for_the_next_client(mogile: DevMogileFS) -> None:
    """serve()'s response went through the view's cache_page before the middleware made it private:
    kept, it was answered to the next client whatever its API key (the view never ran), and by
    another worker as an empty 200 (the serve header of another process is dropped)."""
    from integration._django_cached_urls import API_KEY

    MogileFSStorage().save("reports/q3.pdf", ContentFile(b"%PDF q3"))
    cache = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "cached-views"}}
    with with_settings(ROOT_URLCONF="integration._django_cached_urls", CACHES=cache):
        app = TestApp(wrap_wsgi(get_wsgi_application()))
        assert app.get("/token/reports/q3.pdf", headers={"X-Api-Key": API_KEY}).body == b"%PDF q3"
        assert app.get("/token/reports/q3.pdf", headers={"X-Api-Key": "guess"}, status=403).body == b"no such key\n"


@overwriting
@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_a_storage_listing_the_trackers_otherwise_drops_the_paths_the_middleware_cached(
        lingering_mogile: DevMogileFS, flavour: str) -> None:
    """A storage whose ``trackers`` are some of MOGILEFS_TRACKERS, or the same in another order,
    links its files under MOGILEFS_MEDIA_URL, and has a shared client of its own: the middleware
    heard of its saves only when its paths expired (a file saved after a 404 stayed one, an
    overwritten one kept its old bytes)."""
    tracker = lingering_mogile.trackers[0]
    with with_settings(MOGILEFS_TRACKERS=[tracker, "127.0.0.1:1"]):
        if flavour == "wsgi":
            app = TestApp(wrap_wsgi(get_wsgi_application()))
            get = lambda path: app.get(path, expect_errors=True).body  # noqa: E731
        else:
            middleware = wrap_asgi(get_asgi_application())
            get = lambda path: asgi_get(middleware, path)[2]  # noqa: E731
        storage = MogileFSStorage(trackers=[tracker], allow_overwrite=True)
        url = storage.url("notes/today.txt")
        assert b"404" in get(url)
        storage.save("notes/today.txt", ContentFile(b"first"))
        assert get(url) == b"first"
        storage.save("notes/today.txt", ContentFile(b"second"))
        assert get(url) == b"second"


def test_the_memcached_secret_may_be_several_the_first_signing(mogile: DevMogileFS) -> None:
    from mogile_middleware.memcache import MemcachedBackend

    with with_settings(MOGILEFS_MEMCACHED_SERVERS=["127.0.0.1:1"], MOGILEFS_MEMCACHED_SECRET=["new", "old"]):
        backend = get_client().cache_backend
    old = MemcachedBackend("127.0.0.1:1", secret="old")
    assert backend._decode("k", old._encode("k", None, 1.0)) == (None, 1.0)
    assert backend._signature(b"x") == MemcachedBackend("127.0.0.1:1", secret="new")._signature(b"x")
