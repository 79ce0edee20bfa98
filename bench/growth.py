"""10a–b. The path cache as it grows to 1k, 100k and 1M keys: bytes per entry, and the time of a hit.

The entries are those the middleware keeps behind Perlbal with ``trusted_proxies``: a
:class:`~mogile_middleware.locate.Location` with two replica URLs, the fid's ETag and the length,
stored as :class:`~mogile_middleware.cache.PathCache` stores a looked-up value. They are put in
the in-process backend directly, since a million tracker lookups would take minutes; the hits
go through the middleware's own locator.
"""

from __future__ import annotations

import random
import time
import tracemalloc
from collections.abc import Callable

from mogile_middleware.devserver import fid_path
from mogile_middleware.locate import Location
from mogile_middleware.middleware import MogileFSMiddleware

from .apps import proxied_environ
from .cluster import PERLBAL_OPTIONS, Cluster
from .measure import Deadline, Spread, interleaved, ratios
from .report import Figure, Target

SIZES = {"1k": 1_000, "100k": 100_000, "1M": 1_000_000}
#: The smallest cache, against which the larger ones are compared.
BASELINE_SIZE = "1k"
#: Long enough for no entry to expire between the filling and the last hit.
CACHE_SECONDS = 3600.0
#: Hits per timing batch (random keys, so the larger caches miss the CPU's caches as a server
#: would), and batches per repetition of which the fastest counts.
HIT_CALLS = 20_000
HIT_BATCHES = 2
#: Entries given a reproxy answer each, to weigh what the responders keep beside a location.
ANSWERED_SAMPLE = 10_000
#: The issue's goal for one entry.
ENTRY_BYTES = 600
#: A hit in the largest cache may take this many times a hit in the smallest.
HIT_RATIO = 1.5
#: Keys are numbered from here, so that every key and fid has six digits or more.
FIRST_NUMBER = 100_000


def photo_key(number: int) -> str:
    """A key shaped like a site's uploads: ``photos/2026/12/01/123456.jpg``."""
    return f"photos/2026/{1 + number % 12:02d}/{1 + number % 28:02d}/{number}.jpg"


def stored_location(number: int) -> Location:
    """The location of :func:`photo_key` ``(number)`` as the locator makes it from a tracker's answers:
    two replicas on two hosts (fid ``number``), its ETag and a length."""
    paths = (f"http://10.0.0.{1 + number % 50}:7500{fid_path(1 + number % 100, number)}",
             f"http://10.0.0.{51 + number % 50}:7500{fid_path(101 + number % 100, number)}")
    return Location(photo_key(number), paths, f"fid-{number}", 10_000 + number % 90_000)


class FilledCache:
    """The middleware over an in-process path cache filled with ``size`` entries; the bytes they
    take (Python's allocations while filling, as :mod:`tracemalloc` counts them)."""

    def __init__(self, cluster: Cluster, size: int, deadline: Deadline) -> None:
        self.size = size
        self.middleware: MogileFSMiddleware = cluster.middleware(
            path_cache_entries=size, path_cache_seconds=CACHE_SECONDS, **PERLBAL_OPTIONS)
        locator = self.middleware.locator
        backend = locator.paths.backend
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for number in range(FIRST_NUMBER, FIRST_NUMBER + size):
                if number % 10_000 == 0:
                    deadline.check()
                location = stored_location(number)
                # Stored at the in-process cache's time, the monotonic clock's.
                backend.set(locator.cache_key(location.key), location, time.monotonic(), CACHE_SECONDS)
            self.bytes = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        if len(backend) != size:  # type: ignore[arg-type]
            raise RuntimeError(f"the path cache kept {len(backend)} of {size} entries")
        locator.paths.get(locator.cache_key(location.key))  # the last one filled in: fresh, no lookup
        if locator.paths.lookups:  # else every request below asks the tracker, for hours
            raise RuntimeError("the path cache takes the entries filled in for stale: it asked the tracker")

    def answered_bytes(self, count: int) -> float:
        """Bytes a reproxy answer adds to an entry (the headers the responders keep beside it), over ``count``."""
        environ = proxied_environ("/")
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for number in range(FIRST_NUMBER, FIRST_NUMBER + count):
                self.middleware.answer(environ, photo_key(number))
            return (tracemalloc.get_traced_memory()[0] - before) / count
        finally:
            tracemalloc.stop()

    def hit_timer(self, deadline: Deadline, among: int | None = None) -> Callable[[], float]:
        """µs per :meth:`~mogile_middleware.locate.Locator.locate` of random cached keys (of the
        first ``among`` only if given), the fastest of ``HIT_BATCHES`` batches; each key a new
        string, as a request's is."""
        among = among or self.size
        numbers = random.Random(among).choices(range(FIRST_NUMBER, FIRST_NUMBER + among), k=HIT_CALLS)
        keys = [photo_key(number) for number in numbers]
        locate = self.middleware.locator.locate

        def batch() -> float:
            start = time.perf_counter()
            for key in keys:
                locate(key)
            return time.perf_counter() - start

        def timed() -> float:
            deadline.check()
            return min(batch() for _ in range(HIT_BATCHES)) / HIT_CALLS * 1e6

        return timed


def path_cache(cluster: Cluster, repeat: int) -> list[Figure]:
    """10a. Bytes per entry at 100k and 1M keys against 1k, held to ``ENTRY_BYTES``; 10b. µs per
    hit at 100k and 1M keys against 1k, held to ``HIT_RATIO`` (flat: a dict, whatever its size)."""
    deadline = Deadline(120, "the path cache at 1M keys")
    caches = {name: FilledCache(cluster, size, deadline) for name, size in SIZES.items()}
    largest = max(SIZES, key=SIZES.__getitem__)
    answered = caches[largest].answered_bytes(ANSWERED_SAMPLE)
    timers = {name: cache.hit_timer(deadline) for name, cache in caches.items()}
    # The largest cache's hits on as few keys as the smallest holds: what the size alone costs,
    # once the memory a uniform draw touches no longer fits the CPU's caches.
    timers["hot"] = caches[largest].hit_timer(deadline, SIZES[BASELINE_SIZE])
    hits = interleaved(repeat, timers)
    if any(cache.middleware.locator.paths.lookups for cache in caches.values()):
        raise RuntimeError("a path cache hit asked the tracker: an entry expired or was evicted")
    per_entry = {name: cache.bytes / cache.size for name, cache in caches.items()}
    baseline_bytes = Spread.of([per_entry[BASELINE_SIZE]])
    hot = Spread.of(hits["hot"])
    figures = []
    for name in SIZES:
        if name == BASELINE_SIZE:
            continue
        measured = Spread.of([per_entry[name]])
        figures.append(Figure(
            f"10a. path cache, {name} keys, bytes per entry", "bytes/entry", f"{BASELINE_SIZE} keys",
            baseline_bytes, measured, Spread.of([per_entry[name] / per_entry[BASELINE_SIZE]]),
            Target("bytes", "<=", ENTRY_BYTES, " B"), measured,
            f"tracemalloc while filling; a reproxy answer adds {answered:,.0f} B to an entry (its headers)"))
        figures.append(Figure(
            f"10b. path cache, {name} keys, hit", "µs/hit", f"{BASELINE_SIZE} keys", Spread.of(hits[BASELINE_SIZE]),
            Spread.of(hits[name]), Spread.of(ratios(hits[name], hits[BASELINE_SIZE])),
            Target("ratio", "<=", HIT_RATIO),
            note=f"Locator.locate of {HIT_CALLS:,} keys drawn uniformly from the cache, gc on" + (
                f"; {hot.median:.3g} µs [{hot.low:.3g}–{hot.high:.3g}] drawn from {BASELINE_SIZE} of its keys"
                if name == largest else "")))
    return figures
