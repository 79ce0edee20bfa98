"""``MogileFSStorage``: a Django file storage keeping each file as a key of a MogileFS class."""

from __future__ import annotations

import email.utils
import io
import logging
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, NoReturn
from urllib.parse import quote

import django
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, SuspiciousFileOperation
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import Storage
from django.core.files.uploadedfile import InMemoryUploadedFile
from django.core.files.utils import FileProxyMixin
from django.urls import get_script_prefix
from django.utils.deconstruct import deconstructible

from ...client import Client
from ...exceptions import (BadKeyError, KeyExistsError, MogileFSError, OutcomeUnknownError, StorageError,
                           TrackerError, UnknownKeyError, UploadError, UploadOutcomeUnknownError)
from ...protocol import (MAX_KEY_BYTES, check_key, check_linked_path, check_url_key, has_control_character,
                         local_link)
from ...storage import SeekableBody, open_replica
from ...signing import URLSigner
from ...tracker import Address
from ...upload import Uploader, may_have_stored
from . import conf
from .clients import as_dns_compares, get_client, get_uploader

log = logging.getLogger("mogile_middleware")

#: Where a save uploads before renaming to its name: ``TEMPORARY_PREFIX`` + 32 hex digits, so
#: that a name of any allowed length still has a temporary key.
TEMPORARY_PREFIX = ".mogile-upload/"

#: What a name's URL leaves unescaped, as Django's ``filepath_to_uri``, which also turns backslashes
#: into slashes: in a key, a backslash is a character of its name.
_URI_SAFE = "/~!*()'"

#: How long a save whose ``create_close`` answer was lost looks for its temporary key.
_LOST_CLOSE_SECONDS = 5.0
#: Uploads of a save with ``allow_overwrite`` at most (see :meth:`MogileFSStorage._overwrite`).
_OVERWRITE_ATTEMPTS = 3
#: How many renames of a save may lose their answer, not carried out, before the save fails.
_RENAMES_WITHOUT_ANSWER = 2
#: How many times in a row a save takes ``get_available_name``'s offer of the name it found taken:
#: one freed meanwhile (another request deleted it) is free when asked again, while a
#: ``get_available_name`` that keeps offering a taken name would make the save loop forever.
_TAKEN_NAME_OFFERS = 10

#: The ``max_length`` of the save in progress, for the name taken instead of one found taken.
_max_length: ContextVar[int | None] = ContextVar("max_length", default=None)
#: Held while a save checks a name and renames onto it, so that the threads of a process never
#: race for one: one per process, made on first use (see :func:`_renaming`).
_renaming_locks: dict[int, threading.Lock] = {}


def _renaming() -> threading.Lock:
    """This process's lock for renames onto a name. Made on first use, not at import: under
    gunicorn ``--preload`` a gevent worker patches after the import, so a lock made then would be
    the thread's, and a save waiting for the tracker under it would stop the whole worker."""
    return _renaming_locks.setdefault(os.getpid(), threading.Lock())


#: Django's own ``chunks()``, which read the file from its start: a file read so may be read again.
_READING_CHUNKS = (File.chunks, InMemoryUploadedFile.chunks)
#: What an upload calls on a file given whole, which must be Django's, passed to the file it holds.
_PROXIED_METHODS = ("read", "readinto", "seek", "tell", "seekable")


def _given_again(content: File) -> bool:
    """Whether ``content`` gives its bytes whole again: a seekable file read by Django's own
    ``chunks()``, which start from its start (bytes or text, whatever its ``read()``)."""
    try:
        return type(content).chunks in _READING_CHUNKS and bool(content.seekable())
    except (AttributeError, OSError, ValueError):  # a file object with read() alone; a closed one
        return False


def _source_of(content: File) -> File | Iterator[bytes]:
    """``content`` itself, from its start, when it is a seekable file of bytes read by Django's own
    ``chunks()`` and methods (an uploaded file, in memory or spooled to disk, a ``ContentFile``, a
    ``File`` over an open file): an upload sends it again to the next storage node when one drops
    it midway. Else its chunks (a ``chunks()`` or ``read()`` of its own decides what is stored),
    text ones as UTF-8: Django's ``ContentFile`` holds either, and its own storages take both."""
    kind = type(content)
    try:
        if _given_again(content) \
                and all(getattr(kind, name, None) is getattr(FileProxyMixin, name) for name in _PROXIED_METHODS) \
                and isinstance(content.read(0), bytes):
            content.seek(0)  # as chunks() reads it
            return content
    except (AttributeError, OSError, ValueError):  # a file object with read() alone, as chunks() takes it
        pass
    return (chunk.encode("utf-8") if isinstance(chunk, str) else chunk for chunk in content.chunks())


def _http_date_seconds(stamp: str | None) -> float | None:
    """The time an HTTP date (a ``Last-Modified``) names, or ``None`` for none or a malformed one."""
    try:
        return email.utils.parsedate_to_datetime(stamp or "").timestamp()
    except (TypeError, ValueError):
        return None


def _normalised(name: str) -> str:
    """``name`` without empty and ``.`` directories; an absolute name, ``..`` and the file name
    itself are left for Django to judge."""
    if name.startswith("/") or ("//" not in name and "./" not in name):
        return name
    *directories, file_name = name.split("/")
    return "/".join([*(part for part in directories if part not in ("", ".")), file_name])


def _keys_start(location: object) -> str:
    """``location`` as the start of its keys: ``"static/"`` for ``"static"`` (or ``"/static/"``),
    ``""`` for ``""``; a ``ValueError`` for one that no URL links to, or that leaves no key room."""
    if not isinstance(location, str):
        raise TypeError(f"expected a string, got {location!r}")
    directory = location.strip("/")
    if not directory:
        return ""
    if "" in directory.split("/"):
        raise ValueError(f"expected a directory of keys such as 'static', without empty parts, got {location!r}")
    if (directory + "/").startswith(TEMPORARY_PREFIX):
        raise ValueError(f"{TEMPORARY_PREFIX!r} holds the saves in progress, not a storage's files")
    check_linked_path(check_url_key(directory))  # its errors name the location as given
    if len(directory.encode()) + len("/x") > MAX_KEY_BYTES:
        raise ValueError(f"{location!r} leaves no room for a file name in a key of {MAX_KEY_BYTES} bytes at most")
    return directory + "/"


@contextmanager
def _checked_key() -> Iterator[None]:
    """Report a name MogileFS cannot hold as a key the way Django reports unsafe file names."""
    try:
        yield
    except BadKeyError as error:
        raise SuspiciousFileOperation(str(error)) from error


@deconstructible(path="mogile_middleware.contrib.django.MogileFSStorage")
class MogileFSStorage(Storage):
    """Files stored in MogileFS, each name a key of the storage's class, served at ``media_url``.

    As in the classic django-storages backend the class belongs to the storage: set
    ``mogile_class`` on a subclass, or give it as an option (``STORAGES``' ``OPTIONS``).
    ``domain``, ``trackers`` and ``media_url`` default to the ``MOGILEFS_*`` settings, read at
    each call. ``location`` keeps the storage's names under a directory of keys (``static``: the
    name ``app.js`` is the key ``static/app.js``), as ``FileSystemStorage``'s keeps them under a
    directory: without one, the storage's root is the whole domain. ``allow_overwrite`` reuses a
    taken name (the key gets the new data) instead of Django's suffixing, as ``FileSystemStorage``
    does; without it a save never replaces a file, not even one saved under the same name at the
    same moment.
    """

    mogile_class: str | None = None

    def __init__(
        self,
        *,
        mogile_class: str | None = None,
        domain: str | None = None,
        trackers: str | list[str] | None = None,
        media_url: str | None = None,
        location: str | None = None,
        allow_overwrite: bool = False,
        **unknown: Any,
    ) -> None:
        name = type(self).__name__
        if unknown:
            raise ImproperlyConfigured(f"{name} has no option {', '.join(map(repr, sorted(unknown)))}")

        def option(key: str, value: Any, check: Callable[[Any], Any]) -> Any:
            return None if value is None else conf.validated(f"{name} option {key!r}", value, check)

        if mogile_class is not None:
            self.mogile_class = option("mogile_class", mogile_class, conf.text)
        self._domain: str | None = option("domain", domain, conf.text)
        self._trackers: tuple[Address, ...] | None = option("trackers", trackers, conf.tracker_addresses)
        self._media_url: str | None = option("media_url", media_url, conf.folder_url)
        #: The keys' start: the location and a slash, or nothing.
        self._keys_start: str = option("location", location, _keys_start) or ""
        self.allow_overwrite: bool = option("allow_overwrite", allow_overwrite, conf.flag)
        # Django before 5.1 never asks is_name_available: suffixing the same name would loop forever.
        if self.allow_overwrite and django.VERSION < (5, 1):
            raise ImproperlyConfigured(f"{name} option 'allow_overwrite' needs Django 5.1 or newer")

    @property
    def client(self) -> Client:
        """The process's shared client for this storage's domain and trackers."""
        return get_client(self._domain, self._trackers)

    @property
    def _uploader(self) -> Uploader:
        return get_uploader(self._domain, self._trackers)

    def save(self, name: str | None, content: Any, max_length: int | None = None) -> str:
        """Django's save, with ``max_length`` kept for :meth:`_save`, which Django does not give it;
        ``content`` may also be bytes or text, as the old MogileFS backend's ``save(name, raw_contents)``
        took it (Django's ``File`` of them failed with an ``AttributeError``: no ``read``)."""
        if isinstance(content, (bytes, bytearray, memoryview, str)):
            content = ContentFile(content if isinstance(content, str) else bytes(content))
        token = _max_length.set(max_length)
        try:
            return super().save(name, content, max_length=max_length)
        finally:
            _max_length.reset(token)

    def _save(self, name: str, content: File) -> str:
        """Stream ``content`` into the key ``name`` of the storage's class; return the name used.

        Without ``allow_overwrite`` the upload goes to a temporary key, renamed to ``name`` only if
        nobody took it since Django checked (else to the next available name), so that concurrent
        saves of one name all keep their files. The temporary key is deleted on any failure that
        may have left it (a warning names it when the trackers cannot delete it either); a failed
        upload's error names the file saved.
        """
        with _checked_key():
            # Before uploading, not at the rename; a name that is not UTF-8 is never served.
            check_url_key(self._key(name))
            if has_control_character(name):  # stored, but never served: the middleware answers 400
                raise SuspiciousFileOperation(f"the file name {name!r} holds control characters")
            # Listed by no listdir(), and deleted as a save left behind: trackers may list keys by a
            # prefix whatever its case (mogilefsd on SQLite, the development one), so any case.
            if self._key(name).lower().startswith(TEMPORARY_PREFIX):
                raise SuspiciousFileOperation(f"the file name {name!r} is under {TEMPORARY_PREFIX!r}, "
                                              f"which holds the saves in progress")
            if self.allow_overwrite:
                self._overwrite(name, content)
                return name
            temporary = TEMPORARY_PREFIX + uuid.uuid4().hex
            try:
                self._uploader.upload(temporary, _source_of(content), self.mogile_class)
            except UploadOutcomeUnknownError as error:
                if not self._stored_after_all(temporary):
                    self._failed(name, temporary, error)
            except BaseException as error:
                self._failed(name, temporary, error)
            try:
                return self._rename_to_available(temporary, name)
            except BaseException:
                self._delete_temporary(temporary)
                raise

    def _overwrite(self, name: str, content: File) -> None:
        """Upload ``content`` to the key ``name``, over its file. Of two saves of one key closing at
        once, mogilefsd 2.73 fails one (``ERR failure``: both drop the old file, and the second drop
        is refused), the key holding the other's: content that gives itself whole again
        (:func:`_given_again`) is uploaded again, :data:`_OVERWRITE_ATTEMPTS` times in all, so
        that each save either stores its own or raises."""
        for attempt in range(1, _OVERWRITE_ATTEMPTS + 1):
            try:
                self._uploader.upload(self._key(name), _source_of(content), self.mogile_class)
                return
            except UploadError as error:
                refused = error.__cause__
                if attempt == _OVERWRITE_ATTEMPTS or not _given_again(content) \
                        or not (isinstance(refused, TrackerError) and refused.code == "failure"):
                    raise

    def _stored_after_all(self, temporary: str) -> bool:
        """Whether the upload to ``temporary`` whose ``create_close`` answer was lost was carried
        out: the key is this save's alone, there only if it was. mogilefsd 2.73 may carry it out a
        moment later (the query worker it kills for another request's stray reply, as a rename
        onto a taken key sends one, finishes its request first), so it is asked for up to
        :data:`_LOST_CLOSE_SECONDS`; False also when the trackers cannot say."""
        deadline = time.monotonic() + _LOST_CLOSE_SECONDS
        pause = 0.1
        while True:
            try:
                self.client.file_info(temporary)
                return True
            except UnknownKeyError:
                if time.monotonic() + pause > deadline:
                    return False
                time.sleep(pause)
                pause = min(2 * pause, 1.0)
            except MogileFSError:
                return False

    def _failed(self, name: str, temporary: str, error: BaseException) -> NoReturn:
        """Raise the error of the failed upload of the save of ``name`` to ``temporary``, naming the
        file, once the temporary key is deleted if the upload may have stored it."""
        if may_have_stored(error):
            self._delete_temporary(temporary)
        if isinstance(error, UploadError):  # the same error and cause (a TrackerError's code...), naming the file
            renamed = type(error)(f"save of {name!r} failed: {error}")
            renamed.__dict__.update(error.__dict__)
            raise renamed.with_traceback(error.__traceback__) from error.__cause__
        raise error

    def _rename_to_available(self, temporary: str, name: str) -> str:
        """Rename ``temporary`` to ``name``, or to the next available name while the one tried is
        taken. A rename whose answer was lost is told by whether ``temporary`` is still there, and
        one carried out late (after that) by the name that holds the temporary key's fid."""
        candidate, unanswered, fid, offered_again = name, [], 0, 0
        while True:
            # Asked again: the name may have been taken during the upload, and mogilefsd 2.73 answers a
            # rename onto a taken key twice, which costs some other request its tracker connection.
            with _renaming():
                if not self.exists(candidate):
                    try:
                        self.client.rename(temporary, self._key(candidate))
                        return candidate
                    except KeyExistsError:
                        pass  # taken by another process between the two requests
                    except UnknownKeyError:
                        if not unanswered:
                            raise
                        return self._renamed_late(unanswered, fid, name)
                    except OutcomeUnknownError as error:
                        left = self._fid_left(temporary, candidate, error)
                        if left is None:  # carried out: this rename, or one whose answer was lost before
                            return self._renamed_late([*unanswered, candidate], fid, name) if unanswered else candidate
                        fid = left
                        unanswered.append(candidate)
                        if len(unanswered) > _RENAMES_WITHOUT_ANSWER:
                            raise UploadError(f"save of {name!r} failed: the answers to {len(unanswered)} renames "
                                              f"were lost, none carried out") from error
                        continue  # not carried out: the name is asked about again
            taken, candidate = candidate, self.get_available_name(name, max_length=_max_length.get())
            offered_again = offered_again + 1 if candidate == taken else 0
            if offered_again > _TAKEN_NAME_OFFERS:
                raise FileExistsError(f"MogileFS key {taken!r} is taken and no other name is available")

    def _fid_left(self, temporary: str, candidate: str, lost: OutcomeUnknownError) -> int | None:
        """The fid of ``temporary`` if a rename of it to ``candidate`` whose answer was ``lost`` left
        it there, else None: the rename was carried out (no one else renames a temporary key).
        Raises if the trackers cannot say."""
        try:
            return self.client.file_info(temporary).fid
        except UnknownKeyError:
            return None
        except MogileFSError as error:
            raise UploadOutcomeUnknownError(
                f"save of {candidate!r}: the answer to its rename was lost ({lost}) and the trackers cannot "
                f"say whether it was carried out ({error}): the key may hold the file") from error

    def _renamed_late(self, unanswered: list[str], fid: int, name: str) -> str:
        """The name, of those whose rename's answer was lost, that the temporary key (``fid``) went
        to: a rename carried out after the key was found still there (a tracker slow with it)."""
        for candidate in unanswered:
            with suppress(UnknownKeyError):
                if self.client.file_info(self._key(candidate)).fid == fid:
                    return candidate
        raise UploadError(f"save of {name!r} failed: its temporary key went while the answers to its renames "
                          f"were lost, to none of {unanswered!r}")

    def _delete_temporary(self, key: str) -> None:
        """Delete a save's temporary key; one never written (or already renamed) is not an error."""
        try:
            self.client.delete(key)
        except UnknownKeyError:
            pass
        except MogileFSError as error:
            log.warning("could not delete the temporary key %r of a failed save: %r; once the trackers answer, "
                        "delete it with: mogile-middleware rm %s", key, error, key)

    def _key(self, name: str) -> str:
        """The key of the name ``name``: under the storage's ``location``."""
        if not isinstance(name, str):  # a Django name is text (the client takes bytes too)
            raise TypeError(f"a key is a str, not {type(name).__name__}")
        return self._keys_start + name

    def _open(self, name: str, mode: str = "rb") -> File:
        """A read-only file streamed from the first replica that answers, seekable (see :class:`MogileFSFile`)."""
        return MogileFSFile(self, name, mode)

    def _read(self, name: str, mode: str) -> SeekableBody:
        """The body of the key ``name``, streamed from the first replica that answers of the
        length the tracker records (one cut short on its disk is passed over, as ``get`` does)."""
        if mode != "rb":
            raise ValueError(f"MogileFS files are opened with mode 'rb' only, not {mode!r}")
        with _checked_key():
            try:
                paths, info = self.client.current_version(self._key(name))
            except UnknownKeyError:
                raise FileNotFoundError(f"no MogileFS key {name!r}") from None
            return SeekableBody(paths, length=info.length, timeout=self.client.storage_timeout)

    def get_modified_time(self, name: str) -> datetime:
        """When the file was stored: the earliest ``Last-Modified`` of its replicas (a ``HEAD`` of
        each), as mogilefsd copies a file to its other devices later (a second later, or months
        later when a device failed), each copy dated when it was made. ``collectstatic`` then
        passes over the files that did not change, as on disk (it deleted and stored every file
        anew, each missing meanwhile: a 404), and not over one changed since its upload.
        ``NotImplementedError`` when no storage node tells a time, an ``OSError`` when no replica
        answers (``collectstatic`` then stores the file again)."""
        with _checked_key():
            try:
                paths, info = self.client.current_version(self._key(name))
            except UnknownKeyError:
                raise FileNotFoundError(f"no MogileFS key {name!r}") from None
        stamps: list[str | None] = []
        error: StorageError | None = None
        for path in paths:
            try:
                with open_replica([path], method="HEAD", size=info.length,
                                  timeout=self.client.storage_timeout) as replica:
                    stamps.append(replica.headers.get("last-modified"))
            except StorageError as failure:
                error = failure
        if not stamps:
            raise OSError(f"no replica of {name!r} told its time: {error}") from error
        seconds = [when for stamp in stamps if (when := _http_date_seconds(stamp)) is not None]
        if not seconds:
            raise NotImplementedError(f"the storage nodes told no time for {name!r}: {stamps!r}")
        return datetime.fromtimestamp(min(seconds), tz=timezone.utc if settings.USE_TZ else None)

    def get_created_time(self, name: str) -> datetime:
        """:meth:`get_modified_time`: a file is never changed once stored (storing its name again
        stores a new file), so it was created when it was stored."""
        return self.get_modified_time(name)

    def exists(self, name: str) -> bool:
        """True if the key exists, or keys are under ``name`` (a directory :meth:`listdir` lists, its
        final slash given or not), or for the root ``""``, as ``FileSystemStorage`` answers:
        ``collectstatic --clear`` clears only what exists. False for a name longer than any key,
        so that Django's ``get_available_name`` shortens it to the field's ``max_length``, as for
        files on disk."""
        if name == "":
            return True
        key = self._key(name)
        with _checked_key():
            length = len(check_key(key, length=False))
            if length > MAX_KEY_BYTES:
                return False
            try:
                self.client.file_info(key)
            except UnknownKeyError:
                slash = "" if key.endswith("/") else "/"
                return length + len(slash) <= MAX_KEY_BYTES and self._holds_keys(key + slash)
        return True

    def _holds_keys(self, directory: str) -> bool:
        """Whether a key starts with ``directory`` (ending with a slash): the first key listed
        answers, so a miss costs one ``list_keys``."""
        return next(self.client.keys(directory), None) is not None

    def delete(self, name: str) -> None:
        """Delete the key; a name that does not exist is not an error, as in Django's storages."""
        with _checked_key(), suppress(UnknownKeyError):
            self.client.delete(self._key(name))

    def size(self, name: str) -> int:
        """The file's length in bytes, from the tracker."""
        with _checked_key():
            try:
                return self.client.file_info(self._key(name)).length
            except UnknownKeyError:
                raise FileNotFoundError(f"no MogileFS key {name!r}") from None

    def url(self, name: str | None) -> str:
        """The media URL followed by the name, percent-encoded as UTF-8 (``SuspiciousFileOperation``
        for a name no URL names, as the middleware's); with ``MOGILEFS_SIGNING_KEY``, signed for
        ``MOGILEFS_URL_EXPIRES`` seconds (as django-storages' S3 ``querystring_auth``)."""
        media_url = self._served_media_url()
        if conf.script_relative(media_url):  # as Django's relative MEDIA_URL: below the request's script prefix
            media_url = get_script_prefix() + media_url
        with _checked_key():
            # None: the media URL, as FileSystemStorage gives; a name of another client's with a
            # "." or ".." segment is linked by no URL (Django's own names never have one). A key is
            # named as it is: a backslash or a leading slash (another client's) is part of it.
            key = check_linked_path(check_url_key(self._key(name))) if name else ""
        link = media_url + quote(key or self._keys_start, safe=_URI_SAFE)
        if not media_url.startswith("//"):  # a media URL of "/": a key "/host/x" must not name a host
            link = local_link(link)
        secrets, expires_in = conf.signing_key(), conf.url_expires()  # both checked, even when unsigned
        if secrets is None or not key:
            return link
        return f"{link}?{URLSigner(secrets, self._domain or conf.domain()).query(key, expires_in)}"

    def _served_media_url(self) -> str:
        """The storage's ``media_url``, else ``MOGILEFS_MEDIA_URL``, which the wrapped application
        serves from ``MOGILEFS_DOMAIN`` on ``MOGILEFS_TRACKERS`` only: a link there to a key of
        another domain, or of a MogileFS with none of those trackers, would be wrong."""
        if self._media_url is not None:
            return self._media_url
        if self._domain is not None and self._domain != conf.domain():
            elsewhere = f"of domain {self._domain!r}"
        elif self._trackers is not None and as_dns_compares(self._trackers).isdisjoint(as_dns_compares(conf.trackers())):
            elsewhere = "with none of MOGILEFS_TRACKERS among its trackers"
        else:
            return conf.media_url()
        raise ImproperlyConfigured(
            f"{type(self).__name__} {elsewhere} has no 'media_url' option: MOGILEFS_MEDIA_URL serves "
            f"MOGILEFS_DOMAIN ({conf.domain()!r}) from MOGILEFS_TRACKERS; give the storage its own media_url, "
            "served by a middleware of its domain and trackers")

    def listdir(self, path: str) -> tuple[list[str], list[str]]:
        """The "directories" and files right under ``path``: MogileFS has flat keys, so every key
        under the prefix is listed, and the parts between slashes play the directories. The root
        hides the saves in progress (``TEMPORARY_PREFIX``), which ``collectstatic --clear`` would delete.
        A key with an empty part (``css//a.css``, ``/a.css``, ``css/``) is left out: no saved name
        is one, and ``""`` for a directory sent ``collectstatic --clear`` round the same one for ever.
        ``path`` is read as ``FileSystemStorage`` reads it: ``./a`` and ``a//b`` are ``a`` and ``a/b``,
        and one above the root is refused."""
        directory = posixpath.normpath(path.strip("/") or ".")
        if directory == ".." or directory.startswith("../"):
            raise SuspiciousFileOperation(f"{path!r} is outside the storage")
        prefix = self._keys_start + ("" if directory == "." else directory + "/")
        directories: set[str] = set()
        files: list[str] = []
        for key in self.client.keys(prefix):
            head, slash, _ = key[len(prefix):].partition("/")
            if not head:
                continue
            if slash:
                directories.add(head)
            else:
                files.append(head)
        if not prefix:  # the domain's root
            directories.discard(TEMPORARY_PREFIX.rstrip("/"))
        return sorted(directories), files

    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        """Django's, for the name normalised as ``FileSystemStorage`` saves it (``a//b/./c.txt`` as
        ``a/b/c.txt``: a browser or proxy would normalise the URL of the other key and miss it), and
        shortened to fit a key as well when ``max_length`` lets Django shorten it: a field's
        ``max_length`` counts characters, and 100 of them may be 400 bytes of UTF-8."""
        # Every save's name passes here, a content's name too; backslashes are slashes, as Django reads them.
        name = _normalised(str(name).replace("\\", "/"))
        available = super().get_available_name(name, max_length=max_length)
        while max_length is not None:
            with _checked_key():
                excess = len(check_key(self._key(available), length=False)) - MAX_KEY_BYTES
            if excess <= 0:
                break
            max_length = len(available) - -(-excess // 4)  # a character is 4 bytes at most: shorter each time
            if max_length < 1:  # Django takes 0 for no limit
                raise SuspiciousFileOperation(f"no name of {name!r} fits a MogileFS key")
            available = super().get_available_name(name, max_length=max_length)
        return available

    def is_name_available(self, name: str, max_length: int | None = None) -> bool:
        """With ``allow_overwrite`` every name that fits is available, as in ``FileSystemStorage``."""
        if self.allow_overwrite:
            return not (max_length and len(name) > max_length)
        return super().is_name_available(name, max_length=max_length)

    def get_alternative_name(self, file_root: str, file_ext: str) -> str:
        """With ``allow_overwrite`` the name is kept (only shortened to fit), as in ``FileSystemStorage``."""
        if self.allow_overwrite:
            return f"{file_root}{file_ext}"
        return super().get_alternative_name(file_root, file_ext)


class MogileFSFile(File):
    """A key's file as :meth:`MogileFSStorage.open` gives it: read-only, streamed, and seekable,
    as Django's ``ImageField`` (``width``) and Pillow use files: a seek elsewhere than where the
    transfer is opens a replica again from there (a ``Range``). A ``read(n)`` gives ``n`` bytes
    unless the file ends first, as a file on disk does. Opening it again reads the key again
    (Django's ``File`` would open a local file of the same name)."""

    def __init__(self, storage: MogileFSStorage, name: str, mode: str = "rb") -> None:
        self._storage = storage
        super().__init__(None, name)
        self.open(mode)

    def open(self, mode: str | None = None, *args: Any, **kwargs: Any) -> MogileFSFile:
        body = self._storage._read(self.name, mode or "rb")
        if self.file is not None:
            self.file.close()
        self.file = io.BufferedReader(body)  # reads of the size asked for, not of what one recv brought
        self.size = body.length  # known from the headers: File would otherwise seek to measure
        return self
