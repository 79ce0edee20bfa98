"""Writing a key: ``create_open``, a streaming PUT to a storage node, ``create_close``.

The key points at the new data only after the storage node has taken the whole body and the
tracker has checked its size (and MD5 checksum, when asked): a failure at any step raises
:class:`UploadError` and leaves the key as it was.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from typing import BinaryIO

from .exceptions import MogileFSError, StorageError, UnregClassError, UploadError
from .protocol import check_key
from .storage import CHUNK_SIZE, PutStream
from .tracker import TrackerPool


def _destinations(reply: dict[str, str]) -> list[tuple[str, str]]:
    """``(devid, path)`` pairs of a ``create_open`` reply, with or without ``multi_dest``."""
    if "dev_count" in reply:
        return [(reply[f"devid_{n}"], reply[f"path_{n}"]) for n in range(1, int(reply["dev_count"]) + 1)]
    return [(reply["devid"], reply["path"])]


def remaining_size(fileobj: BinaryIO) -> int | None:
    """Bytes left to read in ``fileobj`` when that can be known without reading, else ``None``."""
    try:
        position = fileobj.tell()
        if isinstance(fileobj, io.BytesIO):
            return len(fileobj.getbuffer()) - position
        return os.fstat(fileobj.fileno()).st_size - position
    except (AttributeError, OSError, ValueError):
        return None


class NewFile(io.RawIOBase):
    """A writable file for a new key; closing it commits the key, an exception inside ``with`` aborts.

    Bytes are streamed to the first storage node of ``create_open``'s destinations that accepts
    the connection; :meth:`write_from` can also rewind a seekable source and fall back to the next
    destination when a node drops the PUT midway.
    """

    def __init__(
        self,
        pool: TrackerPool,
        domain: str,
        key: str,
        cls: str | None = None,
        *,
        size: int | None = None,
        verify_checksum: bool = False,
        storage_timeout: float = 10.0,
    ) -> None:
        super().__init__()
        self._stream: PutStream | None = None
        self._put_done = False
        check_key(key)
        self.key = key
        self._pool = pool
        self._domain = domain
        self._declared_size = size
        self._verify_checksum = verify_checksum
        self._timeout = storage_timeout
        try:
            reply, self._tracker = pool.request(
                "create_open", {"domain": domain, "key": key, "class": cls, "multi_dest": 1, "size": size}
            )
        except UnregClassError as error:
            raise UnregClassError(error.code, f"class {cls!r} is not registered in domain {domain!r}") from None
        self.fid = reply["fid"]
        self._destinations = _destinations(reply)
        self._devid = self._path = ""
        self._reset_body()

    def _reset_body(self) -> None:
        self._md5 = hashlib.md5()
        self.size = 0

    def writable(self) -> bool:
        return True

    def _open_stream(self) -> PutStream:
        """Start the PUT on the next destination that accepts it."""
        failures = []
        while self._destinations:
            self._devid, self._path = self._destinations.pop(0)
            try:
                self._stream = PutStream(self._path, length=self._declared_size, timeout=self._timeout)
                return self._stream
            except StorageError as error:
                failures.append(str(error))
        raise UploadError(f"no storage node took {self.key!r}: " + "; ".join(failures or ["no destination"]))

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        stream = self._stream or self._open_stream()
        try:
            stream.write(data)
        except StorageError as error:
            self.abort()
            raise UploadError(f"upload of {self.key!r} failed: {error}") from error
        self._md5.update(data)
        self.size += len(data)
        return len(data)

    def write_from(self, fileobj: BinaryIO) -> int:
        """Copy ``fileobj`` to its end and finish the PUT, trying the next destination if a node
        refuses or drops it (rewinding ``fileobj``, which must then be seekable)."""
        start = fileobj.tell() if fileobj.seekable() else None
        while True:
            stream = self._stream or self._open_stream()
            try:
                for chunk in iter(lambda: fileobj.read(CHUNK_SIZE), b""):
                    stream.write(chunk)
                    self._md5.update(chunk)
                    self.size += len(chunk)
                stream.finish()
                self._put_done = True
                return self.size
            except StorageError as error:
                self._stream = None
                if start is None or not self._destinations:
                    self.abort()
                    raise UploadError(f"upload of {self.key!r} failed: {error}") from error
                fileobj.seek(start)
                self._reset_body()

    def write_chunks(self, chunks: Iterable[bytes]) -> int:
        """Write every chunk of ``chunks`` (e.g. Django's ``File.chunks()``)."""
        for chunk in chunks:
            self.write(chunk)
        return self.size

    def close(self) -> None:
        """Finish the PUT and ``create_close`` the key with its size and MD5 checksum."""
        if self.closed:
            return
        try:
            self._commit()
        finally:
            super().close()

    def _commit(self) -> None:
        try:
            if not self._put_done:
                (self._stream or self._open_stream()).finish()
            self._pool.request(
                "create_close",
                {
                    "domain": self._domain,
                    "key": self.key,
                    "fid": self.fid,
                    "devid": self._devid,
                    "path": self._path,
                    "size": self.size,
                    "checksum": f"MD5:{self._md5.hexdigest()}",
                    "checksumverify": 1 if self._verify_checksum else None,
                },
                tracker=self._tracker,
            )
        except MogileFSError as error:
            if isinstance(error, UploadError):
                raise
            raise UploadError(f"upload of {self.key!r} failed: {error}") from error

    def abort(self) -> None:
        """Give up: drop the PUT and never ``create_close``, so the key keeps its old data."""
        if self._stream is not None:
            self._stream.abort()
            self._stream = None
        super().close()

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:
        # An abandoned file must never commit half its data: dropping it aborts.
        if not self.closed:
            self.abort()
