"""The MogileFS client for asyncio: :class:`~mogile_middleware.client.Client`'s methods as coroutines.

Requests are shaped and replies read by the same functions as the blocking client
(:mod:`mogile_middleware.client`), uploads keep the same promises (:mod:`mogile_middleware.upload`),
over :class:`~mogile_middleware.async_tracker.AsyncTrackerPool` and
:mod:`mogile_middleware.async_storage`. Example::

    client = AsyncClient("media", ["10.0.0.1:7001", "10.0.0.2:7001"])
    await client.store_content("avatars/42.png", png_bytes, cls="avatar")
    await client.get_paths("avatars/42.png")   # ['http://10.0.0.5:7500/dev3/0/000/000/0000000123.fid', ...]
    await client.aclose()
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import io
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, BinaryIO, Union

from . import metrics
from .async_storage import (
    CHUNK_SIZE,
    AsyncPutStream,
    AsyncReplicaResponse,
    close_idle_connections,
    open_replica,
    read_replica,
)
from .async_tracker import AsyncTrackerPool
from .cache import CacheBackend
from .client import (
    ClientBase,
    FileInfo,
    KeyListing,
    Request,
    delete_request,
    file_info_request,
    get_paths_request,
    keys_prefix,
    list_keys_request,
    of_version,
    rename_request,
    same_version,
    stored_key_request,
    update_class_request,
)
from .exceptions import BadKeyError, NoneMatchError, StorageError, UnknownKeyError, named_errors
from .protocol import Key, as_text, check_key
from .storage import PUT_PIECE_SIZE, LengthMismatchError, put_pieces
from .upload import (
    BYTES_LIKE,
    buffer_file,
    check_announced,
    checked_size,
    committing,
    content_bytes,
    create_close_args,
    create_open_args,
    no_storage_node,
    opened_file,
    opening,
    piece_bytes,
    pieces_of,
    remaining_size,
    telling,
    upload_failed,
)

#: What :meth:`AsyncClient.store_file` stores: a binary file object (its ``read`` plain or a
#: coroutine function) or an async iterable of bytes.
Body = Union[BinaryIO, AsyncIterable[bytes]]


class AsyncClient(ClientBase):
    """A MogileFS client for one domain, for asyncio.

    The arguments are :class:`~mogile_middleware.client.Client`'s, with an
    :class:`~mogile_middleware.async_tracker.AsyncTrackerPool` as ``pool``. Change listeners are
    plain functions, called in the event loop, or coroutine functions, awaited: a call that
    changes a key returns once every listener is done with it, and one cancelled meanwhile leaves
    them to run to their end (the shared cache's runs in a thread, so that the event loop never
    waits on it).
    """

    pool_class = AsyncTrackerPool
    pool: AsyncTrackerPool
    awaits_listeners = True

    async def _ask(self, request: Request) -> Any:
        """``request``'s reply, as it reads it."""
        try:
            with named_errors(request.args, self.domain):
                return (await self.pool.request(request.command, self._args(request), request.read))[0]
        finally:
            if request.changes:
                await self._tell(*request.changes)

    async def _tell(self, *keys: str) -> None:
        """:meth:`_changed`, with what the coroutine function listeners started awaited to the end,
        also when this task is cancelled meanwhile."""
        started = self._changed(*keys)
        if started:
            await asyncio.shield(asyncio.gather(*started))

    async def _drop_shared_entry(self, backend: CacheBackend, key: str) -> None:  # type: ignore[override]
        """As the blocking client's, from a thread: the event loop never waits on a shared cache."""
        await asyncio.to_thread(super()._drop_shared_entry, backend, key)

    async def get_paths(self, key: Key, noverify: bool = True, zone: str | None = None,
                        pathcount: int = 2) -> list[str]:
        """The URLs of the key's replicas, in the tracker's order (try them in that order):
        ``pathcount`` at most, but 2 at least, as mogilefsd lists them."""
        return await self._ask(get_paths_request(key, noverify, zone, pathcount))

    async def file_info(self, key: Key) -> FileInfo:
        """The key's fid, length, class and replica count."""
        return await self._ask(file_info_request(key))

    async def delete(self, key: Key) -> None:
        """Delete ``key`` (raises :class:`UnknownKeyError` if it does not exist)."""
        await self._ask(delete_request(key))

    async def rename(self, from_key: Key, to_key: Key) -> None:
        """Rename ``from_key`` to ``to_key`` (raises :class:`KeyExistsError` if that exists)."""
        await self._ask(rename_request(from_key, to_key))

    async def update_class(self, key: Key, cls: str) -> None:
        """Move ``key`` to class ``cls`` (the tracker then adjusts its replica count)."""
        await self._ask(update_class_request(key, cls))

    async def list_keys(self, prefix: Key = "", after: Key | None = None, limit: int | None = None) -> list[str]:
        """Up to ``limit`` (at most 1000) keys starting with ``prefix`` whatever its case (the
        tracker's SQL ``LIKE``; :meth:`keys` matches it exactly), after ``after``, in the tracker's
        order (bytes on SQLite, the column's collation on MySQL)."""
        return (await self._list_page(prefix, after, limit))[0]

    async def _list_page(self, prefix: Key, after: Key | None, limit: int | None) -> tuple[list[str], str | None]:
        try:
            return await self._ask(list_keys_request(prefix, after, limit))
        except NoneMatchError:
            return [], None

    async def keys(self, prefix: Key | None = "") -> AsyncIterator[str]:
        """Every key starting with ``prefix`` (text or bytes; exactly, unlike ``list_keys``), page by page."""
        prefix = keys_prefix(prefix)
        listing = KeyListing(prefix, self.keys_page)
        alone = listing.kept(await self._stored(prefix)) if listing.after is not None else None  # see first_page
        if alone is not None:
            yield alone
        while not listing.done:
            found, passed = listing.take((await self._list_page(listing.listed, listing.after, self.keys_page))[0])
            for key in found:
                if key != alone:
                    yield key
            stored = None if passed is None else listing.kept(await self._stored(passed))
            if stored is not None and stored != alone:
                yield stored

    async def _stored(self, key: str) -> str | None:
        """The key the tracker finds for ``key``, as stored (on MySQL, maybe in another case), or None."""
        try:
            return await self._ask(stored_key_request(key))
        except (UnknownKeyError, BadKeyError):  # BadKeyError: a prefix no key could equal
            return None

    async def current_version(self, key: Key, pathcount: int = 2) -> tuple[list[str], FileInfo]:
        """As :meth:`Client.current_version <mogile_middleware.client.Client.current_version>`."""
        paths, info = await self.get_paths(key, pathcount=pathcount), await self.file_info(key)
        if not same_version(paths, info):
            paths, info = await self.get_paths(key, pathcount=pathcount), await self.file_info(key)
        return of_version(key, paths, info), info

    async def read_file(self, key: Key) -> AsyncReplicaResponse:
        """The body of the first replica that answers of the length the tracker records, to read
        and then ``aclose``: one cut short on its disk is passed over (:meth:`current_version`)."""
        paths, info = await self.current_version(key)
        return await open_replica(paths, size=info.length, timeout=self.storage_timeout)

    async def get_file_data(self, key: Key) -> bytes:
        """The whole content of ``key`` (for small files; use :meth:`read_file` to stream), from a
        replica of the length the tracker records, and the next when a transfer is cut midway."""
        paths, info = await self.current_version(key)
        return await read_replica(paths, length=info.length, timeout=self.storage_timeout)

    async def store_content(self, key: Key, data: bytes, cls: str | None = None) -> int:
        """Store ``data`` (bytes) under ``key``; return the number of bytes stored."""
        key = as_text(key)
        return await self.store_file(key, content_bytes(key, data), cls)

    async def store_file(self, key: Key, fileobj: Body | bytes | bytearray | memoryview, cls: str | None = None, *,
                         verify_checksum: bool = False, size: int | None = None) -> int:
        """Store the rest of ``fileobj`` (read in the event loop, chunk by chunk; a ``read`` that
        is a coroutine function, as Starlette's ``UploadFile`` has, is awaited), bytes, or every
        chunk of an async iterable under ``key``; return the number of bytes stored.

        As :meth:`Client.store_file <mogile_middleware.client.Client.store_file>`: a seekable
        ``fileobj`` is sent again to the next destination if a node drops the PUT; any failure
        before ``create_close`` leaves the key as it was (the storage nodes' is an
        :class:`UploadError`; the tracker's refusals and the source's own errors are raised as they
        are); a lost answer to ``create_close`` is an :class:`UploadOutcomeUnknownError`;
        ``verify_checksum`` asks the tracker to check the MD5 whatever the class: mogilefsd then
        reads the file back even for a class that keeps no checksum. ``size`` is the number of
        bytes the body must hold (an ASGI request's ``Content-Length``): one that ends short, or
        goes on past it, is refused and the key kept (bytes of another length, a ValueError,
        before the tracker is asked).
        """
        key = as_text(key)
        check_key(key)
        checked_size(size)
        if isinstance(fileobj, BYTES_LIKE):  # read where it is, and let go of once stored or failed
            check_announced(key, size, fileobj)
            with buffer_file(key, fileobj) as body:
                return await self.store_file(key, body, cls, verify_checksum=verify_checksum, size=size)
        fileobj = _body(key, fileobj)
        if size is None and not isinstance(fileobj, AsyncIterable):
            size = remaining_size(fileobj)
        args = create_open_args(self.domain, key, cls, size)
        with opening(args, self.domain):
            fid, targets = (await self.pool.request("create_open", args, opened_file))[0]
        destination, stored, md5 = await self._put(key, fileobj, targets, size)
        close = create_close_args(self.domain, key, fid, destination, stored, md5, verify_checksum)
        changed: list[str] = []
        try:
            with committing(key, stored, lambda: changed.append(key)):
                await self.pool.request("create_close", close)
        finally:
            with telling(key):
                await self._tell(*changed)
        return stored

    async def _put(self, key: str, body: Body, targets: list[tuple[str, str]], size: int | None
                   ) -> tuple[tuple[str, str], int, str]:
        """PUT ``body`` whole to the first of ``targets`` that takes it: the destination, the size
        and the MD5 (hex) of what was sent. A body that cannot be rewound is sent only once. A
        failure counts as an upload failed, of the bytes the PUT tried last took (as the blocking
        client counts it)."""
        start = None if isinstance(body, AsyncIterable) or remaining_size(body) is None else body.tell()
        failures: list[str] = []
        written = 0
        try:
            for destination in targets:
                try:
                    stream = await AsyncPutStream.open(destination[1], length=size, timeout=self.storage_timeout)
                except StorageError as error:
                    failures.append(str(error))
                    continue
                try:
                    stored, md5 = await _send(key, stream, body)
                    await stream.finish()
                    return destination, stored, md5
                except BaseException as error:
                    written = stream.written
                    stream.abort()
                    if not isinstance(error, StorageError):
                        raise
                    if start is None or isinstance(error, LengthMismatchError):
                        raise upload_failed(key, error) from error
                    failures.append(str(error))
                    body.seek(start)  # type: ignore[union-attr]  # start is set: a file object
                    written = 0  # sent again from the start
            raise no_storage_node(key, failures)
        except BaseException:
            metrics.recorder.upload("failed", written)
            raise

    async def aclose(self) -> None:
        """Close the running event loop's kept-open tracker connections and its idle storage node
        connections, which every client on the loop shares."""
        await self.pool.aclose()
        close_idle_connections()


def _body(key: str, source: object) -> Body:
    """What :meth:`AsyncClient.store_file` sends of ``source``; a TypeError, before the tracker is
    asked anything, for what it cannot send."""
    read = getattr(source, "read", None)
    if inspect.iscoroutinefunction(read):  # Starlette's UploadFile, aiofiles: read awaited, sent once
        return _read_awaited(read)
    if isinstance(source, AsyncIterable) or read is not None and not isinstance(source, io.TextIOBase):
        return source  # type: ignore[return-value]
    raise TypeError(f"store_file of {key!r} takes bytes, a file opened in binary mode or an async iterable "
                    f"of bytes, not {type(source).__name__}")


async def _send(key: str, stream: AsyncPutStream, body: Body) -> tuple[int, str]:
    """Write every chunk of ``body``, the upload of ``key``, to ``stream``: the number of bytes and their MD5 (hex)."""
    digest, stored = hashlib.md5(), 0
    async for piece in _chunks(body):
        stored += await _send_piece(stream, digest, piece_bytes(key, piece))
    return stored, digest.hexdigest()


async def _send_piece(stream: AsyncPutStream, digest: Any, chunk: bytes | bytearray | memoryview) -> int:
    """Send ``chunk`` and add it to ``digest``, a part at a time (hashed whole, a chunk of 64 MiB
    held the event loop 0.15 s); its length. Its views of the source's buffer end with the call:
    the source may resize or close that buffer once asked for more."""
    for part in put_pieces(chunk) if len(chunk) > PUT_PIECE_SIZE else (chunk,):
        await stream.write(part)
        digest.update(part)
    return len(chunk)


async def _chunks(body: Body) -> AsyncIterator[bytes]:
    if isinstance(body, AsyncIterable):
        async for chunk in body:
            yield chunk
    else:
        for chunk in pieces_of(body, CHUNK_SIZE):
            yield chunk


async def _read_awaited(read: Callable[[int], Awaitable[bytes]]) -> AsyncIterator[bytes]:
    """The pieces of a file whose ``read`` is a coroutine function, up to its end (a ``None`` from
    it is refused, as :func:`~mogile_middleware.upload.pieces_of` refuses it)."""
    while piece := await read(CHUNK_SIZE):
        yield piece
    if piece is None:
        raise TypeError(f"{read!r} gave None, not bytes: a file with no data ready?")
