"""The MogileFS client: pymogile's method names over a Python 3 tracker connection pool.

Example::

    client = Client("media", ["10.0.0.1:7001", "10.0.0.2:7001"])
    client.store_content("avatars/42.png", png_bytes, cls="avatar")
    client.get_paths("avatars/42.png")   # ['http://10.0.0.5:7500/dev3/0/000/000/0000000123.fid', ...]

Every key the client writes, renames or deletes goes to its change listeners, and is dropped
from a shared path cache (``cache_backend``), so the middleware of every process and host
sharing it sees the change at once.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

from .cache import CacheBackend, entry_key, is_cache_backend
from .deadline import checked_seconds
from .exceptions import BadKeyError, KeyChangingError, NoneMatchError, ProtocolError, UnknownKeyError, named_errors
from .forking import new_lock_in_child
from .nodepool import nodes
from .protocol import (ArgValue, Key, Reply, as_text, check_any_key, check_key, fid_of, has_control_character,
                       key_bytes, parse_domains, to_bytes, to_text)
from .storage import ReplicaResponse, open_replica, read_replica
from .tracker import Address, ReadReply, TrackerPool, TrackerPoolBase
from .upload import ChangeListener, NewFile, Uploader, content_bytes, sendable

log = logging.getLogger("mogile_middleware")


@dataclass(frozen=True)
class FileInfo:
    """What the tracker knows of a key (``file_info``); ``checksum`` (``"MD5:..."``) only for a file
    of a class that keeps checksums, once the tracker has one: ``None`` for a file stored without
    until a replication computes it (mogilefsd says ``MISSING``)."""

    key: str
    fid: int
    length: int
    cls: str
    domain: str
    devcount: int
    checksum: str | None = None


class Request(NamedTuple):
    """A command of a client: its name, its arguments (the domain aside), the keys it may change
    and what its caller reads from the reply (read within the request, so that a tracker whose
    reply cannot be read is passed over for the next, as one that closes is)."""

    command: str
    args: dict[str, ArgValue]
    changes: tuple[str, ...] = ()
    read: ReadReply | None = None


def get_paths_request(key: Key, noverify: bool = True, zone: str | None = None, pathcount: int = 2) -> Request:
    """``get_paths`` for ``key`` (checked: a :class:`BadKeyError` before anything is sent), read
    for as many paths as mogilefsd lists at most (``pathcount``, 2 at least): each is tried in
    turn, a ``storage_timeout`` each when silent."""
    check_any_key(key)
    if isinstance(pathcount, bool) or not isinstance(pathcount, int) or pathcount < 1:
        raise ValueError(f"pathcount must be a whole number >= 1, not {pathcount!r}")
    at_most = max(pathcount, 2)
    return Request("get_paths", {"key": key, "noverify": 1 if noverify else 0, "zone": zone, "pathcount": pathcount},
                   read=lambda reply: paths_of(reply)[:at_most])


def paths_of(reply: Reply) -> list[str]:
    """The replica URLs of a ``get_paths`` reply, in the tracker's order."""
    return [reply[f"path{n}"] for n in range(1, reply.number("paths") + 1)]


def of_version(key: Key, paths: list[str], info: FileInfo) -> list[str]:
    """Those of ``paths`` that may be replicas of ``info``'s version (naming its fid, or none);
    :class:`KeyChangingError` if none is (see :func:`same_version`)."""
    kept = [path for path in paths if fid_of(path) in (None, info.fid)]
    if paths and not kept:
        raise KeyChangingError(f"the replicas of {key!r} name other versions than its file_info, asked twice")
    return kept


def stored_key_request(key: str) -> Request:
    """``file_debug`` for ``key`` (checked), whose ``fid_dkey`` spells the key as stored: a tracker
    on MySQL finds a key whatever its case, and its ``file_info`` gives the key as asked."""
    check_any_key(key)
    return Request("file_debug", {"key": key}, read=stored_key_of)


def stored_key_of(reply: Reply) -> str:
    """The key as stored, of a ``file_debug`` reply."""
    return reply["fid_dkey"]


def file_info_request(key: Key) -> Request:
    """``file_info`` for ``key`` (checked). mogilefsd answers with the key as asked (as
    ``fid:<fid>`` under the FilePaths plugin, which renames it so): an answer about another key
    (a tracker, or something in front of it, answering another request) is a
    :class:`ProtocolError`, so that the next tracker is asked, rather than another file served."""
    asked = to_text(check_any_key(key))

    def read(reply: Reply) -> FileInfo:
        info = file_info_of(reply)
        if info.key != asked and info.key != f"fid:{info.fid}":
            raise ProtocolError(f"the tracker's file_info of {asked!r} is about {info.key!r}")
        return info

    return Request("file_info", {"key": key}, read=read)


#: What mogilefsd 2.73's ``file_info`` gives as the checksum of a file of a class that keeps them,
#: stored without one (``cmd_file_info``).
_NO_CHECKSUM = "MISSING"


def same_version(paths: list[str], info: FileInfo) -> bool:
    """False if any of ``paths`` names a fid other than ``info``'s: the key was replaced between
    the two questions (or the tracker mixes files), and such a replica would be another file's."""
    return all(fid_of(path) in (None, info.fid) for path in paths)


def file_info_of(reply: Reply) -> FileInfo:
    """The :class:`FileInfo` of a ``file_info`` reply."""
    return FileInfo(
        key=reply["key"],
        fid=reply.number("fid"),
        length=reply.number("length"),
        cls=reply["class"],
        domain=reply["domain"],
        devcount=reply.number("devcount"),
        checksum=None if reply.get("checksum") == _NO_CHECKSUM else reply.get("checksum"),
    )


def delete_request(key: Key) -> Request:
    """``delete`` of ``key`` (checked), which changes it."""
    check_any_key(key)
    return Request("delete", {"key": key}, (as_text(key),))


def rename_request(from_key: Key, to_key: Key) -> Request:
    """``rename`` of ``from_key`` to ``to_key`` (checked, ``to_key`` as a key to create), which changes both."""
    check_any_key(from_key)
    check_key(to_key)
    return Request("rename", {"from_key": from_key, "to_key": to_key}, (as_text(from_key), as_text(to_key)))


def update_class_request(key: Key, cls: str) -> Request:
    """``updateclass`` of ``key`` (checked) to class ``cls``."""
    check_any_key(key)
    return Request("updateclass", {"key": key, "class": cls})


def list_keys_request(prefix: Key = "", after: Key | None = None, limit: int | None = None) -> Request:
    """``list_keys`` starting with ``prefix``, after ``after``; a ``ValueError`` for a ``limit``
    below 1, which mogilefsd would read as 1000 (0) or as no limit at all (a negative one)."""
    for what, text in (("prefix", prefix), ("after", after)):
        if text:
            key_bytes(text, what)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a whole number >= 1 (the tracker gives 1000 at most), not {limit!r}")
    return Request("list_keys", {"prefix": prefix or None, "after": after, "limit": limit}, read=keys_page_of)


def keys_prefix(prefix: Key | None) -> str:
    """The ``prefix`` of :meth:`Client.keys` as text (bytes may end inside a character); ``None``,
    which ``list_keys`` and pymogile take for no prefix, is none."""
    if prefix is None:
        return ""
    if not isinstance(prefix, (str, bytes)):
        raise TypeError(f"a prefix is a str or bytes, not {type(prefix).__name__}")
    return to_text(key_bytes(prefix, "prefix"))


def keys_page_of(reply: Reply) -> tuple[list[str], str | None]:
    """The keys of a ``list_keys`` reply and the ``after`` value of the next page."""
    return [reply[f"key_{n}"] for n in range(1, reply.number("key_count") + 1)], reply.get("next_after")


#: What a Perl regular expression reads as more than itself: mogilefsd 2.73 refuses an ``after``
#: that does not match ``/^$prefix/``, the prefix unescaped (``cmd_list_keys``).
_PERL_METACHARACTERS = re.compile(r"[\\.^$|?*+()\[\]{}]")


#: A last character that a key may go on with more bytes: SQLite reads a byte from 0xC0 up and
#: every continuation byte (0x80 to 0xBF) after it as one character.
_OPEN_LAST_CHARACTER = re.compile(rb"[\xc0-\xff][\x80-\xbf]*\Z")


def _bytewise_prefix(prefix: str) -> str:
    """``prefix`` without such a last character (``b"mc/\\xc3"``, the start of "é"; "é" too, which a
    key that is not UTF-8 may follow with ``\\x80``): a tracker on SQLite reads a ``LIKE``
    pattern as UTF-8, and would match no key going on with it."""
    return to_text(_OPEN_LAST_CHARACTER.sub(b"", to_bytes(prefix)))


def listed_prefix(prefix: str) -> str:
    """The prefix :meth:`Client.keys` lists its second and later pages by: ``prefix`` up to its
    first regular expression metacharacter, so that the tracker takes their ``after``, and
    without a last character an SQLite tracker would not match (:func:`_bytewise_prefix`)."""
    return _PERL_METACHARACTERS.split(_bytewise_prefix(prefix), 1)[0]


def first_page(prefix: str) -> tuple[str, str | None]:
    """The prefix and the ``after`` :meth:`Client.keys` lists its first page by: ``prefix`` itself;
    or, when an SQLite tracker would not match it, :func:`listed_prefix` after ``prefix`` with its
    last byte one less, below every key starting with ``prefix`` and above most keys that do not
    (a tracker comparing keys as text, MySQL's, may place the key equal to the prefix no later
    than that ``after``: :meth:`Client.keys` asks for it alone)."""
    if _bytewise_prefix(prefix) == prefix:
        return prefix, None
    raw = to_bytes(prefix)  # ends with a byte from 0x80 up: one less is still a byte
    return listed_prefix(prefix), to_text(raw[:-1] + bytes([raw[-1] - 1]))


class NextPage(NamedTuple):
    """Where a listing in byte order goes on after a page: the ``after`` of the next page (``None``
    when none follows), and a key that page passes over, to ask for alone (``None`` when none)."""

    after: str | None
    passed: str | None = None


def next_page(prefix: str, listed: str, page: list[str]) -> NextPage:
    """Where the listing by ``listed`` goes on after the full ``page``, its keys in byte order.

    Those that start with ``prefix`` come together (a key that is not UTF-8 holds surrogates, which
    Python would sort elsewhere: bytes are compared), so a page that ends past them ends the
    listing. The tracker matches ``listed`` whatever its case (SQL ``LIKE``), so a page may also
    end on a key that does not start with ``listed`` exactly, before those that do. The listing
    goes on from below the prefix's keys: from ``listed`` itself, which passes over a key equal to
    it, or, when ``listed`` is the prefix cut short, from the prefix without its last character,
    which skips the keys between the cut and it."""
    last = page[-1]
    raw_last, raw_prefix, raw_listed = to_bytes(last), to_bytes(prefix), to_bytes(listed)
    if raw_last > raw_prefix and not raw_last.startswith(raw_prefix):
        return NextPage(None)
    below = prefix[:-1] if listed != prefix else None  # below every key starting with the prefix
    if raw_last.startswith(raw_listed):
        return NextPage(last if below is None else max(last, below, key=to_bytes))
    if raw_last < raw_listed:
        return NextPage(listed, listed) if below is None else NextPage(below)
    return NextPage(None)


class KeyListing:
    """Where :meth:`Client.keys` stands in its listing of the keys that start with ``prefix``: the
    ``list_keys`` to ask next (by ``listed``, after ``after``) until ``done``, and the keys of
    each page to give.

    mogilefsd pages by ``dkey > after ORDER BY dkey`` in its database's order: bytes on SQLite,
    the column's collation on MySQL, which ignores case, so that keys in another case come among
    the prefix's own. Pages are read in byte order until one shows otherwise (a key at or below one
    listed before); from then on each goes on from the last key of the page before, spelled as
    ``listed`` is: mogilefsd requires ``after`` to start so, and the collation reads it as that key.
    A page in byte order too that ends on a key in another case past the prefix's in bytes would
    end a listing in byte order: the page after that key so spelled, by the same prefix, tells the
    orders apart first.
    """

    def __init__(self, prefix: str, page_size: int) -> None:
        self.prefix, self._raw_prefix, self._page_size = prefix, to_bytes(prefix), page_size
        self.listed, self.after = first_page(prefix)
        self.done = False
        self._collated = False
        self._highest = b""  # the highest key listed so far, as bytes
        self._telling: set[str] | None = None  # the page before a page that tells the orders apart
        self._asked = {(self.listed, self.after)}  # one request a page: a tracker repeating pages is told

    def take(self, page: list[str]) -> tuple[list[str], str | None]:
        """The keys of ``page`` that start with the prefix, and a key the listing passes over, to
        ask for alone (``None`` when none); the next request is set."""
        asked_by, asked_after = self.listed, self.after
        if self._telling is not None:  # see _tell_orders_apart
            before, self._telling = self._telling, None
            if not page or page[0] in before:
                self.done = True
                return [], None
            self._collated = True
        raw = [to_bytes(key) for key in page]
        self._collated = self._collated or any(earlier >= later for earlier, later in zip([self._highest, *raw], raw))
        self.listed = listed_prefix(self.prefix)
        passed = None
        if len(page) < self._page_size:
            self.done = True
        elif self._collated:
            self.after = self._collated_after(page[-1])
        else:
            self.after, passed = next_page(self.prefix, self.listed, page)
            self.done = self.after is None
            if self.done:
                self._tell_orders_apart(page, asked_by, asked_after)
        if not self.done:
            if (self.listed, self.after) in self._asked:  # a listing that would never end
                raise ProtocolError(f"the tracker's pages of the keys starting with {self.prefix!r} do not move on: "
                                    f"the keys after {self.after!r} were asked for already")
            self._asked.add((self.listed, self.after))
        self._highest = max([self._highest, *raw])
        return [key for key, raw_key in zip(page, raw) if raw_key.startswith(self._raw_prefix)], passed

    def _tell_orders_apart(self, page: list[str], asked_by: str, asked_after: str | None) -> None:
        """Ask after the last key of ``page`` (asked by the prefix ``asked_by``, after
        ``asked_after``), which ends a listing in byte order, spelled as the prefix is (as
        ``listed`` when it does not start with the prefix in any case): in byte order, the keys
        after that spelling, by the same prefix and not below ``asked_after``, begin with keys of
        this page; in a collation, with keys after all of them. The whole prefix a first page may
        be asked by is no ``after``'s mogilefsd takes."""
        last = page[-1]
        spelling = self.prefix if last[:len(self.prefix)].lower() == self.prefix.lower() else self.listed
        after = spelling + last[len(spelling):]
        if asked_by == self.listed and after != last and to_bytes(asked_after or "") <= to_bytes(after):
            self.after, self.done, self._telling = after, False, set(page)

    def kept(self, stored: str | None) -> str | None:
        """``stored``, a key as stored, if it starts with the prefix."""
        return stored if stored is not None and to_bytes(stored).startswith(self._raw_prefix) else None

    def _collated_after(self, key: str) -> str:
        """``key``, a key the tracker matched to ``listed`` whatever its case, spelled as ``listed``."""
        return self.listed + key[len(self.listed):]


#: Held while a client's change listeners are replaced (by middlewares made in several threads).
_LISTENERS_LOCK = threading.Lock()
new_lock_in_child(globals(), "_LISTENERS_LOCK")


class _Default(float):
    """The default of a client's tracker option: the number, told apart from one given (refused
    beside a ``pool``, which has its own)."""

    __slots__ = ()


class ClientBase:
    """What :class:`Client` and :class:`~mogile_middleware.async_client.AsyncClient` share: the
    arguments, the tracker pool (of the class ``pool_class``) and the change listeners (see
    :class:`Client` for the arguments)."""

    pool_class: type[TrackerPoolBase]
    #: Whether listeners that are coroutine functions are awaited (the asyncio client's are).
    awaits_listeners = False
    #: Keys asked for per ``list_keys`` request of :meth:`keys`: the most a tracker gives at once.
    keys_page = 1000

    def __init__(
        self,
        domain: str,
        trackers: str | Iterable[str | Address] = (),
        *,
        connect_timeout: float = _Default(1.0),
        io_timeout: float = _Default(5.0),
        dead_seconds: float = _Default(5.0),
        storage_timeout: float = 10.0,
        pool: TrackerPoolBase | None = None,
        on_change: ChangeListener | None = None,
        cache_backend: CacheBackend | None = None,
    ) -> None:
        if not domain:
            raise ValueError("a MogileFS domain is required")
        if not isinstance(domain, str) or has_control_character(domain):
            raise ValueError(f"domain must be a domain's name, not {domain!r}")
        if pool is not None and not isinstance(pool, self.pool_class):
            raise ValueError(f"pool must be a {self.pool_class.__name__}, or None, not {pool!r}")
        if pool is not None:
            _refuse_beside_pool(pool, trackers, connect_timeout=connect_timeout, io_timeout=io_timeout,
                                dead_seconds=dead_seconds)
        if cache_backend is not None and not is_cache_backend(cache_backend):
            raise ValueError(f"cache_backend must be an object with get, set and delete (a CacheBackend, such as "
                             f"MemcachedBackend), or None, not {cache_backend!r}")
        self.domain = domain
        self.pool = pool or self.pool_class(trackers, **{  # plain numbers, whether given or not
            name: float(value) if isinstance(value, _Default) else value for name, value in
            [("connect_timeout", connect_timeout), ("io_timeout", io_timeout), ("dead_seconds", dead_seconds)]})
        self.storage_timeout = checked_seconds("storage_timeout", storage_timeout)
        self.cache_backend = cache_backend
        self._change_listeners: tuple[ChangeListener, ...] = ()
        if on_change is not None:
            self.add_change_listener(on_change)
        if cache_backend is not None:
            self.add_change_listener(functools.partial(self._drop_shared_entry, cache_backend))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of domain {self.domain!r} via {self.pool!r}>"

    def add_change_listener(self, listener: ChangeListener) -> None:
        """Call ``listener`` with every key this client writes, renames or deletes, also when the
        tracker's answer was lost (the key may have changed). A listener that raises is logged;
        a :class:`WeakListener` whose object is gone is dropped."""
        if not callable(listener):
            raise TypeError(f"a change listener is a function of the key, not {listener!r}")
        function = listener.method if isinstance(listener, WeakListener) else listener
        if inspect.iscoroutinefunction(function) and not self.awaits_listeners:
            raise TypeError(f"{type(self).__name__} calls its change listeners without awaiting them: "
                            f"{function!r} is a coroutine function (the asyncio client awaits them)")
        with _LISTENERS_LOCK:  # a new tuple, which _changed reads as a snapshot: none added meanwhile is lost
            self._change_listeners = (*(kept for kept in self._change_listeners if not gone(kept)), listener)

    def _changed(self, *keys: str | bytes) -> list[Awaitable[None]]:
        """Tell every change listener that ``keys`` were (or may have been) written, renamed or
        deleted, each as text, as the path caches hold keys (a key given as bytes too). What a
        coroutine function among them started is returned, for the asyncio client to await (a
        blocking client's listeners are plain functions)."""
        started = []
        for key in (key if isinstance(key, str) else to_text(key) for key in keys):
            for listener in self._change_listeners:
                try:
                    result = listener(key)
                except Exception as error:  # the write is done: a listener must not hide its outcome
                    _listener_failed(listener, key, error)
                else:
                    if inspect.isawaitable(result):
                        started.append(_awaited(result, listener, key))
        return started

    def _drop_shared_entry(self, backend: CacheBackend, key: str) -> None:
        """Delete ``key``'s paths from a shared path cache, for every process and host that reads it;
        a failure is logged (the write stands, and the entry expires in its time)."""
        try:
            backend.delete(entry_key(self.domain, key))
        except Exception as error:
            log.warning("could not drop %r from the shared path cache, whose readers may use its old paths until "
                        "they expire: %r", key, error)

    def _args(self, request: Request) -> dict[str, ArgValue]:
        return {"domain": self.domain, **request.args}


class WeakListener:
    """A change listener calling ``method`` while its object lives, without keeping it alive: a
    middleware made for a while on a client shared for longer (by an application factory, a test
    suite, Django's shared clients) goes with its path cache when dropped. Then it does nothing."""

    def __init__(self, method: Callable[[str], Any]) -> None:
        self._method = weakref.WeakMethod(method)
        self._name = repr(method)

    @property
    def method(self) -> Callable[[str], Any] | None:
        """The method, or None once its object is gone."""
        return self._method()

    def __call__(self, key: str) -> Any:
        method = self._method()
        return None if method is None else method(key)

    def __repr__(self) -> str:
        return f"<WeakListener of {self._name}{', gone' if gone(self) else ''}>"


def gone(listener: object) -> bool:
    """True for a :class:`WeakListener` whose object is gone: a listener to drop."""
    return isinstance(listener, WeakListener) and listener.method is None


def _listener_failed(listener: ChangeListener, key: str, error: Exception) -> None:
    log.warning("change listener %r failed for key %r: %r", listener, key, error)


async def _awaited(started: Awaitable[Any], listener: ChangeListener, key: str) -> None:
    """What a coroutine function listener started, awaited; its failure logged."""
    try:
        await started
    except Exception as error:
        _listener_failed(listener, key, error)


def _refuse_beside_pool(pool: TrackerPoolBase, trackers: object, **options: float) -> None:
    """A ValueError naming the tracker options given with a shared ``pool`` (whatever their
    value), which the pool's own would override in silence."""
    given = ["trackers"] * bool(trackers) + [name for name, value in options.items() if not isinstance(value, _Default)]
    if given:
        raise ValueError(f"{', '.join(given)}: the given pool has its own; set them on its {type(pool).__name__}")


class Client(ClientBase):
    """A MogileFS client for one domain.

    :param domain: the MogileFS domain every key belongs to.
    :param trackers: ``"host:port"`` strings (or one whitespace/comma-separated string).
    :param connect_timeout: seconds for a TCP connect to a tracker.
    :param io_timeout: seconds to wait for a tracker's reply.
    :param dead_seconds: how long a tracker that failed is skipped; then a ``noop`` asks whether it is back.
    :param storage_timeout: seconds for connects and reads on storage nodes.
    :param pool: a :class:`TrackerPool` to share, which has its trackers and the three tracker
        options (given here too, they are a ``ValueError``).
    :param on_change: the first change listener (see :meth:`add_change_listener`).
    :param cache_backend: a path cache shared with the middleware of other processes and hosts
        (e.g. :class:`~mogile_middleware.memcache.MemcachedBackend`): every key this client
        changes is deleted from it.
    """

    pool_class = TrackerPool
    pool: TrackerPool

    @functools.cached_property
    def _uploader(self) -> Uploader:
        """The uploader of store_file and store_content: each file's MD5 goes with it, checked by
        the tracker only when the call asks (``verify_checksum``), so no class is looked up."""
        return Uploader(self, verify_checksums=False)

    def _ask(self, request: Request) -> Any:
        """``request``'s reply, as it reads it."""
        try:
            with named_errors(request.args, self.domain):
                return self.pool.request(request.command, self._args(request), request.read)[0]
        finally:
            self._changed(*request.changes)

    def get_paths(self, key: Key, noverify: bool = True, zone: str | None = None, pathcount: int = 2) -> list[str]:
        """The URLs of the key's replicas, in the tracker's order (try them in that order):
        ``pathcount`` at most, but 2 at least, as mogilefsd lists them."""
        return self._ask(get_paths_request(key, noverify, zone, pathcount))

    def file_info(self, key: Key) -> FileInfo:
        """The key's fid, length, class and replica count."""
        return self._ask(file_info_request(key))

    def new_file(self, key: Key, cls: str | None = None, *, size: int | None = None, checksum: bool = True,
                 verify_checksum: bool = False) -> NewFile:
        """A writable file for ``key``; the key points at the bytes once it is closed.

        ``checksum=False`` sends no MD5 checksum (the tracker still checks the size);
        ``verify_checksum`` asks the tracker to check the stored file's MD5 before committing.
        """
        return NewFile(self.pool, self.domain, as_text(key), cls, size=size, checksum=checksum,
                       verify_checksum=verify_checksum, storage_timeout=self.storage_timeout,
                       on_change=self._changed)

    def store_file(self, key: Key, fileobj: BinaryIO | bytes | bytearray | memoryview | Iterable[bytes],
                   cls: str | None = None, *, verify_checksum: bool = False, size: int | None = None) -> int:
        """Store the rest of ``fileobj`` (a file opened in binary mode), bytes, or every chunk of an
        iterable under ``key``; return the number of bytes stored.

        A seekable ``fileobj`` is sent again to the next storage node if one drops the PUT.
        ``verify_checksum`` asks the tracker to check the stored file's MD5 before committing,
        whatever the class. ``size`` is the number of bytes the body must hold: give a WSGI
        request's ``Content-Length`` with ``wsgi.input``, which a server may end short without an
        error when the client leaves (see :meth:`.Uploader.upload`). A path is refused (``TypeError``), as by
        :meth:`AsyncClient.store_file <mogile_middleware.async_client.AsyncClient.store_file>`: text
        passed on from a request is never read as a local file. :class:`~.upload.Uploader` opens paths.
        """
        key = as_text(key)
        path = isinstance(fileobj, (str, os.PathLike))
        if path or not sendable(fileobj):
            raise TypeError(f"store_file of {key!r} takes bytes, a file opened in binary mode or an iterable of "
                            f"bytes, not {type(fileobj).__name__}" + (" (Uploader.upload opens a path)" if path else ""))
        return self._uploader.upload(key, fileobj, cls, verify_checksum=verify_checksum, size=size)

    def store_content(self, key: Key, data: bytes, cls: str | None = None) -> int:
        """Store ``data`` (bytes) under ``key``; return the number of bytes stored."""
        key = as_text(key)
        return self._uploader.upload(key, content_bytes(key, data), cls)

    def current_version(self, key: Key, pathcount: int = 2) -> tuple[list[str], FileInfo]:
        """The replica URLs of ``key`` (``pathcount`` at most, as :meth:`get_paths`) and its
        :meth:`file_info`, of the same version: both asked again once when the paths name another
        fid (:func:`same_version`)."""
        paths, info = self.get_paths(key, pathcount=pathcount), self.file_info(key)
        if not same_version(paths, info):
            paths, info = self.get_paths(key, pathcount=pathcount), self.file_info(key)
        return of_version(key, paths, info), info

    def read_file(self, key: Key) -> ReplicaResponse:
        """A streaming, closeable file object over the first replica that answers of the length
        the tracker records: one cut short on its disk is passed over (:meth:`current_version`)."""
        paths, info = self.current_version(key)
        return open_replica(paths, size=info.length, timeout=self.storage_timeout)

    def get_file_data(self, key: Key) -> bytes:
        """The whole content of ``key`` (for small files; use :meth:`read_file` to stream), from a
        replica of the length the tracker records, and the next when a transfer is cut midway."""
        paths, info = self.current_version(key)
        return read_replica(paths, length=info.length, timeout=self.storage_timeout)

    def delete(self, key: Key) -> None:
        """Delete ``key`` (raises :class:`UnknownKeyError` if it does not exist)."""
        self._ask(delete_request(key))

    def rename(self, from_key: Key, to_key: Key) -> None:
        """Rename ``from_key`` to ``to_key`` (raises :class:`KeyExistsError` if that exists)."""
        self._ask(rename_request(from_key, to_key))

    def update_class(self, key: Key, cls: str) -> None:
        """Move ``key`` to class ``cls`` (the tracker then adjusts its replica count)."""
        self._ask(update_class_request(key, cls))

    def list_keys(self, prefix: Key = "", after: Key | None = None, limit: int | None = None) -> list[str]:
        """Up to ``limit`` (at most 1000) keys starting with ``prefix`` whatever its case (the
        tracker's SQL ``LIKE``; :meth:`keys` matches it exactly), after ``after``, in the tracker's
        order (bytes on SQLite, the column's collation on MySQL)."""
        return self._list_page(prefix, after, limit)[0]

    def _list_page(self, prefix: Key, after: Key | None, limit: int | None) -> tuple[list[str], str | None]:
        try:
            return self._ask(list_keys_request(prefix, after, limit))
        except NoneMatchError:
            return [], None

    def keys(self, prefix: Key | None = "") -> Iterator[str]:
        """Every key starting with ``prefix`` (text or bytes; exactly, unlike ``list_keys``), page by page."""
        prefix = keys_prefix(prefix)
        listing = KeyListing(prefix, self.keys_page)
        alone = listing.kept(self._stored(prefix)) if listing.after is not None else None  # see first_page
        if alone is not None:
            yield alone
        while not listing.done:
            found, passed = listing.take(self._list_page(listing.listed, listing.after, self.keys_page)[0])
            yield from (key for key in found if key != alone)
            stored = None if passed is None else listing.kept(self._stored(passed))
            if stored is not None and stored != alone:
                yield stored

    def _stored(self, key: str) -> str | None:
        """The key the tracker finds for ``key``, as stored (on MySQL, maybe in another case), or None."""
        try:
            return self._ask(stored_key_request(key))
        except (UnknownKeyError, BadKeyError):  # BadKeyError: a prefix no key could equal
            return None

    def close(self) -> None:
        """Close the kept-open tracker connections and the process's idle storage node connections
        (those in use close as their responses do), as :meth:`AsyncClient.aclose
        <mogile_middleware.async_client.AsyncClient.aclose>` does the event loop's."""
        self.pool.close()
        nodes.close()


class Admin:
    """Administrative tracker commands: domains and classes (what ``mogadm domain`` and ``mogadm
    class`` do) on ``trackers`` (as :class:`Client` takes them) or a shared ``pool``, not both.
    Names and counts are checked before anything is sent; the tracker's refusals name the domain
    and the class they are about."""

    def __init__(self, trackers: str | Iterable[str | Address] = (), *, pool: TrackerPool | None = None) -> None:
        if pool is not None and not isinstance(pool, TrackerPool):
            raise ValueError(f"pool must be a TrackerPool, or None, not {pool!r}")
        if pool is not None:
            _refuse_beside_pool(pool, trackers)
        self.pool = pool or TrackerPool(trackers)

    def __repr__(self) -> str:
        return f"<Admin via {self.pool!r}>"

    def create_domain(self, domain: str) -> None:
        """Create ``domain`` (raises :class:`DomainExistsError` if it exists)."""
        self._ask("create_domain", {"domain": _admin_name("domain", domain)})

    def delete_domain(self, domain: str) -> None:
        """Delete ``domain``, which must hold no files and no classes but ``default``."""
        self._ask("delete_domain", {"domain": _admin_name("domain", domain)})

    def create_class(self, domain: str, cls: str, mindevcount: int, *, hashtype: str | None = None,
                     replpolicy: str | None = None) -> None:
        """Create class ``cls`` in ``domain`` keeping ``mindevcount`` replicas (``hashtype="MD5"``
        makes the tracker keep checksums; ``replpolicy``, as ``mogadm class add --replpolicy``,
        places them otherwise than the tracker's default, ``MultipleHosts()``)."""
        self._ask("create_class", _class_args(domain, cls, mindevcount, hashtype, replpolicy))

    def update_class(self, domain: str, cls: str, mindevcount: int, *, hashtype: str | None = None,
                     replpolicy: str | None = None) -> None:
        """Set the ``mindevcount`` of class ``cls`` in ``domain`` (and its ``hashtype`` and
        ``replpolicy``, if given)."""
        self._ask("update_class", _class_args(domain, cls, mindevcount, hashtype, replpolicy))

    def delete_class(self, domain: str, cls: str) -> None:
        """Delete class ``cls`` of ``domain``, which must hold no files (never ``default``)."""
        self._ask("delete_class", {"domain": _admin_name("domain", domain), "class": _admin_name("class", cls)})

    def get_domains(self) -> dict[str, dict[str, int]]:
        """Every domain with its classes and their ``mindevcount``."""
        domains = self.pool.request("get_domains", None, parse_domains)[0]
        return {domain: {cls: mindevcount for cls, (mindevcount, _) in classes.items()}
                for domain, classes in domains.items()}

    def close(self) -> None:
        """Close the kept-open tracker connection, as :meth:`Client.close` does."""
        self.pool.close()

    def _ask(self, command: str, args: dict[str, ArgValue]) -> None:
        with named_errors(args, str(args["domain"])):
            self.pool.request(command, args)


#: The largest ``mindevcount``: MogileFS's schema keeps it in a ``TINYINT UNSIGNED``.
MAX_MINDEVCOUNT = 255


def _admin_name(what: str, name: object) -> str:
    """A domain or class name to send: text of UTF-8 without control characters (a NUL or a
    newline makes a name no tool shows or asks for whole)."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be text, not {type(name).__name__}")
    refused = ValueError(f"{what} must be a name without control characters, not {name!r}")
    if not name or has_control_character(name):
        raise refused
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: the escape of a byte that is not UTF-8
        raise refused from None
    return name


def _class_args(domain: str, cls: str, mindevcount: int, hashtype: str | None,
                replpolicy: str | None) -> dict[str, ArgValue]:
    """The arguments of ``create_class`` and ``update_class``, checked."""
    if isinstance(mindevcount, bool) or not isinstance(mindevcount, int) or not 1 <= mindevcount <= MAX_MINDEVCOUNT:
        raise ValueError(f"mindevcount must be a whole number from 1 to {MAX_MINDEVCOUNT}, not {mindevcount!r}")
    if hashtype is not None and not isinstance(hashtype, str):
        raise TypeError(f"hashtype must be text such as 'MD5', not {type(hashtype).__name__}")
    return {"domain": _admin_name("domain", domain), "class": _admin_name("class", cls), "mindevcount": mindevcount,
            "hashtype": hashtype,
            "replpolicy": None if replpolicy is None else _admin_name("replpolicy", replpolicy)}
