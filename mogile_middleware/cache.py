"""The path cache: what a key's replicas are, without a tracker round trip on every request.

Values live in a small :class:`CacheBackend`, in process by default or shared (memcached).
:class:`PathCache` adds the time to live (per value), one lookup per key at a time,
stale-if-error, and replacing a value found outdated.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from . import metrics
from .deadline import within
from .exceptions import TrackerUnavailableError
from .forking import new_lock_in_child, renew_in_child
from .throttle import ThrottledLog

V = TypeVar("V")
T = TypeVar("T")

log = logging.getLogger("mogile_middleware")

#: Seconds between two warnings about a failing backend, so an outage does not flood the log.
BACKEND_WARNING_INTERVAL = 60.0
#: How long what a lookup found stays fresh in process while the shared backend fails: a lookup
#: per key, process and second, not per request, and a change another process marks in memcached
#: meanwhile reaches this one within a second.
STANDBY_SECONDS = 1.0
#: Seconds between two warnings about paths served stale: an outage serves every cached key so.
STALE_WARNING_INTERVAL = 10.0

#: Marks a flight whose leader ended without a value or an exception of its own.
_UNSET: Any = object()
#: The version of an entry in a backend that keeps none (see :meth:`PathCache._watched`).
_UNVERSIONED: Any = object()
#: How long a request waits for another's refresh of an expired entry before it is answered from
#: that entry, within its stale window, as the refresh would be once it failed: a tracker that
#: hangs holds the one request that asked it (``io_timeout``), not every request for a hot key
#: (under a threaded worker, every thread, and with them the application's other pages).
STALE_AFTER_SECONDS = 0.1
#: How long an entry is kept that is stored only over one no request may be answered from any
#: more (neither fresh nor stale): a delete would be, in memcached, the mark of a change, after
#: which every process asks the trackers again and again before it takes a key for missing.
_SPENT_KEEP_SECONDS = 1.0


def entry_key(domain: str, key: str) -> str:
    """The backend key of ``key`` in ``domain``: applications of two domains never share an entry."""
    return f"{len(domain)}:{domain}:{key}"


def evict_oldest(entries: dict[Any, Any]) -> None:
    """Drop the 1% of ``entries`` stored first (at least one; a dict keeps the order of storing),
    in one pass: a dict has no cheap "first item" once its head has been deleted."""
    for old in list(itertools.islice(entries, max(1, len(entries) // 100))):
        entries.pop(old, None)  # another thread may have dropped it meanwhile


class CacheBackend(Protocol):
    """Where cached values live: in process (:class:`MemoryCache`) or shared (e.g. memcached)."""

    def get(self, key: str) -> tuple[Any, ...] | None:
        """``(value, stored_at, ...)`` for ``key`` (``stored_at`` on the path cache's clock: wall
        time for a shared backend), or None if not kept: a tuple whose first two items are these (a
        backend may keep more beside them)."""

    def set(self, key: str, value: Any, stored_at: float, keep_seconds: float) -> None:
        """Keep ``value`` for ``key`` at most ``keep_seconds``."""

    def delete(self, key: str) -> None:
        """Forget ``key`` (no error if it is not kept).

        A backend shared by processes may also have ``get_versioned(key)``, giving the entry as
        ``get`` does and the version of what it holds for ``key``, and ``set_if_unchanged(key,
        value, stored_at, keep_seconds, version)``, storing only over that version: then a lookup
        that raced another process's change (its ``delete``) stores nothing (see
        :class:`~mogile_middleware.memcache.MemcachedBackend`).
        """


def is_cache_backend(value: object) -> bool:
    """True for an object with the methods of a :class:`CacheBackend` (a server's address given in
    its place would turn every drop of a changed key into a logged error)."""
    return all(callable(getattr(value, method, None)) for method in ("get", "set", "delete"))


class MemoryCache:
    """An in-process :class:`CacheBackend` bounded to ``max_entries`` keys, thread-safe.

    When full it evicts the entries stored longest ago, about 1% at a time: a path cache stores
    a key again each time its paths are looked up anew, so the keys still asked for are the ones
    stored last. ``len()`` counts entries not yet evicted, including expired ones nobody has asked
    for since.
    """

    def __init__(self, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a whole number >= 1, not {max_entries!r}")
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (value, stored_at, expires_at), in the order stored: one tuple, handed out as it is.
        self._entries: dict[str, tuple[Any, float, float]] = {}
        #: The entry of a key as it is stored, expired or not (as :meth:`get`, without the lock),
        #: for a caller that checks the time itself.
        self.stored: Callable[[str], tuple[Any, float, float] | None] = self._entries.get
        renew_in_child(self)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<MemoryCache holding {len(self)} of at most {self._max_entries} entries>"

    def get(self, key: str) -> tuple[Any, float, float] | None:
        """``(value, stored_at, expires_at)`` for ``key`` unless missing or expired.

        Without the lock (each dict operation is atomic): the worst a race can do is drop an
        entry another thread just stored, which costs a lookup, never a wrong answer.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[2] <= self._clock():
            self._entries.pop(key, None)
            return None
        return entry

    def set(self, key: str, value: Any, stored_at: float, keep_seconds: float) -> None:
        """Keep ``value`` for ``keep_seconds`` from now, evicting the entries stored longest ago."""
        entry = (value, stored_at, self._clock() + keep_seconds)
        with self._lock:
            self._put(key, entry)

    def delete(self, key: str) -> None:
        """Forget ``key``."""
        with self._lock:
            self._entries.pop(key, None)

    def set_if_holding(self, key: str, entry: tuple[Any, float, float], value: Any, stored_at: float,
                       keep_seconds: float) -> None:
        """:meth:`set`, only if ``key``'s entry is still ``entry`` (as :meth:`get` gave it): not
        if it was dropped or stored again since."""
        replacement = (value, stored_at, self._clock() + keep_seconds)
        with self._lock:
            if self._entries.get(key) is entry:
                self._put(key, replacement)

    def _put(self, key: str, entry: tuple[Any, float, float]) -> None:
        """Store ``entry`` (the lock held), evicting the entries stored longest ago."""
        self._entries.pop(key, None)  # stored again: last in the order of eviction
        self._entries[key] = entry
        if len(self._entries) > self._max_entries:
            evict_oldest(self._entries)

    def renew_after_fork(self) -> None:
        self._lock = threading.Lock()


class _Standby:
    """A shared backend with an in-process stand-in: what a call that fails (memcached down, or
    skipped for a few seconds after) would have stored is kept in this process meanwhile, fresh
    for :data:`STANDBY_SECONDS` at most, instead of every request asking the trackers; a key's
    stand-in entry is dropped once the shared backend answers for it again. Failures are
    logged, never raised."""

    def __init__(self, shared: CacheBackend, max_entries: int, failures: ThrottledLog,
                 ttl_of: Callable[[Any], float], clock: Callable[[], float]) -> None:
        self.shared = shared
        self._memory = MemoryCache(max_entries, clock)  # the clock of the times stored
        self._failures = failures
        self._ttl_of = ttl_of
        self._clock = clock

    def get(self, key: str) -> tuple[Any, ...] | None:
        answered, entry = self._ask(self.shared.get, key)
        return entry if answered else self._kept(key)

    def set(self, key: str, value: Any, stored_at: float, keep_seconds: float) -> None:
        if not self._ask(self.shared.set, key, value, stored_at, keep_seconds)[0]:
            self._memory.set(key, value, stored_at, keep_seconds)

    def delete(self, key: str) -> None:
        self._memory.delete(key)
        self._ask(self.shared.delete, key)

    def _ask(self, method: Callable[..., T], key: str, *args: Any) -> tuple[bool, T | None]:
        """``(True, method(key, *args))`` when the shared backend answers, and its entry for
        ``key``, if any, is the one to go by from then on; else ``(False, None)``, logged."""
        try:
            answer = method(key, *args)
        except Exception as error:
            self._failures.event(error)
            return False, None
        if len(self._memory):
            self._memory.delete(key)
        return True, answer

    def _kept(self, key: str) -> tuple[Any, ...] | None:
        """The stand-in entry of ``key``; past :data:`STANDBY_SECONDS`, as if its time to live had
        just ended (served stale within its own window): a change another process marks in the
        shared backend meanwhile cannot be read, even once a failed server is back but skipped."""
        entry = self._memory.get(key)
        if entry is None:
            return None
        now, ttl = self._clock(), self._ttl_of(entry[0])
        return (entry[0], now - ttl) if STANDBY_SECONDS <= now - entry[1] < ttl else entry


class _VersionedStandby(_Standby):
    """:class:`_Standby` of a backend with versions: an entry read from the stand-in has none (as
    one memcached does not hold), so a store after it asks the shared backend first."""

    def get_versioned(self, key: str) -> tuple[tuple[Any, ...] | None, Any]:
        answered, found = self._ask(self.shared.get_versioned, key)  # type: ignore[attr-defined]
        return found if answered else (self._kept(key), None)  # type: ignore[return-value]

    def set_if_unchanged(self, key: str, value: Any, stored_at: float, keep_seconds: float, version: Any) -> None:
        set_if_unchanged = self.shared.set_if_unchanged  # type: ignore[attr-defined]
        if not self._ask(set_if_unchanged, key, value, stored_at, keep_seconds, version)[0]:
            self._memory.set(key, value, stored_at, keep_seconds)


#: The in-process caches of the process (a backend given to two path caches counted once), whose
#: keys the ``path_cache_entries`` gauge sums; a cache dropped with its middleware leaves it.
_IN_PROCESS: weakref.WeakSet[MemoryCache] = weakref.WeakSet()
_IN_PROCESS_LOCK = threading.Lock()
new_lock_in_child(globals(), "_IN_PROCESS_LOCK")

class _Flight:
    """One lookup in progress: its waiters block on ``done``, then read its outcome."""

    __slots__ = ("done", "lock", "invalidated", "outdated", "value", "error")

    def __init__(self, outdated: Any = None) -> None:
        self.done = threading.Event()
        self.lock = threading.Lock()  # makes "not invalidated, so store" atomic against invalidate()
        self.invalidated = False
        self.outdated = outdated  # the value whose failure a refresh looks up for, if any
        self.value: Any = _UNSET
        self.error: Exception | None = None


class PathCache(Generic[V]):
    """key → value (paths and what the ETag needs), with TTL, single flight and stale-if-error.

    ``lookup(key, previous)`` asks the trackers (e.g. ``client.get_paths``); ``previous`` is the
    value last known for ``key`` (expired, or found outdated by :meth:`refresh`), else None, so a
    lookup can doubt an answer that contradicts it. Its value is served ``ttl_seconds``
    (0: never stored), or ``ttl_for(value)`` when given, and ``stale_seconds`` more while every
    tracker is unavailable. A request waits ``wait_seconds`` at most for another thread's lookup
    of the same key. ``clock`` (by default) is wall time for a shared backend, which compares
    ``stored_at`` across hosts, and monotonic time for an in-process one, whose entries a step of
    the wall clock (NTP) would age by an hour, or make younger, at once (an hour without serving
    them stale). ``on_change(key)`` is told of each change of a key the cache learns of: its
    :meth:`invalidate`, or the mark another process left in a shared backend in its place. While
    a shared backend fails, what is looked up is kept in process a second (see :class:`_Standby`).
    """

    def __init__(self, lookup: Callable[[str, V | None], V], *, backend: CacheBackend | None = None,
                 ttl_seconds: float = 60.0, stale_seconds: float = 300.0, max_entries: int = 10_000,
                 clock: Callable[[], float] | None = None, wait_seconds: float = 10.0,
                 ttl_for: Callable[[V], float] | None = None, on_change: Callable[[str], None] | None = None) -> None:
        self._lookup = lookup
        self._on_change = on_change
        # The warnings' intervals are the clock's given (tests pass a fake one), else monotonic:
        # wall time stepped back an hour silenced them for the hour.
        interval_clock = clock or time.monotonic
        self._backend_log = ThrottledLog(log, logging.WARNING, "path cache backend failed, keeping paths in this "
                                         "process meanwhile: %r", BACKEND_WARNING_INTERVAL, "failures",
                                         clock=interval_clock)
        self._given: CacheBackend = backend if backend is not None else MemoryCache(max_entries, interval_clock)
        if clock is None:
            clock = time.monotonic if isinstance(self._given, MemoryCache) else time.time
        # How long a value stays fresh: one call on the hot path, whichever way it is given.
        self._ttl_of: Callable[[V], float] = ttl_for if ttl_for is not None else lambda value: ttl_seconds
        self._backend: CacheBackend = self._given
        if isinstance(self._given, MemoryCache):
            with _IN_PROCESS_LOCK:
                _IN_PROCESS.add(self._given)
        else:
            standby = _VersionedStandby if hasattr(self._given, "get_versioned") else _Standby
            self._backend = standby(self._given, max_entries, self._backend_log, self._ttl_of, clock)
        self._stale_seconds = stale_seconds
        self._clock = clock
        self._wait_seconds = wait_seconds
        self._versioned = hasattr(self._backend, "get_versioned")
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._stale_log = ThrottledLog(log, logging.WARNING, "serving stale paths for %r: %r", STALE_WARNING_INTERVAL,
                                       "requests", clock=interval_clock)
        self.lookups = 0
        renew_in_child(self)

    @property
    def backend(self) -> CacheBackend:
        """Where the values are kept (a shared backend's stand-in aside)."""
        return self._given

    def get(self, key: str) -> V:
        """The value for ``key``: the cached one while fresh, else looked up (see the class doc)."""
        try:
            entry = self._backend.get(key)
        except Exception as error:  # a broken shared cache must not take the site down with it
            self._backend_log.event(error)
            entry = None
        if entry is not None and 0 <= self._clock() - entry[1] < self._ttl_of(entry[0]):  # (inlined _fresh: hot path)
            metrics.recorder.cache_hit()
            return entry[0]
        metrics.recorder.cache_miss()
        return self._refresh(key)

    def refresh(self, key: str, outdated: V) -> V:
        """The value for ``key`` looked up anew because ``outdated`` proved wrong (e.g. every replica
        it names is gone), unless another thread has already replaced it. While no tracker answers,
        the :class:`TrackerUnavailableError` is raised and ``outdated`` kept for later requests:
        stale paths that failed once (a node restarting) may answer the next time."""
        entry, version = self._watched(key)
        if self._replaces(entry, outdated):
            return entry[0]  # type: ignore[index]
        self._outdate_lookup(key, outdated)
        if entry is not None and entry[0] == outdated and self._fresh(entry):  # (an expired one stays as it is)
            self._safely(self._expire, key, entry, version)
        return self._refresh(key, outdated)

    def _fresh(self, entry: tuple[Any, float]) -> bool:
        return 0 <= self._clock() - entry[1] < self._ttl_of(entry[0])

    def renew_after_fork(self) -> None:
        # The lookups in progress are the parent's threads': none ends here, and a request of the
        # child for one of their keys waited for it, then failed (each request, for good).
        self._lock = threading.Lock()
        self._flights = {}

    def invalidate(self, key: str) -> None:
        """Forget ``key``, and keep a lookup already in progress from storing its outdated value."""
        self._outdate_lookup(key)
        self._safely(self._backend.delete, key)
        self._invalidated(key)

    def _outdate_lookup(self, key: str, refreshed: Any = None) -> None:
        """Keep a lookup of ``key`` in progress from storing its value: begun before a change, it
        may find the old version. With ``refreshed``, not a refresh's of that value: the
        requests it failed for all join that one lookup. The lookup's lock is waited for (a store
        in progress) with the cache's own lock not held: made before gevent patched (gunicorn
        ``--preload``), that one is the thread's, and another greenlet taking it would stop the worker."""
        while (flight := self._flights.get(key)) is not None:
            if refreshed is not None and flight.outdated == refreshed:
                return
            with flight.lock:
                with self._lock:
                    if self._flights.get(key) is not flight:
                        continue  # ended meanwhile: the lookup in progress now, if any
                    del self._flights[key]  # later requests start a new lookup
                flight.invalidated = True
            return

    def _expire(self, key: str, entry: tuple[Any, float], version: Any) -> None:
        """Keep ``entry`` for stale serving only: stored as if its time to live had passed, so that
        requests miss it and join the refresh's lookup, and as a new version, which no lookup begun
        before stores over (in memcached)."""
        ttl = self._ttl_of(entry[0])
        now = self._clock()
        stored_at = min(entry[1], now - ttl)
        keep = stored_at + ttl + self._stale_seconds - now
        keep = keep if keep > 0 else _SPENT_KEEP_SECONDS
        if isinstance(self._backend, MemoryCache):  # unless replaced meanwhile, checked as it stores
            self._backend.set_if_holding(key, entry, entry[0], stored_at, keep)  # type: ignore[arg-type]
        elif version is _UNVERSIONED and (self._backend.get(key) or (None, None))[:2] != entry[:2]:
            return  # replaced meanwhile (a backend without versions cannot refuse the store)
        else:
            self._store(key, entry[0], keep, version, stored_at)

    def _invalidated(self, key: str) -> None:
        """Tell of the change of ``key``; count an invalidation, and the in-process cache's size after it."""
        self._changed(key)
        metrics.recorder.cache_invalidated()
        self._report_size()

    def _changed(self, key: str) -> None:
        if self._on_change is not None:
            self._on_change(key)

    def _told_of_change(self, key: str, entry: tuple[Any, float] | None, version: Any) -> None:
        """Tell of the change of ``key`` when a versioned backend holds something for it that is no
        entry: another process's mark of a change (or an entry that could not be read)."""
        if entry is None and version is not None and version is not _UNSET and version is not _UNVERSIONED:
            self._changed(key)

    def _report_size(self) -> None:
        """Tell the metrics how many keys the in-process caches of the process hold, all of them:
        each of two stacked middlewares has its own, and one set its size alone over the other's."""
        if isinstance(self._backend, MemoryCache):
            with _IN_PROCESS_LOCK:
                entries = sum(len(cache) for cache in _IN_PROCESS)
            metrics.recorder.cache_size(entries)

    def _refresh(self, key: str, previous: V | None = None, *, recheck: bool = True) -> V:
        with self._lock:
            flight = self._flights.get(key)
            leading = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight(previous)
        if not leading:
            return self._join(key, flight, previous, recheck)
        try:
            flight.value = self._fetch(key, flight, previous)
            return flight.value
        except Exception as error:
            flight.error = error
            raise
        finally:
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
            flight.done.set()

    def _join(self, key: str, flight: _Flight, previous: V | None, recheck: bool) -> V:
        patience = self._patience(previous)
        if patience and not flight.done.wait(patience):
            stale = self._stale_meanwhile(key, self._safely(self._backend.get, key), flight.outdated)
            if stale is not _UNSET:
                return stale
        if not flight.done.wait(self._wait_seconds - patience):
            cause = TrackerUnavailableError(f"no answer for {key!r} within {self._wait_seconds} s")
            return self._stale_or_raise(key, cause, previous)
        if isinstance(flight.error, TrackerUnavailableError):  # a refresh's: what it found outdated, we did not
            return self._stale_or_raise(key, flight.error, previous)
        if flight.error is not None:
            raise flight.error
        if flight.value is _UNSET:  # the leader was interrupted (e.g. a killed greenlet): try again
            return self._refresh(key, previous)
        if not (recheck and self._versioned):
            return flight.value
        value = self._joined(flight.value, self._watched(key))
        return self._refresh(key, previous, recheck=False) if value is _UNSET else value

    def _joined(self, found: V, watched: tuple[tuple[Any, float] | None, Any]) -> V:
        """What a request that joined another's lookup in a shared backend answers, given what the
        backend holds after it (``watched``): its fresh entry; else what the lookup ``found`` when
        the backend cannot say; else :data:`_UNSET`: a lookup begun after this one's (once). The
        lookup it joined may have begun before another process's change, whose mark then kept it
        from storing: its finding is the old version, where this request came after the change."""
        entry, version = watched
        if entry is not None and self._fresh(entry):
            return entry[0]
        return found if version is _UNSET else _UNSET

    def _fetch(self, key: str, flight: _Flight, previous: V | None) -> V:
        # Another thread may have stored a fresh value between our miss and our taking the lead.
        entry, version = self._watched(key)
        if self._replaces(entry, previous):
            return entry[0]  # type: ignore[index]
        self._told_of_change(key, entry, version)
        with self._lock:
            self.lookups += 1
        try:
            value = self._lookup(key, previous if entry is None else entry[0])
        except TrackerUnavailableError as error:
            # Those who joined serve stale what each may: a refresh, not the value it found outdated.
            flight.error = error
            return self._stale_or_raise(key, error, previous)
        keep = self._looked_up(value)
        if keep:
            with flight.lock:
                if not flight.invalidated:
                    self._safely(self._store, key, value, keep, version)
        elif entry is not None:  # an old value would be served stale, and taken as the last known
            self._safely(self._store, key, value, _SPENT_KEEP_SECONDS, version)
        self._report_size()
        return value

    def _watched(self, key: str) -> tuple[tuple[Any, float] | None, Any]:
        """The entry of ``key`` before a lookup, and the version a store after it must find: from
        a backend without versions :data:`_UNVERSIONED`; :data:`_UNSET` when it cannot be read (the
        lookup's value is then not stored)."""
        get_versioned = getattr(self._backend, "get_versioned", None)
        if get_versioned is None:
            return self._safely(self._backend.get, key), _UNVERSIONED
        return self._safely(get_versioned, key) or (None, _UNSET)

    def _store(self, key: str, value: V, keep: float, version: Any, stored_at: float | None = None) -> None:
        """Keep what a lookup found, unless the backend's entry changed since it began (``version``)."""
        stored_at = self._clock() if stored_at is None else stored_at
        if version is _UNVERSIONED:
            self._backend.set(key, value, stored_at, keep)
        elif version is not _UNSET:
            self._backend.set_if_unchanged(key, value, stored_at, keep, version)  # type: ignore[attr-defined]

    def _looked_up(self, value: Any) -> float:
        """Seconds to keep a value a tracker just gave (0: not at all)."""
        ttl = self._ttl_of(value)
        # With no time to live nothing is stored, so nothing is served stale either.
        return ttl + self._stale_seconds if ttl > 0 else 0.0

    def _replaces(self, entry: tuple[Any, float] | None, outdated: V | None) -> bool:
        """True when ``entry`` is fresh and not the value a refresh found ``outdated``: found by
        another thread or process meanwhile, it is the answer, with no lookup."""
        return entry is not None and self._fresh(entry) and (outdated is None or entry[0] != outdated)

    def _patience(self, previous: V | None) -> float:
        """How long a request joining a refresh waits before :meth:`_stale_meanwhile`: none for one
        that found ``previous`` outdated, which no stale value answers."""
        return 0.0 if previous is not None else min(STALE_AFTER_SECONDS, self._wait_seconds)

    def _stale_meanwhile(self, key: str, entry: tuple[Any, float] | None, outdated: Any) -> V | Any:
        """``entry``'s value, within its stale window, for a request whose refresh has taken
        :data:`STALE_AFTER_SECONDS` so far, unless it is the value the refresh found ``outdated``
        (replicas that failed); else :data:`_UNSET` (the request waits on). A fresh entry (the
        lookup's, stored as it ends) is answered as it is, not logged and counted as stale."""
        if self._replaces(entry, outdated):
            return entry[0]  # type: ignore[index]
        try:
            return self._stale_value(key, entry, TrackerUnavailableError(
                f"its lookup has taken over {STALE_AFTER_SECONDS} s so far"), outdated)
        except TrackerUnavailableError:
            return _UNSET

    def _stale_or_raise(self, key: str, error: TrackerUnavailableError, outdated: V | None = None) -> V:
        return self._stale_value(key, self._safely(self._backend.get, key), error, outdated)

    def _stale_value(self, key: str, entry: tuple[Any, float] | None, error: TrackerUnavailableError,
                     outdated: V | None = None) -> V:
        """``entry``'s value while every tracker is down, if within the stale window and not the
        one a refresh found ``outdated``; else ``error``."""
        # Another process's backend may keep longer than we would: serve only within our window,
        # which an entry stored ahead of the clock (stepped back, or another host's) is not in.
        ttl = 0.0 if entry is None else self._ttl_of(entry[0])
        if (entry is None or ttl <= 0 or not 0 <= self._clock() - entry[1] < ttl + self._stale_seconds
                or outdated is not None and entry[0] == outdated):
            raise error
        self._stale_log.event(key, error)
        metrics.recorder.cache_stale()
        return entry[0]

    def _safely(self, method: Callable[..., T], *args: Any) -> T | None:
        try:
            return method(*args)
        except Exception as error:  # as in get(): a miss, or a value left unstored
            self._backend_log.event(error)
            return None


class _AsyncFlight:
    """One lookup in progress on an event loop: its waiters await ``done``."""

    __slots__ = ("done", "lock", "invalidated", "outdated", "stored")

    def __init__(self, outdated: Any = None) -> None:
        self.done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.lock = threading.Lock()  # what PathCache.invalidate takes (never held across an await)
        self.invalidated = False
        self.outdated = outdated  # as _Flight's
        self.stored: asyncio.Future[Any] | None = None  # the store, once begun (in a thread)


def _settle(done: asyncio.Future[Any], outcome: Any) -> None:
    """End a lookup's ``done`` with ``outcome`` (an exception is raised to those awaiting it),
    unless it has ended already (with the trackers' failure, before its leader's stale value)."""
    if done.done():
        return
    if isinstance(outcome, Exception):
        done.set_exception(outcome)
        done.exception()  # retrieved: no "never retrieved" warning when nobody waits
    else:
        done.set_result(outcome)


#: How often a request awaiting a lookup led on another thread's loop checks that loop still runs.
LEADER_CHECK_SECONDS = 0.25


def _followed(done: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """``done`` as a future of the running loop: itself, or, for a lookup led on another thread's
    loop (one middleware shared by threads, each running its own), a future given its outcome."""
    loop = asyncio.get_running_loop()
    if done.get_loop() is loop:
        return done
    follower = loop.create_future()

    def settle(source: asyncio.Future[Any]) -> None:  # on this loop
        if follower.done():
            return
        if source.cancelled():
            follower.set_result(_UNSET)  # as a leader's cancelled task: look up for ourselves
        elif source.exception() is not None:
            follower.set_exception(source.exception())  # type: ignore[arg-type]
            follower.exception()  # retrieved: no "never retrieved" warning when the wait timed out
        else:
            follower.set_result(source.result())

    def relay(source: asyncio.Future[Any]) -> None:  # on the leader's loop
        with contextlib.suppress(RuntimeError):  # this loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, source)

    def watch() -> None:  # on this loop: a leader's loop that stops mid-lookup never answers
        if not follower.done():
            if leader.is_running():
                loop.call_later(LEADER_CHECK_SECONDS, watch)
            else:
                follower.set_result(_UNSET)

    leader = done.get_loop()
    try:
        leader.call_soon_threadsafe(done.add_done_callback, relay)
    except RuntimeError:  # the leader's loop closed meanwhile
        follower.set_result(_UNSET)
    loop.call_later(LEADER_CHECK_SECONDS, watch)
    return follower


class AsyncPathCache(PathCache[V]):
    """:class:`PathCache` for asyncio: ``lookup`` is a coroutine, and concurrent misses of a key on
    the event loop await one lookup. A backend with I/O (memcached) is asked from a thread, so the
    loop never waits on it; the in-process :class:`MemoryCache` is asked directly.
    """

    def __init__(self, lookup: Callable[[str, V | None], Awaitable[V]], **options: Any) -> None:
        super().__init__(lookup, **options)  # type: ignore[arg-type]
        self._async_lookup = lookup
        self._in_process = isinstance(self._backend, MemoryCache)
        # What holding() reads: a MemoryCache's own entries, its times on this cache's clock.
        self._holdable = type(self._backend) is MemoryCache and self._backend._clock is self._clock

    def cached(self, key: str) -> V | None:
        """The fresh value of ``key`` if the in-process backend holds one, without awaiting (the
        hot path of a warm cache); else ``None``: await :meth:`get`, which counts the lookup (a
        value of ``None`` too: "no such key", held as any other)."""
        if self._in_process:
            entry = self._backend.get(key)
            if entry is not None and entry[0] is not None and 0 <= self._clock() - entry[1] < self._ttl_of(entry[0]):
                metrics.recorder.cache_hit()  # (fresh: _fresh inlined on this hot path)
                return entry[0]
        return None

    def holding(self, key: str, value: V) -> Callable[[], bool] | None:
        """A check cheaper than :meth:`cached`, for answers decided from ``value``: true (a hit
        counted) while the in-process backend holds ``value`` for ``key`` fresh, as it does now;
        ``None`` if it does not now, or if the backend is not a :class:`MemoryCache` on this clock."""
        entry = self._backend.get(key) if self._holdable else None
        if entry is None or entry[0] is not value or not self._fresh(entry):
            return None
        stored, clock = self._backend.stored, self._clock  # type: ignore[attr-defined]
        stored_at, fresh_until = entry[1], min(entry[2], entry[1] + self._ttl_of(value))

        def holds() -> bool:
            if stored(key) is entry and stored_at <= clock() < fresh_until:
                metrics.recorder.cache_hit()
                return True
            return False

        return holds

    async def get(self, key: str) -> V:  # type: ignore[override]
        """The value for ``key``: the cached one while fresh, else looked up."""
        entry = self._backend.get(key) if self._in_process else await self._backend_call(self._backend.get, key)
        if entry is not None and self._fresh(entry):
            metrics.recorder.cache_hit()
            return entry[0]
        metrics.recorder.cache_miss()
        return await self._refresh(key)

    async def refresh(self, key: str, outdated: V) -> V:  # type: ignore[override]
        """As :meth:`PathCache.refresh`, awaited."""
        entry, version = await self._backend_call(self._watched, key) or (None, _UNSET)
        if self._replaces(entry, outdated):
            return entry[0]  # type: ignore[index]
        storing = self._flights.get(key)
        self._outdate_lookup(key, outdated)
        if isinstance(storing, _AsyncFlight) and storing.invalidated and storing.stored is not None:
            # A store begun before we outdated it lands first, or it would beat ours to the version
            # both found: the value we found wrong would be kept fresh (awaited, where a lock was
            # waited for on the loop).
            await asyncio.wait({_followed(storing.stored)}, timeout=self._wait_seconds)
            entry, version = await self._backend_call(self._watched, key) or (None, _UNSET)
        if entry is not None and entry[0] == outdated and self._fresh(entry):
            await self._backend_call(self._expire, key, entry, version)
        return await self._refresh(key, outdated)

    async def ainvalidate(self, key: str) -> None:
        """As :meth:`PathCache.invalidate`, with a backend that does I/O asked from a thread. The
        plain :meth:`~PathCache.invalidate` stays for a synchronous writer's thread."""
        self._outdate_lookup(key)
        await self._backend_call(self._backend.delete, key)
        self._invalidated(key)

    async def _refresh(self, key: str, previous: V | None = None, *,  # type: ignore[override]
                       recheck: bool = True) -> V:
        while True:
            with self._lock:  # invalidate() may run in another thread (a sync client's listener)
                flight = self._flights.get(key)
                if flight is None or flight.done.get_loop().is_running():
                    leading = flight is None
                    if leading:
                        flight = self._flights[key] = _AsyncFlight(previous)  # type: ignore[assignment]
                    break
            # Its loop stopped mid-lookup: it would never end. Outdated as invalidate() does, with
            # the cache's lock not held while a store of it in a thread may end.
            self._outdate_lookup(key)
        if not leading:
            followed, patience = _followed(flight.done), self._patience(previous)
            if patience and not (await asyncio.wait({followed}, timeout=patience))[0]:
                stale = self._stale_meanwhile(key, await self._backend_call(self._backend.get, key), flight.outdated)
                if stale is not _UNSET:
                    return stale  # type: ignore[no-any-return]
            try:
                value = await within(self._wait_seconds - patience, asyncio.shield(followed))
            except asyncio.TimeoutError:
                cause = TrackerUnavailableError(f"no answer for {key!r} within {self._wait_seconds} s")
                return self._stale_value(key, await self._backend_call(self._backend.get, key), cause, previous)
            except TrackerUnavailableError as error:  # a refresh's: what it found outdated, we did not
                return self._stale_value(key, await self._backend_call(self._backend.get, key), error, previous)
            if value is _UNSET:  # the leader's task was cancelled (its client went away): look up for ourselves
                return await self._refresh(key, previous)
            if not (recheck and self._versioned):
                return value
            value = self._joined(value, await self._backend_call(self._watched, key) or (None, _UNSET))
            return await self._refresh(key, previous, recheck=False) if value is _UNSET else value
        try:
            value = await self._fetch_async(key, flight, previous)  # type: ignore[arg-type]
        except Exception as error:
            _settle(flight.done, error)
            raise
        except BaseException:
            _settle(flight.done, _UNSET)
            raise
        else:
            _settle(flight.done, value)
            return value
        finally:
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]

    async def _fetch_async(self, key: str, flight: _AsyncFlight, previous: V | None) -> V:
        entry, version = await self._backend_call(self._watched, key) or (None, _UNSET)
        if self._replaces(entry, previous):
            return entry[0]  # type: ignore[index]
        self._told_of_change(key, entry, version)
        self.lookups += 1
        try:
            value = await self._async_lookup(key, previous if entry is None else entry[0])
        except TrackerUnavailableError as error:
            _settle(flight.done, error)  # as in PathCache._fetch: those who joined serve stale what each may
            return self._stale_value(key, await self._backend_call(self._backend.get, key), error, previous)
        keep = self._looked_up(value)
        if keep:
            store = flight.stored = asyncio.ensure_future(
                self._backend_call(self._store_unless_invalidated, flight, key, value, keep, version))
            try:
                await asyncio.shield(store)
            except asyncio.CancelledError:  # its thread goes on: the flight stays, for a refresh to await
                await asyncio.wait({store})
                raise
        elif entry is not None:  # as in PathCache._fetch
            await self._backend_call(self._store, key, value, _SPENT_KEEP_SECONDS, version)
        self._report_size()
        return value

    def _store_unless_invalidated(self, flight: _AsyncFlight, key: str, value: V, keep: float, version: Any) -> None:
        """:meth:`_store` (in a thread), unless the key was invalidated meanwhile. The flight's lock
        is not held across the store: the event loop takes it to invalidate. Invalidated while it
        stores, the key of a backend without versions is dropped again after, since the change's
        drop may have come first; a versioned one refuses a store begun before the change's mark
        (and a refresh waits for ``flight.stored`` before it reads the version)."""
        if flight.invalidated:
            return
        self._store(key, value, keep, version)
        if flight.invalidated and version is _UNVERSIONED:
            self._backend.delete(key)

    async def _backend_call(self, method: Callable[..., T], *args: Any) -> T | None:
        if self._in_process:
            return self._safely(method, *args)
        return await asyncio.to_thread(self._safely, method, *args)
