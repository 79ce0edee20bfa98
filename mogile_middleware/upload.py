"""Writing a key: ``create_open``, a streaming PUT to a storage node, ``create_close``.

The key points at the new data only after the storage node has taken the whole body and the
tracker has checked its size (and MD5 checksum, when asked): a failure at any step raises
:class:`UploadError` and leaves the key as it was, except that a lost answer to ``create_close``
raises :class:`UploadOutcomeUnknownError`, and a ``create_close`` failing inside mogilefsd may
have dropped the key's old version (the error says so). :class:`Uploader` is the helper for
applications: any source, a class per key, checksums verified where the class keeps them.

Example::

    uploader = Uploader(client)
    uploader.upload("avatars/42.png", "/tmp/upload.png", cls="avatar")
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Protocol, TypeVar, Union

from . import metrics
from .exceptions import (
    MogileFSError,
    OutcomeUnknownError,
    ProtocolError,
    StorageError,
    TrackerError,
    UploadError,
    UploadOutcomeUnknownError,
    named_errors,
)
from .forking import new_lock_in_child
from .protocol import ArgValue, Reply, check_key, parse_domains
from .storage import CHUNK_SIZE, LengthMismatchError, PutStream, byte_view
from .tracker import TrackerPool

#: What :meth:`Uploader.upload` stores: bytes, a path, a binary file object or chunks of bytes.
Source = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", BinaryIO, Iterable[bytes]]
#: What an upload sends as it is.
BYTES_LIKE = (bytes, bytearray, memoryview)

#: Called with the number of bytes sent so far.
Progress = Callable[[int], None]

#: Called with a key that now points, or may point, at new data (for the asyncio client, it may be
#: a coroutine function).
ChangeListener = Callable[[str], Union[None, Awaitable[None]]]

log = logging.getLogger("mogile_middleware")

#: What :meth:`NewFile.write_from` reads at a time: large enough that handing each piece to the
#: hashing thread costs little beside hashing and sending it, small enough to keep memory flat.
READ_SIZE = 1024 * 1024

#: How long :class:`Uploader` trusts what it learned of a class's checksums (``mogadm class
#: modify --hashtype`` may change it).
CLASSES_SECONDS = 300.0

_hasher: tuple[int, ThreadPoolExecutor] | None = None
_hasher_lock = threading.Lock()
new_lock_in_child(globals(), "_hasher_lock")


def hasher() -> ThreadPoolExecutor:
    """The threads that compute MD5 checksums while uploads send (hashlib releases the GIL on
    large buffers); made again in a forked child, where the parent's threads do not exist."""
    global _hasher
    with _hasher_lock:
        if _hasher is None or _hasher[0] != os.getpid():
            _hasher = os.getpid(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                      thread_name_prefix="mogilefs-md5")
        return _hasher[1]


def create_open_args(domain: str, key: str, cls: str | None, size: int | None) -> dict[str, ArgValue]:
    """The arguments of ``create_open`` for ``key``, asking for every destination (``multi_dest``).
    The ``default`` class (which ``file_info`` names) is asked for by no class: mogilefsd 2.73
    refuses it by name."""
    return {"domain": domain, "key": key, "class": None if cls == "default" else cls, "multi_dest": 1, "size": size}


@contextlib.contextmanager
def opening(args: dict[str, ArgValue], domain: str) -> Iterator[None]:
    """Around ``create_open`` with ``args`` and the reading of its reply: its tracker errors named,
    and a refusal (no device to write to, an unknown class, no tracker answering, a reply without
    a destination) counted as a failed upload of no bytes."""
    try:
        with named_errors(args, domain):
            yield
    except MogileFSError:
        metrics.recorder.upload("failed", 0)
        raise


def opened_file(reply: Reply) -> tuple[str, list[tuple[str, str]]]:
    """The fid of a ``create_open`` reply and its ``(devid, path)`` destinations, with or without
    ``multi_dest``."""
    if "dev_count" in reply:
        targets = [(reply[f"devid_{n}"], reply[f"path_{n}"]) for n in range(1, reply.number("dev_count") + 1)]
    else:
        targets = [(reply["devid"], reply["path"])]
    return reply["fid"], targets


def create_close_args(domain: str, key: str, fid: str, destination: tuple[str, str], size: int,
                      md5: str | None, verify_checksum: bool) -> dict[str, ArgValue]:
    """The arguments of ``create_close``: where the body went, its size and MD5 (hex) checksum,
    if one was computed (the tracker checks the size either way)."""
    devid, path = destination
    return {"domain": domain, "key": key, "fid": fid, "devid": devid, "path": path, "size": size,
            "checksum": None if md5 is None else f"MD5:{md5}",
            "checksumverify": 1 if verify_checksum and md5 is not None else None}


def upload_failed(key: str, error: Exception) -> UploadError:
    """The :class:`UploadError` of an upload that failed with ``error`` before ``create_close``."""
    return UploadError(f"upload of {key!r} failed: {error}")


def no_storage_node(key: str, failures: list[str]) -> UploadError:
    """The :class:`UploadError` of an upload that no destination took."""
    return UploadError(f"no storage node took {key!r}: " + "; ".join(failures or ["no destination"]))


#: The errors of ``create_close`` mogilefsd may answer after it changed the key
#: (``MogileFS::Worker::Query::cmd_create_close``): it drops the old file, records the new one and
#: queues its replication, and any of those steps dying is a "failure"; a ``file_stored`` hook's
#: veto comes last and deletes the new file. Its other refusals come before any change.
_FAILED_AFTER_CHANGING = frozenset({"failure", "plugin_aborted"})
#: The attribute set, to the key, on an error raised once the key may point at the new data.
_OUTCOME_UNKNOWN = "upload_outcome_unknown"
_E = TypeVar("_E", bound=BaseException)
#: The errors asyncio raises anew for another: Python 3.10's TimeoutError is asyncio's own.
_ASYNCIO_ENDINGS = (asyncio.CancelledError, asyncio.TimeoutError, TimeoutError)


@contextlib.contextmanager
def committing(key: str, size: int, changed: Callable[[], None]) -> Iterator[None]:
    """Around the end of an upload of ``size`` bytes (the PUT, then ``create_close``): ``changed()``
    once the key points, or may point, at the new data (also when interrupted); a failure becomes
    an :class:`UploadError`, or an :class:`UploadOutcomeUnknownError` when ``create_close``'s
    answer was lost. What may have left the key at the new data is marked for :func:`may_have_stored`."""
    try:
        yield
    except MogileFSError as error:
        if _answer_lost(error):
            raise _may_be_stored(key, size, changed, UploadOutcomeUnknownError(
                f"upload of {key!r}: the answer to create_close was lost, so the key may or may not point at the "
                f"new data ({error})")) from error
        if isinstance(error, TrackerError) and error.code in _FAILED_AFTER_CHANGING:
            raise _may_be_stored(key, size, changed, UploadError(
                f"upload of {key!r} failed: the tracker failed create_close ({error}), maybe after dropping the "
                f"key's old version or recording the new one"), "failed") from error
        metrics.recorder.upload("failed", size)
        if isinstance(error, UploadError):
            raise
        raise upload_failed(key, error) from error
    except BaseException as interruption:  # interrupted (Ctrl-C, a cancelled task): create_close may have been carried out
        _may_be_stored(key, size, changed, interruption)
        raise
    metrics.recorder.upload("stored", size)
    with telling(key):
        changed()


def _may_be_stored(key: str, size: int, changed: Callable[[], None], error: _E, outcome: str = "unknown") -> _E:
    """``error`` marked with ``key`` (for :func:`may_have_stored` and the command line to say), once
    the metrics and ``changed()`` were told: the key may point at the new data."""
    setattr(error, _OUTCOME_UNKNOWN, key)
    metrics.recorder.upload(outcome, size)
    with telling(key):
        changed()
    return error


@contextlib.contextmanager
def telling(key: str) -> Iterator[None]:
    """Around telling others that ``key`` changed: an interruption meanwhile (Ctrl-C, a cancelled
    task) is marked with ``key``, whose new data may be stored."""
    try:
        yield
    except BaseException as interruption:
        setattr(interruption, _OUTCOME_UNKNOWN, key)
        raise


def may_have_stored(error: BaseException) -> bool:
    """True if the upload that raised ``error`` may have pointed its key at the new data (the
    answer to ``create_close`` lost or a failure, or the commit interrupted). Any other failure
    left the key as it was. A cancellation or timeout asyncio raised anew is read through to the
    one the upload raised (``wait_for``'s TimeoutError; Python 3.10's CancelledError for a task
    awaiting a cancelled one, outside an ``except`` block). Where asyncio links none to it (a task
    cancelled while in ``wait_for`` before 3.12, a TaskGroup, ``shield``), ask the upload's own task."""
    link: BaseException | None = error
    for _ in range(4):  # a few links at most (a timeout from a cancellation from the upload's)
        if isinstance(link, UploadOutcomeUnknownError) or hasattr(link, _OUTCOME_UNKNOWN):
            return True
        if not isinstance(link, _ASYNCIO_ENDINGS):
            return False
        link = link.__cause__ or link.__context__
    return False


def content_bytes(key: str, data: object) -> bytes | bytearray | memoryview:
    """``data`` for ``store_content`` of ``key`` if it is bytes-like; a TypeError otherwise. Text is
    neither encoded for the caller nor taken for the path of a file to send."""
    if not isinstance(data, BYTES_LIKE):
        hint = ": encode the text first" if isinstance(data, str) else ""
        raise TypeError(f"store_content of {key!r} takes bytes, not {type(data).__name__}{hint}")
    return data


def sendable(source: object) -> bool:
    """True for what an upload sends as it is: bytes, a file opened in binary mode (anything with
    a ``read``), an iterable of bytes; not a file opened as text, nor a number."""
    return isinstance(source, BYTES_LIKE) or not isinstance(source, io.TextIOBase) and (
        hasattr(source, "read") or isinstance(source, Iterable))


def piece_bytes(key: str, data: object) -> bytes | bytearray | memoryview:
    """A piece of the upload of ``key`` as bytes to send: bytes, or a view in bytes of any other
    buffer (a memoryview, an ``array``, an ``mmap``), whose length would count its items; a
    TypeError, before a byte of it is sent, for what is not one (text, a number) or is not
    contiguous."""
    if isinstance(data, (bytes, bytearray)):
        return data
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"upload of {key!r} takes bytes, not {type(data).__name__}") from None
    if not view.c_contiguous:
        raise TypeError(f"upload of {key!r} takes contiguous bytes, not a non-contiguous {type(data).__name__}")
    return byte_view(view)


class _BufferFile(io.RawIOBase):
    """A seekable binary file of a buffer's bytes, read from a view of them: ``io.BytesIO`` copies
    any buffer but ``bytes`` whole, twice the memory of a large upload (and on an event loop, a
    stall while it copies)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = max(0, (0, self._position, len(self._view))[whence] + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        piece = self._view[self._position:self._position + len(buffer)]
        memoryview(buffer).cast("B")[:len(piece)] = piece
        self._position += len(piece)
        return len(piece)

    def close(self) -> None:
        """Release the buffer: while viewed, a ``bytearray`` cannot be resized nor an ``mmap`` closed."""
        super().close()
        self._view.release()


def buffer_file(key: str, data: bytes | bytearray | memoryview) -> BinaryIO:
    """A seekable file of ``data``'s bytes, the upload of ``key``: bytes in an ``io.BytesIO``, which
    shares them; any other buffer read from a view of it (see :class:`_BufferFile`)."""
    if isinstance(data, bytes):
        return io.BytesIO(data)
    return _BufferFile(memoryview(piece_bytes(key, data)))  # type: ignore[return-value]


def pieces_of(fileobj: BinaryIO, size: int) -> Iterator[bytes]:
    """The pieces ``fileobj.read(size)`` gives up to its end; a TypeError for a read that gives
    ``None``, as a non-blocking file with no data ready does: its end is not reached, and the
    upload would otherwise stop short."""
    while piece := fileobj.read(size):
        yield piece
    if piece is None:
        raise TypeError(f"{fileobj!r} is a non-blocking file with no data ready: give a blocking one "
                        "(or, to the asyncio client, an async iterable of bytes)")


def remaining_size(fileobj: BinaryIO) -> int | None:
    """Bytes left to read in ``fileobj`` when that can be known without reading, else ``None``."""
    try:
        if not fileobj.seekable():
            return None
        position = fileobj.tell()
        fileobj.seek(0, io.SEEK_END)  # no copy, unlike BytesIO.getbuffer()
        end = fileobj.tell()  # not what seek() returned: many a file object's (paramiko's) returns None
        fileobj.seek(position)
        return max(end - position, 0)  # a file positioned past its end has nothing left
    except (AttributeError, OSError, TypeError, ValueError):
        return None


class _AtMost:
    """The first ``size`` bytes of a stream that cannot tell its length: a WSGI request's body,
    which must not be read past its ``Content-Length`` (PEP 3333: a server may hand on its socket,
    where the client waits for an answer, or sends its next request)."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream = stream
        self._left = size

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        piece = self._stream.read(self._left if size is None or size < 0 else min(size, self._left))
        self._left -= len(piece or b"")
        return piece


def check_announced(key: str, size: int | None, data: bytes | bytearray | memoryview) -> None:
    """A ValueError, before the tracker is asked (which would reserve a fid), for bytes of
    another length than the ``size`` announced for them."""
    if size is not None and size != (held := memoryview(data).nbytes):
        raise ValueError(f"size={size} announced for {key!r}, but the content holds {held} bytes")


def checked_size(size: int | None) -> int | None:
    """``size``, the number of bytes an upload announces (None: unknown); else a ValueError naming it."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ValueError(f"size must be a whole number of bytes >= 0, or None when unknown, not {size!r}")
    return size


def _answer_lost(error: MogileFSError) -> bool:
    """True if a request reached a tracker but no usable answer came back: it may have been carried out."""
    return isinstance(error, (OutcomeUnknownError, ProtocolError))


class NewFile(io.RawIOBase):
    """A writable file for a new key; closing it commits the key, an exception inside ``with`` aborts.

    A ``close()`` while an exception other than the one handled when the file was made is being
    handled does not commit either: the ``with`` of an io wrapper, which closes the file it wraps
    whatever happened, ending in error, or a ``finally`` after a failed write, would point the key
    at part of the data. It aborts and raises :class:`UploadError` (that exception its context);
    a generator's end (``GeneratorExit``) is no failure, and the file's own ``with`` commits as its
    block ends well. The close of a wrapper dropped unclosed aborts, with a warning.

    Bytes are streamed to the first storage node of ``create_open``'s destinations that accepts
    the connection; :meth:`write_from` can also rewind a seekable source and fall back to the next
    destination when a node drops the PUT midway. ``on_change`` is called with the key once
    ``create_close`` succeeded, or was sent and its answer lost. With ``checksum`` (the default)
    the MD5 checksum is computed as the bytes are sent and given to ``create_close``.
    """

    def __init__(
        self,
        pool: TrackerPool,
        domain: str,
        key: str,
        cls: str | None = None,
        *,
        size: int | None = None,
        checksum: bool = True,
        verify_checksum: bool = False,
        storage_timeout: float = 10.0,
        on_change: ChangeListener | None = None,
    ) -> None:
        super().__init__()
        self._stream: PutStream | None = None
        self._put_done = False
        self._opened = False  # create_open answered: an upload has begun
        check_key(key)
        self.key = key
        self._pool = pool
        self._domain = domain
        self._declared_size = size
        self._checksum = checksum
        self._verify_checksum = verify_checksum
        self._timeout = storage_timeout
        self._on_change = on_change
        self._handled_at_start = sys.exc_info()[1]  # made in an except clause: no failure of its writing
        self._abandoned = False
        checked_size(size)
        args = create_open_args(domain, key, cls, size)
        with opening(args, domain):
            self.fid, self._destinations = pool.request("create_open", args, opened_file)[0]
        self._devid = self._path = ""
        self._reset_body()
        self._opened = True

    def _reset_body(self) -> None:
        self._md5 = hashlib.md5() if self._checksum else None
        self.size = 0

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        """Refused, as a file opened ``"wb"`` refuses it (``RawIOBase`` raised NotImplementedError)."""
        raise io.UnsupportedOperation(f"read of {self.key!r}, a new file: it is written, not read")

    def _open_stream(self, failures: list[str] | None = None) -> PutStream:
        """Start the PUT on the next destination that accepts it; ``failures`` (of the destinations
        tried before, which the error names too) grows with each that refuses."""
        failures = [] if failures is None else failures
        while self._destinations:
            self._devid, self._path = self._destinations.pop(0)
            try:
                self._stream = PutStream(self._path, length=self._declared_size, timeout=self._timeout)
                return self._stream
            except StorageError as error:
                failures.append(str(error))
        raise no_storage_node(self.key, failures)

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._checkClosed()  # closed or aborted: nothing more goes to the node
        self._check_not_sent()
        data = piece_bytes(self.key, data)
        try:
            self._send(self._stream or self._open_stream(), data)
        except StorageError as error:
            self.abort()
            raise upload_failed(self.key, error) from error
        except BaseException:  # Ctrl-C midway: part of the piece may have gone, never to be committed
            self.abort()
            raise
        return len(data)

    def _send(self, stream: PutStream, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` while another thread adds it to the checksum; both are done on return."""
        hashing = None
        if self._md5 is not None and len(data) >= CHUNK_SIZE:  # a small piece costs more to hand over
            try:
                hashing = hasher().submit(self._md5.update, data)
            except RuntimeError:  # the interpreter is exiting, and its thread pools take no more work
                pass
        try:
            stream.write(data)
        finally:
            if hashing is not None:
                hashing.result()
        if self._md5 is not None and hashing is None:
            self._md5.update(data)
        self.size += len(data)

    def write_from(self, fileobj: BinaryIO, progress: Progress | None = None) -> int:
        """Copy ``fileobj`` to its end and finish the PUT, trying the next destination if a node
        refuses or drops it (rewinding ``fileobj``, which must then be seekable). Any other
        failure (of the source, of ``progress``, Ctrl-C) drops the upload before it is raised: a
        ``close()`` after it, as in a ``finally``, commits nothing.

        ``progress`` is called with the bytes sent so far after each chunk.
        """
        self._checkClosed()
        self._check_not_sent()
        # Sent again from ``start`` on the next node: only when it is the whole body, not when
        # write() sent bytes before it (they went to the node that failed).
        start = None if self.size or remaining_size(fileobj) is None else fileobj.tell()
        dropped: list[str] = []  # by the nodes tried, for the error when none is left
        try:
            while True:
                stream = self._stream or self._open_stream(dropped)
                try:
                    for chunk in pieces_of(fileobj, READ_SIZE):
                        self._send(stream, piece_bytes(self.key, chunk))
                        if progress is not None:
                            progress(self.size)
                    stream.finish()
                    self._put_done = True
                    return self.size
                except StorageError as error:  # the node's, or the source's (a replica read midway)
                    stream.abort()
                    self._stream = None
                    dropped.append(str(error))
                    if start is None or not self._destinations or isinstance(error, LengthMismatchError):
                        raise (no_storage_node(self.key, dropped) if len(dropped) > 1
                               else upload_failed(self.key, error)) from error
                    fileobj.seek(start)
                    self._reset_body()
        except BaseException:  # what was sent, if anything, must never be committed
            self.abort()
            raise

    def _check_not_sent(self) -> None:
        """A ValueError once :meth:`write_from` has finished the PUT: the node has the whole body."""
        if self._put_done:
            raise ValueError(f"upload of {self.key!r}: write_from sent the whole body; close the file to commit it")

    def write_chunks(self, chunks: Iterable[bytes | bytearray | memoryview], progress: Progress | None = None) -> int:
        """Write every chunk of ``chunks`` (e.g. Django's ``File.chunks()``); see :meth:`write_from`,
        also for a failure midway."""
        try:
            for chunk in chunks:
                self.write(chunk)
                if progress is not None:
                    progress(self.size)
        except BaseException:
            self.abort()
            raise
        return self.size

    def close(self) -> None:
        """Finish the PUT and ``create_close`` the key with its size and MD5 checksum (if computed);
        abort instead when closed amid an error, or by a wrapper dropped unclosed (see the class doc)."""
        if self.closed:
            return
        if self._abandoned:
            self.abort()
            log.warning("%r not stored: its file was dropped unclosed", self.key)
            return
        failing = sys.exc_info()[1]
        if failing is not None and failing is not self._handled_at_start and not isinstance(failing, GeneratorExit):
            self.abort()
            raise UploadError(f"{self.key!r} was not stored: its file was closed while {failing!r} was being "
                              "handled (its own with, or a close after the except clause, commits it)")
        self._close_committing()

    def _close_committing(self) -> None:
        try:
            self._commit()
        finally:
            super().close()
            self._handled_at_start = None

    def _dealloc_warn(self, source: object) -> None:
        # What an io wrapper being finalized, never closed (dropped after an error), tells the file
        # it wraps before closing it: that close gives up.
        self._abandoned = True

    def _commit(self) -> None:
        with committing(self.key, self.size, self._changed):
            if not self._put_done:
                (self._stream or self._open_stream()).finish()
            self._pool.request(
                "create_close",
                create_close_args(self._domain, self.key, self.fid, (self._devid, self._path), self.size,
                                  None if self._md5 is None else self._md5.hexdigest(), self._verify_checksum),
            )

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.key)

    def abort(self) -> None:
        """Give up: drop the PUT and never ``create_close``, so the key keeps its old data."""
        if self._stream is not None:
            self._stream.abort()
            self._stream = None
        if self._opened and not self.closed:
            metrics.recorder.upload("failed", self.size)
        super().close()
        self._handled_at_start = None  # and its traceback's frames

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.closed:  # its block ended well, whatever is handled around it (an ExitStack's suppress)
            self._close_committing()

    def __del__(self) -> None:
        # An abandoned file must never commit half its data: dropping it aborts, and says so
        # (pymogile's files committed as they were collected: a program relying on that loses them).
        if not self.closed:
            self.abort()
            if self._opened:
                log.warning("%r not stored: its file was dropped unclosed", self.key)


class UploadClient(Protocol):
    """What an :class:`Uploader` writes through: a :class:`~mogile_middleware.client.Client`."""

    domain: str
    pool: TrackerPool

    def new_file(self, key: str, cls: str | None = None, *, size: int | None = None, checksum: bool = True,
                 verify_checksum: bool = False) -> NewFile:
        """A writable file for ``key`` that tells the client's change listeners once it commits."""


class Uploader:
    """Store keys with a chosen class from bytes, a path, a file object or an iterable of chunks.

    Files go through ``client`` (a blocking :class:`~mogile_middleware.client.Client`). Bytes are
    streamed, never held whole; the size and MD5 checksum go with ``create_close``, the checksum
    computed as the bytes are sent (``checksums="always"``, the default). With
    ``checksums="kept"`` it is computed only where the key's class keeps checksums (its
    ``hashtype``): a tracker drops the checksum of a class that keeps none, and MD5 costs about as
    much CPU as the sending. With ``verify_checksums`` the tracker is asked to check the stored
    file's MD5 whenever the class keeps checksums. Files are made by ``client.new_file``, so the
    client's change listeners hear of every key written (a path cache drops it).
    """

    def __init__(self, client: UploadClient, *, verify_checksums: bool = True, checksums: str = "always") -> None:
        if checksums not in ("kept", "always"):
            raise ValueError(f"checksums must be 'kept' or 'always', not {checksums!r}")
        if not isinstance(verify_checksums, bool):
            raise ValueError(f"verify_checksums must be True or False, not {verify_checksums!r}")
        if not (isinstance(getattr(client, "pool", None), TrackerPool) and callable(getattr(client, "new_file", None))):
            raise TypeError(f"an Uploader writes through a blocking Client (AsyncClient stores files itself: "
                            f"store_file, store_content), not {client!r}")
        self.client = client
        self.verify_checksums = verify_checksums
        self.checksums = checksums
        self._hashtypes: dict[str, str] = {}
        self._hashtypes_asked = 0.0

    def __repr__(self) -> str:
        return f"<Uploader through {self.client!r}>"

    def upload(self, key: str, source: Source, cls: str | None = None, *, progress: Progress | None = None,
               verify_checksum: bool | None = None, size: int | None = None) -> int:
        """Store ``source`` under ``key`` in class ``cls``; return the number of bytes stored.

        ``verify_checksum`` overrides ``verify_checksums`` for this upload: ``True`` asks the
        tracker to check the MD5 whatever the class (mogilefsd then reads the file back even for a
        class that keeps no checksum), ``False`` never. ``size`` is the number of bytes the source
        must hold (a request's ``Content-Length``): one that ends short is refused and the key kept,
        a stream is read no further (a WSGI request's body must not be), and bytes or a file of
        another length are a ValueError before the tracker is asked. Raises
        :class:`UploadError` (the key keeps its old data, unless the message says otherwise),
        :class:`UploadOutcomeUnknownError`, the tracker's refusal of ``create_open``
        (:class:`UnregClassError`, ``NoDevicesError``, ``TrackerUnavailableError``) or the source's own error.
        """
        check_key(key)  # before asking the tracker anything
        checked_size(size)
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a function of the bytes sent, not {progress!r}")
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as fileobj:
                return self.upload(key, fileobj, cls, progress=progress, verify_checksum=verify_checksum, size=size)
        if isinstance(source, BYTES_LIKE):
            check_announced(key, size, source)
            with buffer_file(key, source) as fileobj:
                return self.upload(key, fileobj, cls, progress=progress, verify_checksum=verify_checksum, size=size)
        if not sendable(source):
            raise TypeError(f"upload of {key!r} takes bytes, a path, a file opened in binary mode or "
                            f"an iterable of bytes, not {type(source).__name__}")
        readable = hasattr(source, "read")
        if size is not None and readable:
            held = remaining_size(source)  # type: ignore[arg-type]
            if held is None:
                source = _AtMost(source, size)  # type: ignore[arg-type]
            elif held != size:  # known before asking the tracker
                raise ValueError(f"size={size} announced for {key!r}, but the file holds {held} bytes from where it is")
        # Asked for this upload: whatever the class, as mogilefsd checks it (and AsyncClient asks).
        verify = bool(verify_checksum) if verify_checksum is not None else \
            self.verify_checksums and self._keeps_checksums(cls)
        upload = self.client.new_file(
            key, cls,
            size=size if size is not None or not readable else remaining_size(source),  # type: ignore[arg-type]
            checksum=verify or self.checksums == "always" or self._keeps_checksums(cls),
            verify_checksum=verify,
        )
        with upload:
            if readable:
                upload.write_from(source, progress)  # type: ignore[arg-type]
            else:
                upload.write_chunks(source, progress)  # type: ignore[arg-type]
        return upload.size

    def _keeps_checksums(self, cls: str | None) -> bool:
        """True if the tracker keeps checksums for ``cls`` (asked every ``CLASSES_SECONDS``, and
        again for a class not seen)."""
        name = cls or "default"
        hashtypes = self._hashtypes
        if name not in hashtypes or time.monotonic() - self._hashtypes_asked > CLASSES_SECONDS:
            # Asked under no lock: under gevent, a lock made before it patched (gunicorn --preload)
            # is the thread's, and one held while the tracker answers would stop the whole worker.
            # Uploads that find the answer old at once ask at once too.
            hashtypes = self._hashtypes = self._class_hashtypes()
            self._hashtypes_asked = time.monotonic()
        return hashtypes.get(name, "NONE") != "NONE"

    def _class_hashtypes(self) -> dict[str, str]:
        try:
            domains = self.client.pool.request("get_domains", None, parse_domains)[0]
        except MogileFSError:  # no tracker answering: an upload failed, as at create_open
            metrics.recorder.upload("failed", 0)
            raise
        return {cls: hashtype for cls, (_, hashtype) in domains.get(self.client.domain, {}).items()}
