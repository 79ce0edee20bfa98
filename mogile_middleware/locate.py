"""Locating a key: its replica URLs, length, ETag and type, through the path cache and the trackers.

A :class:`Location` holds only facts about one version of a file (what a browser is told about
it is the responders' business). MogileFS gives every overwrite
a new fid, so the fid names the version: it is the strong ETag. The :class:`Locator` keeps
locations in the path cache, each for as long as it can be trusted: a file still short of its
class's copies (a real tracker replicates in the background) or a key that does not exist
only for a few seconds; and it looks a key up anew when the cached replicas turn out to be gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .cache import AsyncPathCache, CacheBackend, PathCache, entry_key
from .client import Client, WeakListener
from .exceptions import KeyChangingError, MogileFSError, StorageError, TrackerUnavailableError, UnknownKeyError
from .protocol import fid_of, parse_domains
from .tracker import is_url_authority

log = logging.getLogger("mogile_middleware")

T = TypeVar("T")

_URL_SAFE = re.compile(r"[!-~]+")  # printable ASCII, no blank

#: How many replica URLs are asked of the tracker: enough for failover.
PATH_COUNT = 2
#: The longest replica URL taken from a tracker (mogstored's are about 60 characters).
MAX_REPLICA_URL = 2048
#: Seconds the copy counts of the domain's classes are reused before being asked again.
CLASSES_SECONDS = 300.0
#: Seconds the trackers are not asked the classes again after they could not say: meanwhile a
#: lookup costs no failing request more, and logs nothing more.
CLASSES_RETRY_SECONDS = 10.0
#: Seconds waited before each new ask about a key caught mid-overwrite. mogilefsd's ``create_close``
#: drops the old file before it records the new one, in separate statements, so meanwhile the key is
#: unknown (measured on MogileFS 2.73 with SQLite: a median of 9 ms, up to 0.2 s, and up to 1.1 s
#: under 30 overwrites a second); a key that existed a moment ago is asked again over 0.8 s.
SETTLING_PAUSES = (0.02, 0.08, 0.2, 0.5)
#: Seconds a key seen changing still counts as existing (see :meth:`Locator._lookup_steps`): found
#: changing by a lookup, written by the middleware's client, or marked changed in a shared cache.
CHANGING_SECONDS = 10.0
#: Seconds a location the trackers confirmed is taken as the key's for an answer that names the
#: version (412, 416) without asking them again (see :meth:`Locator._confirmed_steps`).
CONFIRMED_SECONDS = 1.0
#: Keys remembered as changed, at most (then all are forgotten).
CHANGING_KEYS = 1000


class Location:
    """Where one version of a key's bytes are: replica URLs, ETag, length. Made once, never changed.

    ``complete`` is False while the file has fewer copies than its class keeps (and than
    :data:`PATH_COUNT`); ``length`` is ``None`` when it was not needed. ``memo`` lets responders
    keep what they derive from the location (their headers) beside it (:meth:`remember`); it is
    not a fact. A path cache holds many: the URLs are kept as one string and ``memo`` is made on
    first use, which saves about 170 bytes per entry.
    """

    __slots__ = ("key", "urls", "etag", "length", "complete", "memo")

    def __init__(self, key: str, paths: Sequence[str], etag: str, length: int | None = None,
                 complete: bool = True) -> None:
        if any(" " in path for path in paths):
            raise ValueError(f"a replica URL with a blank: {paths!r}")
        self.key = key
        #: The replica URLs, in order, separated by one blank (as ``X-REPROXY-URL`` lists them).
        self.urls = " ".join(paths)
        self.etag = etag
        self.length = length
        self.complete = complete
        self.memo: dict[Any, Any] | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        """The replica URLs, in order."""
        return tuple(self.urls.split(" ")) if self.urls else ()

    def remember(self, owner: object, value: T) -> T:
        """Keep ``value`` in :attr:`memo` under ``owner``, and return it."""
        if self.memo is None:
            self.memo = {}
        self.memo[owner] = value
        return value

    def with_length(self, length: int) -> Location:
        """The same version with its ``length`` (and a memo of its own)."""
        return Location(self.key, self.paths, self.etag, length, self.complete)

    def _facts(self) -> tuple[Any, ...]:
        # Not the length: the version's (a fid's bytes never change), known or not. A copy given
        # it to be served was taken, when its replicas failed, for newer paths than those cached.
        return self.key, self.urls, self.etag, self.complete

    def __eq__(self, other: object) -> bool:
        return self._facts() == other._facts() if isinstance(other, Location) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._facts())

    def __repr__(self) -> str:
        return (f"Location(key={self.key!r}, paths={self.paths!r}, etag={self.etag!r}, length={self.length!r}, "
                f"complete={self.complete!r})")

    def __reduce__(self) -> tuple[Any, ...]:
        # A shared cache keeps the facts only, never what one process derived from them.
        return Location, (self.key, self.paths, self.etag, self.length, self.complete)


def etag_for(paths: tuple[str, ...], fid: int | None = None) -> str:
    """A strong ETag naming this version of the file: its fid, read from a replica's path; of
    paths not shaped like mogstored's, the set of its URLs and the ``fid`` the tracker gave (URLs
    that name the key alone are the same for every version)."""
    named = fid_of(paths[0]) if paths else None
    if named is not None:
        return f"fid-{named}"
    return "paths-" + hashlib.sha1(" ".join([*sorted(paths), f"fid={fid}"]).encode()).hexdigest()[:16]


class Locator:
    """key → :class:`Location` through a :class:`PathCache` and the client's trackers.

    :param client: asks the trackers (``get_paths``, and ``file_info`` for the length or when a
        file may still be replicating).
    :param with_length: always learn the length (needed whenever a body may be served).
    :param path_cache_seconds: how long a complete location is reused.
    :param path_cache_entries: the size of the in-process cache (when ``cache_backend`` is none).
    :param replicating_seconds: how long a location short of its copies is reused.
    :param missing_seconds: how long "no such key" is reused (0: never).
    """

    path_cache_class: type[PathCache[Any]] = PathCache

    def __init__(self, client: Client, *, with_length: bool, cache_backend: CacheBackend | None = None,
                 path_cache_seconds: float = 10.0, path_cache_entries: int = 10_000,
                 replicating_seconds: float = 2.0, missing_seconds: float = 3.0,
                 stale_seconds: float = 300.0) -> None:
        self.client = client
        self.with_length = with_length
        self._seconds = path_cache_seconds
        self._replicating_seconds = min(replicating_seconds, path_cache_seconds)
        self._missing_seconds = min(missing_seconds, path_cache_seconds)
        # A backend of its own holds this domain's keys only: as they are, each shared with its location.
        self._entry_prefix = "" if cache_backend is None else entry_key(client.domain, "")
        self._copies: dict[str, int] = {}
        self._copies_until = 0.0
        self._classes_retry_at = 0.0
        self._changed: dict[str, float] = {}  # cache entry -> when its key was last seen changing
        self.paths: PathCache[Location | None] = self.path_cache_class(
            self._lookup, backend=cache_backend, ttl_seconds=path_cache_seconds, stale_seconds=stale_seconds,
            max_entries=path_cache_entries, ttl_for=self._seconds_for, on_change=self._note_changed,
        )
        client.add_change_listener(WeakListener(self.changed))

    def locate(self, key: str) -> Location:
        """The location of ``key``; raises :class:`UnknownKeyError`, or the tracker's errors."""
        entry = self._entry_prefix + key
        location = self.paths.get(entry)
        if location is None:  # (_found, inlined: this is the hot path)
            raise UnknownKeyError("unknown_key", key)
        if location.key != key:  # a shared cache's entry for another key
            return _found(self.paths.refresh(entry, _foreign(location, key)), key)
        return location

    def relocate(self, outdated: Location) -> Location:
        """The location of ``outdated.key`` asked of the trackers again, because the replicas of
        ``outdated`` failed: after an outside overwrite or delete they are gone."""
        return _found(self.paths.refresh(self._entry_prefix + outdated.key, outdated), outdated.key)

    def with_length_of(self, location: Location) -> Location:
        """``location`` with its length, asked of the trackers when it was located without one."""
        return location if location.length is not None else self.confirmed(location)

    def confirmed(self, location: Location) -> Location:
        """``location`` confirmed (see :meth:`_confirmed_steps`): an answer that names the version,
        as a 412 or a 416 does, must not name an old one."""
        return run_steps(self._confirmed_steps(location), self._call)

    def cache_key(self, key: str) -> str:
        """The key under which the path cache's backend keeps the location of ``key``."""
        return self._entry_prefix + key

    def forget(self, key: str) -> None:
        """Drop the cached location of ``key`` (it was written, renamed or deleted)."""
        self.paths.invalidate(self.cache_key(key))

    def changed(self, key: str) -> None:
        """The listener of the client's changes: :meth:`forget`."""
        self.forget(key)

    def _seconds_for(self, location: Location | None) -> float:
        if location is None:
            return self._missing_seconds
        return self._seconds if location.complete else self._replicating_seconds

    def _lookup(self, entry: str, previous: Location | None) -> Location | None:
        return run_steps(self._lookup_steps(entry, previous), self._call)

    def _call(self, name: str, *args: Any) -> Any:
        """One call a step asks for: ``get_paths``, ``file_info``, ``classes``, ``relocate`` or ``pause``."""
        if name == "classes":
            return self.client.pool.request("get_domains", None, parse_domains)[0]
        if name == "pause":
            return time.sleep(*args)
        if name == "relocate":
            return self.relocate(*args)
        return getattr(self.client, name)(*args)

    def _confirmed_steps(self, location: Location) -> Steps[Location]:
        """``location`` with its length once ``file_info`` names its version, else the key located
        anew until ``file_info`` names the version found (:class:`KeyChangingError` if it kept
        changing). A location confirmed in the last :data:`CONFIRMED_SECONDS` is taken as it is:
        requests that a client makes refused at will cost a tracker call per key and second at
        most. While no tracker answers, one with its length stays as it is, as cached paths are
        served."""
        if _confirmed_lately(location):
            return location
        for _ in range(3):
            try:
                info = yield ("file_info", location.key)
            except UnknownKeyError:  # deleted, or amid an overwrite: relocating tells which
                info = None
            except TrackerUnavailableError:
                if location.length is None:
                    raise
                return location
            if info is None or not _names_version(location, info.fid):
                # Maybe the paths another request found: asked again unless they name this version.
                location = yield ("relocate", location)
            if info is not None and _names_version(location, info.fid):
                if location.length is None:
                    location = location.with_length(info.length)
                location.remember(_CONFIRMED, time.monotonic())
                return location
        raise KeyChangingError(f"{location.key!r} kept changing while its version was confirmed")

    def _lookup_steps(self, entry: str, previous: Location | None) -> Steps[Location | None]:
        """The lookup of a cache entry's key, as the calls it needs (see :func:`run_steps`).

        A key caught mid-overwrite (it existed a moment ago, changed between two answers, or was
        seen changing in the last :data:`CHANGING_SECONDS`: through a lookup, a write of the
        client, another process's mark in a shared cache) is asked again after each of the
        :data:`SETTLING_PAUSES`, and once more at once if it was changing at the last; a key
        never seen is missing at once.
        """
        key = entry[len(self._entry_prefix):]
        existed = previous is not None and previous.key == key or self._changed_lately(entry)
        pauses = iter(SETTLING_PAUSES)
        listed_no_replica = asked_at_once = False
        while True:
            try:
                location = yield from self._ask_steps(key)
            except UnknownKeyError:
                if not existed:
                    return None
                changing = False
            except StorageError:  # no live replica listed: a tracker can say so amid an overwrite
                if listed_no_replica:
                    raise
                listed_no_replica = True
                continue
            else:
                if location is not None:
                    return location
                existed = changing = True  # it changed between two answers: some version exists
            pause = next(pauses, None)
            if pause is None:
                if changing and not asked_at_once:
                    # The last two answers named different versions (an overwrite between them, or
                    # a write after a delete): the next two, asked at once, most likely agree.
                    asked_at_once = True
                    continue
                if changing or asked_at_once:  # a key just seen changing is not called missing
                    self._note_changed(entry)
                    raise KeyChangingError(f"{key!r} kept changing during its lookup")
                return None
            yield ("pause", pause)

    def _note_changed(self, entry: str) -> None:
        """Remember that the key of ``entry`` changed: the cache then forgets its last known value
        (dropped, or a lookup failed because the key kept changing)."""
        if len(self._changed) >= CHANGING_KEYS:
            self._changed.clear()  # at once: many keys changing together is a rare storm
        self._changed[entry] = time.monotonic()

    def _changed_lately(self, entry: str) -> bool:
        noted = self._changed.get(entry)
        return noted is not None and time.monotonic() - noted < CHANGING_SECONDS

    def _ask_steps(self, key: str) -> Steps[Location | None]:
        """The location from ``get_paths`` (and ``file_info`` when needed); ``None`` if the two
        answers name different versions, or ``file_info`` no longer knows the key."""
        listed = yield ("get_paths", key, True, None, PATH_COUNT)
        paths = _replicas(key, listed)
        if not paths:
            raise StorageError(f"the tracker knows no live replica of {key!r}")
        etag = etag_for(paths)
        # No class of the domain keeps more copies than listed: complete, whatever its class.
        copies = yield from self._class_copies_steps()
        if not self.with_length and etag.startswith("fid-") \
                and len(paths) >= min(PATH_COUNT, max(copies.values(), default=PATH_COUNT)):
            return Location(key, paths, etag)
        try:
            info = yield ("file_info", key)
        except UnknownKeyError:
            return None
        if etag.startswith("fid-") and etag != f"fid-{info.fid}":
            return None
        copies = yield from self._class_copies_steps(info.cls)
        complete = len(paths) >= min(PATH_COUNT, copies.get(info.cls, PATH_COUNT))
        # Paths that name no fid are not named "fid-" by file_info's fid: they could be the version
        # before it (an overwrite between the two answers), whose bytes the body cache would keep.
        return Location(key, paths, etag if etag.startswith("fid-") else etag_for(paths, info.fid), info.length,
                        complete)

    def _class_copies_steps(self, cls: str | None = None) -> Steps[dict[str, int]]:
        """How many copies each class of the domain keeps, asked of the trackers every
        :data:`CLASSES_SECONDS` and when ``cls`` is new to us. When they cannot say, the counts
        last known (none at first: a short path is then trusted only briefly), for
        :data:`CLASSES_RETRY_SECONDS` before they are asked again."""
        now = time.monotonic()
        if now < self._copies_until and (cls is None or cls in self._copies) or now < self._classes_retry_at:
            return self._copies
        try:
            domains = yield ("classes",)
        except MogileFSError as error:
            self._classes_retry_at = time.monotonic() + CLASSES_RETRY_SECONDS
            log.warning("cannot learn the classes of %r (asked again in %g s): %r", self.client.domain,
                        CLASSES_RETRY_SECONDS, error)
            return self._copies
        self._copies = {name: copies for name, (copies, _) in domains.get(self.client.domain, {}).items()}
        self._copies_until = time.monotonic() + CLASSES_SECONDS
        if cls is not None:
            self._copies.setdefault(cls, PATH_COUNT)  # not listed: ask again only when renewed
        return self._copies


class AsyncLocator(Locator):
    """:class:`Locator` over an :class:`~mogile_middleware.async_client.AsyncClient`, on an event
    loop: the same lookup (its steps are shared), awaited, with single flight among tasks."""

    path_cache_class = AsyncPathCache

    async def aforget(self, key: str) -> None:
        """As :meth:`~Locator.forget`, awaited: a shared cache is asked from a thread.
        :meth:`~Locator.forget` stays for a synchronous writer's thread."""
        await self.paths.ainvalidate(self.cache_key(key))  # type: ignore[attr-defined]

    async def changed(self, key: str) -> None:  # type: ignore[override]
        """The listener of the client's changes: :meth:`aforget`."""
        await self.aforget(key)

    def cached(self, key: str) -> Location | None:
        """The location of ``key`` if the in-process cache holds it fresh, without awaiting; else
        ``None`` (and :meth:`locate` asks)."""
        location = self.paths.cached(self._entry_prefix + key)  # type: ignore[attr-defined]
        return location if location is not None and location.key == key else None

    def holding(self, location: Location) -> Callable[[], bool] | None:
        """A check, cheaper than :meth:`cached`, that the in-process cache still holds ``location``
        fresh (see :meth:`~mogile_middleware.cache.AsyncPathCache.holding`); ``None`` if it does not now."""
        return self.paths.holding(self._entry_prefix + location.key, location)  # type: ignore[attr-defined]

    async def locate(self, key: str) -> Location:  # type: ignore[override]
        """As :meth:`Locator.locate`, awaited."""
        entry = self._entry_prefix + key
        location = await self.paths.get(entry)  # type: ignore[misc]
        if location is not None and location.key != key:
            location = await self.paths.refresh(entry, _foreign(location, key))  # type: ignore[misc]
        return _found(location, key)

    async def relocate(self, outdated: Location) -> Location:  # type: ignore[override]
        """As :meth:`Locator.relocate`, awaited."""
        location = await self.paths.refresh(self._entry_prefix + outdated.key, outdated)  # type: ignore[misc]
        return _found(location, outdated.key)

    async def with_length_of(self, location: Location) -> Location:  # type: ignore[override]
        """As :meth:`Locator.with_length_of`, awaited."""
        return location if location.length is not None else await self.confirmed(location)

    async def confirmed(self, location: Location) -> Location:  # type: ignore[override]
        """As :meth:`Locator.confirmed`, awaited; the requests of an event loop that need the same
        location confirmed at once share one confirmation (each made its own: tracker calls a
        client could multiply at will with refused requests)."""
        if _confirmed_lately(location):
            return location
        loop = asyncio.get_running_loop()
        flight = None if location.memo is None else location.memo.get(_CONFIRMING)
        if flight is None or flight.done() or flight.get_loop() is not loop:
            flight = location.remember(_CONFIRMING, loop.create_task(
                arun_steps(self._confirmed_steps(location), self._call)))
            flight.add_done_callback(partial(_landed, location))
        return await asyncio.shield(flight)  # a request that goes away leaves it to the others

    async def _lookup(self, entry: str, previous: Location | None) -> Location | None:  # type: ignore[override]
        return await arun_steps(self._lookup_steps(entry, previous), self._call)

    async def _call(self, name: str, *args: Any) -> Any:  # type: ignore[override]
        if name == "classes":
            return (await self.client.pool.request("get_domains", None, parse_domains))[0]
        if name == "pause":
            return await asyncio.sleep(*args)
        if name == "relocate":
            return await self.relocate(*args)
        return await getattr(self.client, name)(*args)


#: The key under which a location's :attr:`~Location.memo` keeps when the trackers confirmed it.
_CONFIRMED = object()
#: The key under which it keeps the confirmation an event loop's requests await.
_CONFIRMING = object()


def _landed(location: Location, flight: asyncio.Task[Any]) -> None:
    """Forget the finished confirmation of ``location`` (a failed one would hold its error's frames
    as long as the location is cached), and take its error, which the requests that awaited it
    may all have left."""
    if not flight.cancelled():
        flight.exception()
    if location.memo is not None and location.memo.get(_CONFIRMING) is flight:
        location.memo.pop(_CONFIRMING, None)  # unless another event loop's flight replaced it meanwhile


def _confirmed_lately(location: Location) -> bool:
    confirmed = None if location.memo is None else location.memo.get(_CONFIRMED)
    return confirmed is not None and time.monotonic() - confirmed < CONFIRMED_SECONDS


def _names_version(location: Location, fid: int) -> bool:
    """True if ``location`` is the version of the key that is the file ``fid``."""
    return location.etag == (f"fid-{fid}" if location.etag.startswith("fid-") else etag_for(location.paths, fid))


def _foreign(location: Location, key: str) -> Location:
    """A shared cache's entry for another key than asked: logged, then replaced."""
    log.warning("ignoring a cached location of %r for %r", location.key, key)
    return location


def _found(location: Location | None, key: str) -> Location:
    if location is None:
        raise UnknownKeyError("unknown_key", key)
    return location


#: A lookup written once for both clients: it yields the tracker calls it needs, ``(name, *args)``,
#: and is sent their results (or thrown their errors) by :func:`run_steps` or :func:`arun_steps`.
Steps = Generator[tuple[Any, ...], Any, T]


def run_steps(steps: Steps[T], call: Callable[..., Any]) -> T:
    """Drive ``steps`` with a blocking ``call``."""
    try:
        step = next(steps)
        while True:
            try:
                result = call(*step)
            except Exception as error:
                step = steps.throw(error)
            else:
                step = steps.send(result)
    except StopIteration as done:
        return done.value


async def arun_steps(steps: Steps[T], call: Callable[..., Awaitable[Any]]) -> T:
    """Drive ``steps`` with an awaited ``call``."""
    try:
        step = next(steps)
        while True:
            try:
                result = await call(*step)
            except Exception as error:
                step = steps.throw(error)
            else:
                step = steps.send(result)
    except StopIteration as done:
        return done.value


def is_clean_url(url: str) -> bool:
    """True for an ``http://`` URL whose authority is a host and a port in range and nothing else
    (:func:`~.tracker.is_url_authority`: no user, nothing around brackets), that can go into a
    header as it is (no blank, no control byte): what storage nodes serve and reproxying proxies fetch."""
    if not url.startswith("http://") or _URL_SAFE.fullmatch(url) is None:
        return False
    try:
        return is_url_authority(urlsplit(url).netloc)
    except ValueError:  # a bracket left open
        return False


def _replicas(key: str, listed: list[str]) -> tuple[str, ...]:
    """The replica URLs of ``key`` a ``get_paths`` answer gives that may be used (the client reads
    as many as it asked for): clean ones (:func:`is_replica_url`) naming the fid the first names.
    A tracker that mixes files misspeaks: the ETag, read from the first, would name another
    file's bytes."""
    usable = []
    for url in listed:
        if is_replica_url(url):
            usable.append(url)
        else:
            log.warning("ignoring a replica URL that is not a clean http:// URL of a storage node: %r", url[:200])
    named = fid_of(usable[0]) if usable else None
    same = tuple(url for url in usable if fid_of(url) == named)
    if len(same) < len(usable):
        log.warning("ignoring replica URLs of %r that name another file than %r", key, same[0])
    return same


def is_replica_url(url: str) -> bool:
    """True for a replica URL as storage nodes give them: clean (:func:`is_clean_url`, which
    refuses a user, ``http://a@b/``, whose host proxies may read otherwise), no longer than
    :data:`MAX_REPLICA_URL`, without a fragment (never sent)."""
    return len(url) <= MAX_REPLICA_URL and "#" not in url and is_clean_url(url)
