"""The path cache: TTL, single flight, stale-if-error, invalidation, LRU bound, broken backends."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from mogile_middleware import cache as cache_module
from mogile_middleware.cache import STALE_WARNING_INTERVAL, STANDBY_SECONDS, MemoryCache, PathCache
from mogile_middleware.exceptions import TrackerUnavailableError, UnknownKeyError

TTL = 60.0
STALE = 300.0


class Clock:
    """A wall clock that only moves when a test moves it."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Lookup:
    """A tracker stand-in: counts its calls; answers a new list per call, or raises ``error``."""

    def __init__(self, delay: float = 0.0, hold: int = 0) -> None:
        self.calls = 0
        self.previous: list[Any] = []  # what each call was told was last known
        self.delay = delay
        self.error: Exception | None = None
        self.hold = hold  # this call (1 = the first) waits for ``release`` once ``entered`` is set
        self.entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, key: str, previous: list[str] | None) -> list[str]:
        with self._lock:
            self.calls += 1
            self.previous.append(previous)
            call = self.calls
        if call == self.hold:
            self.entered.set()
            self.release.wait(5)
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return [f"http://10.0.0.5:7500/dev1/{key}?v={call}", f"http://10.0.0.6:7500/dev2/{key}?v={call}"]


class FailingBackend(MemoryCache):
    """A shared cache whose ``failing`` methods raise, as memcached does while it is down."""

    def __init__(self, failing: set[str], clock: Clock) -> None:
        super().__init__(clock=clock)
        self.failing = failing

    def _check(self, method: str) -> None:
        if method in self.failing:
            raise ConnectionRefusedError(f"memcached down during {method}")

    def get(self, key: str) -> tuple[Any, float] | None:
        self._check("get")
        return super().get(key)

    def set(self, key: str, value: Any, stored_at: float, keep_seconds: float) -> None:
        self._check("set")
        super().set(key, value, stored_at, keep_seconds)

    def delete(self, key: str) -> None:
        self._check("delete")
        super().delete(key)


class Restarting:
    """A shared cache kept outside the process, failing while ``down``, as a memcached restarting."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Any, float]] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionRefusedError("memcached down")

    def get(self, key: str) -> tuple[Any, float] | None:
        self._check()
        return self.entries.get(key)

    def set(self, key: str, value: Any, stored_at: float, keep_seconds: float) -> None:
        self._check()
        self.entries[key] = (value, stored_at)

    def delete(self, key: str) -> None:
        self._check()
        self.entries.pop(key, None)


class LaxBackend(MemoryCache):
    """A shared cache that keeps values longer than asked, as memcached rounding expiry up does."""

    def set(self, key: str, value: Any, stored_at: float, keep_seconds: float) -> None:
        super().set(key, value, stored_at, keep_seconds + 3600)


class PausingBackend(MemoryCache):
    """A backend whose first get() once ``armed`` waits for ``resume``, then answers "not there",
    or, ``read_first``, the entry it read before waiting."""

    def __init__(self, clock: Clock, *, read_first: bool = False) -> None:
        super().__init__(clock=clock)
        self.read_first = read_first
        self.armed = False
        self.paused = threading.Event()
        self.resume = threading.Event()

    def get(self, key: str) -> tuple[Any, float] | None:
        entry = super().get(key)
        if self.armed and not self.paused.is_set():
            self.paused.set()
            self.resume.wait(5)
            return entry if self.read_first else None
        return entry


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lookup() -> Lookup:
    return Lookup()


def make_cache(lookup: Callable[[str, list[str] | None], list[str]], clock: Clock, **options: Any) -> PathCache[list[str]]:
    return PathCache(lookup, clock=clock, **{"ttl_seconds": TTL, "stale_seconds": STALE, **options})


def version(paths: list[str]) -> str:
    """Which call of the lookup produced ``paths``: ``"v1"``, ``"v2"``..."""
    return paths[0].rpartition("?")[2].replace("=", "")


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mogile_middleware" and r.levelno == logging.WARNING]


def run_together(count: int, target: Callable[[int], Any]) -> list[Any]:
    """Call ``target(n)`` from ``count`` threads released at once; each result or exception."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = target(index)
        except Exception as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    return results


def start_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``target`` in a thread; the list receives its result or exception."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(target())
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_hot_key_is_looked_up_once(lookup: Lookup, clock: Clock) -> None:
    cache = make_cache(lookup, clock)
    values = [cache.get("hot") for _ in range(100)]
    assert lookup.calls == cache.lookups == 1
    assert values[0][0] == "http://10.0.0.5:7500/dev1/hot?v=1"
    assert all(value == values[0] for value in values)


def test_each_key_has_its_own_value(lookup: Lookup, clock: Clock) -> None:
    cache = make_cache(lookup, clock)
    assert "/a?" in cache.get("a")[0] and "/b?" in cache.get("b")[0]
    assert "/a?" in cache.get("a")[0]
    assert lookup.calls == 2


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [
        pytest.param(TTL - 0.001, "v1", id="just-before-ttl"),
        pytest.param(TTL, "v2", id="at-ttl"),
        pytest.param(TTL + STALE + 1000, "v2", id="long-after"),
    ],
)
def test_ttl_expiry_looks_up_again(lookup: Lookup, clock: Clock, elapsed: float, expected: str) -> None:
    cache = make_cache(lookup, clock)
    cache.get("k")
    clock.advance(elapsed)
    assert version(cache.get("k")) == expected
    assert lookup.calls == int(expected[1:])


def test_an_entry_stored_ahead_of_this_clock_is_not_fresh(lookup: Lookup, clock: Clock) -> None:
    """A shared cache's entry from a host whose clock is an hour ahead would stay fresh for that
    hour: it is looked up again (and the lookup stores its finding by this clock)."""
    cache = make_cache(lookup, clock)
    cache.backend.set("k", ["http://10.0.0.9:7500/dev1/k?v=0"], clock() + 3600, 7200)
    assert version(cache.get("k")) == "v1" and lookup.calls == 1
    assert version(cache.get("k")) == "v1" and lookup.calls == 1


def test_a_lookup_is_told_the_value_last_known(lookup: Lookup, clock: Clock) -> None:
    """An expired value still kept, or the one a refresh found outdated, is handed to the lookup."""
    cache = make_cache(lookup, clock)
    first = cache.get("k")
    clock.advance(TTL)
    second = cache.get("k")
    cache.refresh("k", second)
    cache.invalidate("k")
    cache.get("k")
    clock.advance(TTL + STALE)  # no longer kept
    cache.get("k")
    assert lookup.previous == [None, first, second, None, None]


def test_concurrent_misses_make_one_lookup(clock: Clock) -> None:
    lookup = Lookup(delay=0.1)
    cache = make_cache(lookup, clock)
    values = run_together(20, lambda n: cache.get("hot"))
    assert lookup.calls == 1
    assert isinstance(values[0], list) and version(values[0]) == "v1"
    assert all(value is values[0] for value in values)


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(UnknownKeyError("unknown_key"), id="unknown-key"),
        pytest.param(TrackerUnavailableError("all trackers down"), id="trackers-down-nothing-stale"),
    ],
)
def test_concurrent_misses_all_get_the_exception(clock: Clock, error: Exception) -> None:
    lookup = Lookup(delay=0.1)
    lookup.error = error
    cache = make_cache(lookup, clock)
    outcomes = run_together(20, lambda n: cache.get("k"))
    assert lookup.calls == 1
    assert all(outcome is error for outcome in outcomes)


def test_miss_that_races_a_finishing_lookup_does_not_look_up_again(lookup: Lookup, clock: Clock) -> None:
    backend = PausingBackend(clock=clock)
    lookup.hold = 1
    cache = make_cache(lookup, clock, backend=backend)
    first, first_outcome = start_thread(lambda: cache.get("k"))
    assert lookup.entered.wait(2)
    backend.armed = True
    second, second_outcome = start_thread(lambda: cache.get("k"))
    assert backend.paused.wait(2)  # the second request saw no value...
    lookup.release.set()
    first.join(2)  # ...and the first one's lookup ends and stores its value before it goes on
    backend.resume.set()
    second.join(2)
    assert lookup.calls == 1
    assert second_outcome == first_outcome


def test_different_keys_do_not_wait_for_each_other(clock: Clock) -> None:
    both_inside = threading.Barrier(2)

    def lookup(key: str, previous: list[str] | None) -> list[str]:
        both_inside.wait(timeout=2)  # broken if one key's lookup waits for the other's
        return [key]

    cache = make_cache(lookup, clock)
    assert run_together(2, lambda n: cache.get(f"k{n}")) == [["k0"], ["k1"]]


@pytest.mark.parametrize(
    ("elapsed", "served"),
    [
        pytest.param(TTL, True, id="just-expired"),
        pytest.param(TTL + STALE / 2, True, id="mid-stale-window"),
        pytest.param(TTL + STALE - 0.001, True, id="end-of-stale-window"),
        pytest.param(TTL + STALE, False, id="stale-window-over"),
        pytest.param(TTL + STALE + 1000, False, id="long-after"),
        # Served for 2000 s more than the window, or a day for an entry of a host a day ahead.
        pytest.param(-2000, False, id="clock-stepped-back"),
    ],
)
@pytest.mark.parametrize("backend_type", [pytest.param(MemoryCache, id="memory"), pytest.param(LaxBackend, id="lax")])
def test_stale_value_while_trackers_are_down(
    lookup: Lookup, clock: Clock, elapsed: float, served: bool, backend_type: type[MemoryCache]
) -> None:
    cache = make_cache(lookup, clock, backend=backend_type(clock=clock))
    first = cache.get("k")
    clock.advance(elapsed)
    lookup.error = down = TrackerUnavailableError("no tracker answered")
    if served:
        assert cache.get("k") == first
    else:
        with pytest.raises(TrackerUnavailableError) as raised:
            cache.get("k")
        assert raised.value is down
    assert lookup.calls == 2
    lookup.error = None
    assert version(cache.get("k")) == "v3"


def test_stale_paths_are_warned_of_once_per_interval_counting_those_left_out(
    lookup: Lookup, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage serves every cached key stale: a line per key was thousands per worker."""
    cache = make_cache(lookup, clock)
    cache.get("a")
    cache.get("b")
    clock.advance(TTL)
    caplog.set_level(logging.WARNING, logger="mogile_middleware")
    lookup.error = TrackerUnavailableError("no tracker answered")
    for _ in range(3):
        cache.get("a")
        cache.get("b")
    assert len(warnings_in(caplog)) == 1
    assert "'a'" in warnings_in(caplog)[0] and "no tracker answered" in warnings_in(caplog)[0]
    clock.advance(STALE_WARNING_INTERVAL)
    cache.get("b")
    assert len(warnings_in(caplog)) == 2
    assert "'b'" in warnings_in(caplog)[1]
    assert warnings_in(caplog)[1].endswith(
        f"(5 more requests in the {STALE_WARNING_INTERVAL:.0f} s since the last line like this)")


STEPPED_CLOCK = """
import json, logging, time
real, offset = time.time, [0.0]
time.time = lambda: real() + offset[0]  # the wall clock, as NTP steps it
from mogile_middleware import cache
from mogile_middleware.exceptions import TrackerUnavailableError
cache.STALE_WARNING_INTERVAL = 0.2
lines = []
logging.getLogger("mogile_middleware").addHandler(logging.Handler())
logging.getLogger("mogile_middleware").handlers[0].emit = lambda record: lines.append(record.getMessage())
answers = iter(["v1"])

def lookup(key, previous):
    for answer in answers:
        return answer
    raise TrackerUnavailableError("no tracker answered")

paths = cache.PathCache(lookup, ttl_seconds=0.2, stale_seconds=300)
served = [paths.get("k")]
for step in (0, -3600, 7200):  # as it was, an hour back, an hour ahead
    offset[0] += step
    time.sleep(0.3)  # fresh no longer, and the warning's interval past
    try:
        served.append(paths.get("k"))
    except TrackerUnavailableError:
        served.append(None)
print(json.dumps([served, len(lines)]))
"""


def test_a_step_of_the_wall_clock_leaves_the_in_process_cache_as_it_was() -> None:
    """Stepped back an hour, entries were stored ahead of the clock and served no longer while the
    trackers were down, and the warnings' intervals lasted the hour; stepped forward, the entries
    had aged an hour at once. Its entries never leave the process: monotonic time reckons them."""
    done = subprocess.run([sys.executable, "-c", STEPPED_CLOCK], capture_output=True, text=True, timeout=30)
    assert json.loads(done.stdout) == [["v1", "v1", "v1", "v1"], 3], done.stderr


def test_unknown_key_is_not_cached(lookup: Lookup, clock: Clock) -> None:
    cache = make_cache(lookup, clock)
    lookup.error = UnknownKeyError("unknown_key")
    for _ in range(2):
        with pytest.raises(UnknownKeyError):
            cache.get("new")
    lookup.error = None
    assert version(cache.get("new")) == "v3"


def test_an_error_other_than_unavailable_keeps_the_stored_value(lookup: Lookup, clock: Clock) -> None:
    cache = make_cache(lookup, clock)
    first = cache.get("k")
    clock.advance(TTL)
    lookup.error = UnknownKeyError("unknown_key")
    with pytest.raises(UnknownKeyError):
        cache.get("k")
    lookup.error = TrackerUnavailableError("no tracker answered")
    assert cache.get("k") == first


def test_invalidate_forces_a_new_lookup(lookup: Lookup, clock: Clock) -> None:
    cache = make_cache(lookup, clock)
    cache.get("k")
    cache.invalidate("k")
    cache.invalidate("never-seen")
    assert version(cache.get("k")) == "v2"
    assert version(cache.get("k")) == "v2"
    assert lookup.calls == 2


def test_invalidate_drops_what_stale_if_error_would_serve(lookup: Lookup, clock: Clock) -> None:
    cache = make_cache(lookup, clock)
    cache.get("k")
    cache.invalidate("k")
    lookup.error = TrackerUnavailableError("no tracker answered")
    with pytest.raises(TrackerUnavailableError):
        cache.get("k")


@pytest.mark.parametrize("elapsed", [pytest.param(0, id="fresh"), pytest.param(TTL + STALE / 2, id="stale")])
def test_a_refresh_while_trackers_are_down_keeps_the_outdated_value(lookup: Lookup, clock: Clock,
                                                                    elapsed: float) -> None:
    """The refresh fails, but the value it found outdated stays for the next requests: replicas that
    failed once (a node restarting) may answer again, and the trackers are not there to say otherwise."""
    cache = make_cache(lookup, clock)
    first = cache.get("k")
    clock.advance(elapsed)
    lookup.error = down = TrackerUnavailableError("no tracker answered")
    with pytest.raises(TrackerUnavailableError) as raised:
        cache.refresh("k", first)
    assert raised.value is down
    assert cache.get("k") == first
    lookup.error = None
    assert version(cache.refresh("k", first)) != version(first)


class PausingAtExpiry(MemoryCache):
    """Pauses once as a refresh stores the value it found outdated as expired, until ``resume``."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.clock = clock
        self.paused = threading.Event()
        self.resume = threading.Event()

    def set_if_holding(self, key: str, entry: tuple[Any, float, float], value: Any, stored_at: float,
                       keep_seconds: float) -> None:
        super().set_if_holding(key, entry, value, stored_at, keep_seconds)
        if not self.paused.is_set():
            self.paused.set()
            self.resume.wait(5)


def test_a_refresh_that_joins_a_lookup_begun_after_it_is_not_given_the_value_it_found_outdated(clock: Clock) -> None:
    """The trackers down, a request's lookup that began as a refresh outdated its value serves that
    value stale to itself; the refresh, joining it, was given it too (a 502 where a 503 is due)."""
    lookup = Lookup(delay=1.0)  # the time the refresh has to join it
    backend = PausingAtExpiry(clock)
    cache = make_cache(lookup, clock, backend=backend)
    first = cache.get("k")
    lookup.error = down = TrackerUnavailableError("no tracker answered")
    refreshing, refreshed = start_thread(lambda: cache.refresh("k", first))
    assert backend.paused.wait(5)  # the outdated value stored as expired, the refresh not looking up yet
    getting, got = start_thread(lambda: cache.get("k"))
    deadline = time.monotonic() + 5
    while lookup.calls < 2 and time.monotonic() < deadline:  # the request's lookup, which the refresh joins
        time.sleep(0.01)
    backend.resume.set()
    refreshing.join(5)
    getting.join(5)
    assert refreshed == [down] and got == [first] and lookup.calls == 2


class InvalidatedAfterGet(MemoryCache):
    """Has ``cache.invalidate(key)`` run once right after its ``armed_get``-th read, which it
    answers with the entry it read before."""

    def __init__(self, clock: Clock, armed_get: int) -> None:
        super().__init__(clock=clock)
        self.cache: PathCache[list[str]] | None = None
        self.gets = 0
        self.armed_get = armed_get

    def get(self, key: str) -> tuple[Any, float, float] | None:
        entry = super().get(key)
        self.gets += 1
        if self.gets == self.armed_get and self.cache is not None:
            self.cache.invalidate(key)  # another thread's, between this read and what follows it
        return entry


def test_an_invalidation_amid_a_refresh_storing_the_outdated_value_as_expired_stands(clock: Clock) -> None:
    """The refresh read the entry, checked it was still the one it found failing, then stored it
    as expired: an invalidation between the check and the store was undone, and the value came
    back to be served stale while the trackers were down."""
    lookup = Lookup()
    backend = InvalidatedAfterGet(clock, armed_get=4)  # the first get (two reads), the refresh, its check
    cache = make_cache(lookup, clock, backend=backend)
    first = cache.get("k")
    backend.cache = cache
    lookup.error = down = TrackerUnavailableError("no tracker answered")
    with pytest.raises(TrackerUnavailableError):
        cache.refresh("k", first)
    with pytest.raises(TrackerUnavailableError) as raised:
        cache.get("k")  # nothing stale left to serve: the key was invalidated
    assert raised.value is down


def test_requests_joining_a_refresh_that_hangs_get_the_expired_paths_rather_than_wait_it_out(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """A tracker that hangs held every request for a hot key until the refresh timed out (5 s, a
    gthread worker's every thread): only the request that asked it waits. The warning says why
    (no tracker need be down: the one asked may be slow)."""
    lookup = Lookup(hold=2)
    cache = make_cache(lookup, clock)
    first = cache.get("k")
    clock.advance(TTL + 1)  # expired, within the stale window
    leader, led = start_thread(lambda: cache.get("k"))
    assert lookup.entered.wait(2)
    started = time.monotonic()
    joined = [start_thread(lambda: cache.get("k")) for _ in range(8)]
    for thread, _ in joined:
        thread.join(2)
    waited = time.monotonic() - started
    assert [got for _, outcome in joined for got in outcome] == [first] * 8 and waited < 1.0
    assert "serving stale paths for 'k': TrackerUnavailableError('its lookup has taken over 0.1 s so far')" in caplog.text
    lookup.release.set()
    leader.join(5)
    assert version(led[0]) == "v2" and lookup.calls == 2 and cache.get("k") == led[0]


def test_a_request_joining_a_lookup_whose_fresh_value_is_stored_meanwhile_is_no_stale_answer(
        clock: Clock, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process stored the key's paths (or the lookup stored them as it ended) while the
    request waited: answered with them, it was logged and counted as served stale under load."""
    monkeypatch.setattr(cache_module, "STALE_AFTER_SECONDS", 0.5)  # stored well within it, on a slow host too
    lookup = Lookup(hold=1)
    backend = MemoryCache(clock=clock)
    cache = make_cache(lookup, clock, backend=backend)
    leader, _ = start_thread(lambda: cache.get("k"))
    assert lookup.entered.wait(2)
    joiner, joined = start_thread(lambda: cache.get("k"))
    time.sleep(0.05)  # joined, within its patience for a stale value
    fresh = ["http://10.0.0.7:7500/dev3/k?v=other"]
    backend.set("k", fresh, clock(), TTL + STALE)
    joiner.join(3)
    assert joined == [fresh] and "serving stale" not in caplog.text
    lookup.release.set()
    leader.join(5)


def test_a_request_joining_the_first_lookup_of_a_key_waits_for_it(clock: Clock) -> None:
    """With nothing known of the key there is nothing to answer meanwhile."""
    lookup = Lookup(hold=1)
    cache = make_cache(lookup, clock)
    leader, led = start_thread(lambda: cache.get("k"))
    assert lookup.entered.wait(2)
    joiner, joined = start_thread(lambda: cache.get("k"))
    time.sleep(0.3)  # past the patience for a stale value
    assert joined == []
    lookup.release.set()
    for thread in (leader, joiner):
        thread.join(5)
    assert joined == led and version(led[0]) == "v1" and lookup.calls == 1


def test_requests_whose_replicas_failed_and_those_meanwhile_share_one_refresh(clock: Clock) -> None:
    """Every request that found the same paths dead waits for one lookup, and so does a request
    arriving meanwhile, rather than be given the dead paths."""
    lookup = Lookup(hold=2)
    cache = make_cache(lookup, clock)
    first = cache.get("k")
    thread, outcome = start_thread(lambda: cache.refresh("k", first))
    assert lookup.entered.wait(2)
    others = [start_thread(lambda: cache.refresh("k", first)), start_thread(lambda: cache.get("k"))]
    time.sleep(0.1)
    lookup.release.set()
    for waiting, _ in [(thread, outcome), *others]:
        waiting.join(5)
    assert lookup.calls == 2
    assert [version(result) for result in [*outcome, *(result for _, got in others for result in got)]] == ["v2"] * 3


def test_a_refresh_never_puts_back_the_failed_value_over_the_one_found_meanwhile(lookup: Lookup, clock: Clock) -> None:
    """A refresh that read the failed value before another refresh replaced it leaves the new value
    in place (re-stored as expired over it, it cost a lookup, and stale serving the dead paths)."""
    backend = PausingBackend(clock, read_first=True)
    cache = make_cache(lookup, clock, backend=backend)
    dead = cache.get("k")
    backend.armed = True
    thread, late = start_thread(lambda: cache.refresh("k", dead))
    assert backend.paused.wait(2)
    replaced = cache.refresh("k", dead)
    backend.resume.set()
    thread.join(5)
    assert late == [replaced] and version(replaced) == "v2" and lookup.calls == 2


@pytest.mark.parametrize("request_meanwhile", [pytest.param(False, id="quiet"), pytest.param(True, id="busy")])
def test_invalidate_during_a_lookup_is_not_undone(clock: Clock, request_meanwhile: bool) -> None:
    lookup = Lookup(hold=1)
    cache = make_cache(lookup, clock, wait_seconds=1.0)
    thread, outcome = start_thread(lambda: cache.get("k"))
    assert lookup.entered.wait(2)
    cache.invalidate("k")
    if request_meanwhile:
        # A request after the invalidation does not join the outdated lookup.
        assert version(cache.get("k")) == "v2"
    lookup.release.set()
    thread.join(2)
    assert version(outcome[0]) == "v1"  # the request made before the invalidation keeps its answer
    assert version(cache.get("k")) == "v2"
    assert lookup.calls == 2


def test_waiters_retry_when_the_looking_up_thread_is_interrupted(clock: Clock) -> None:
    class Interrupted(BaseException):
        """Like a killed greenlet: not an error to hand to the other requests."""

    calls: list[str] = []
    entered, release, interrupted = threading.Event(), threading.Event(), threading.Event()

    def lookup(key: str, previous: list[str] | None) -> list[str]:
        calls.append(key)
        if len(calls) == 1:
            entered.set()
            release.wait(5)
            raise Interrupted
        return ["v2"]

    def lead() -> None:
        try:
            cache.get("k")
        except Interrupted:
            interrupted.set()

    cache = make_cache(lookup, clock)
    leader = threading.Thread(target=lead)
    leader.start()
    assert entered.wait(2)
    waiter, outcome = start_thread(lambda: cache.get("k"))
    time.sleep(0.05)  # lets the waiter join the lookup about to be interrupted
    release.set()
    leader.join(2)
    waiter.join(2)
    assert interrupted.is_set()
    assert outcome == [["v2"]] and len(calls) == 2


@pytest.mark.parametrize(
    ("hold", "expected"),
    [
        pytest.param(1, None, id="nothing-cached-raises"),
        pytest.param(2, "v1", id="stale-value-served"),
    ],
)
def test_waiting_for_a_stuck_lookup_is_bounded(clock: Clock, hold: int, expected: str | None) -> None:
    lookup = Lookup(hold=hold)
    cache = make_cache(lookup, clock, wait_seconds=0.05)
    if hold == 2:
        cache.get("k")
        clock.advance(TTL)
    thread, _ = start_thread(lambda: cache.get("k"))
    assert lookup.entered.wait(2)
    started = time.monotonic()
    try:
        if expected is None:
            with pytest.raises(TrackerUnavailableError, match="'k'"):
                cache.get("k")
        else:
            assert version(cache.get("k")) == expected
        assert time.monotonic() - started < 1.0
        assert lookup.calls == hold
    finally:
        lookup.release.set()
        thread.join(2)


@pytest.mark.parametrize(
    ("keys", "evicted"),
    [
        pytest.param("abcd", "a", id="oldest-evicted"),
        pytest.param("abcad", "a", id="read-again-still-oldest"),
    ],
)
def test_default_backend_is_bounded_and_evicts_what_was_stored_longest_ago(
        lookup: Lookup, clock: Clock, keys: str, evicted: str) -> None:
    cache = make_cache(lookup, clock, max_entries=3)
    for key in keys:
        cache.get(key)
    looked_up = lookup.calls
    for key in sorted(set(keys) - {evicted}):
        cache.get(key)
    assert lookup.calls == looked_up
    cache.get(evicted)
    assert lookup.calls == looked_up + 1


def test_memory_cache_keeps_max_entries(clock: Clock) -> None:
    backend = MemoryCache(max_entries=3, clock=clock)
    for n, key in enumerate("abcd"):
        backend.set(key, [key], clock() + n, 100)
    assert len(backend) == 3
    assert backend.get("a") is None
    assert backend.get("d")[:2] == (["d"], clock() + 3)
    backend.set("b", ["b2"], clock(), 100)  # stored again: now the last to go
    backend.set("e", ["e"], clock(), 100)
    assert [key for key in "bcde" if backend.get(key) is not None] == ["b", "d", "e"]


def test_memory_cache_evicts_a_hundredth_at_a_time(clock: Clock) -> None:
    backend = MemoryCache(max_entries=1000, clock=clock)
    for n in range(1001):
        backend.set(str(n), n, clock(), 100)
    assert len(backend) == 991 and backend.get("9") is None and backend.get("10") is not None


@pytest.mark.parametrize(
    ("elapsed", "kept"), [pytest.param(9.999, True, id="kept"), pytest.param(10, False, id="gone")]
)
def test_memory_cache_expires_entries(clock: Clock, elapsed: float, kept: bool) -> None:
    backend = MemoryCache(clock=clock)
    backend.set("k", ["p"], clock(), 10)
    clock.advance(elapsed)
    assert (backend.get("k") is not None) is kept
    backend.delete("k")
    assert backend.get("k") is None


@pytest.mark.parametrize(
    "failing",
    [
        pytest.param({"get"}, id="get"),
        pytest.param({"set"}, id="set"),
        pytest.param({"delete"}, id="delete"),
        pytest.param({"get", "set", "delete"}, id="all"),
    ],
)
def test_failing_backend_never_breaks_get(
    lookup: Lookup, clock: Clock, caplog: pytest.LogCaptureFixture, failing: set[str]
) -> None:
    cache = make_cache(lookup, clock, backend=FailingBackend(failing, clock))
    caplog.set_level(logging.WARNING, logger="mogile_middleware")
    for _ in range(3):
        assert cache.get("k")[0].startswith("http://10.0.0.5:7500/dev1/k?v=")
        cache.invalidate("k")
    assert len(warnings_in(caplog)) == 1
    assert "memcached down" in warnings_in(caplog)[0]
    clock.advance(60)
    cache.get("k")
    cache.invalidate("k")
    assert len(warnings_in(caplog)) == 2


def test_while_a_shared_backend_fails_the_process_keeps_what_it_looks_up_until_it_answers_again(
        lookup: Lookup, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    """A memcached restarting (skipped for 5 s after) had every request ask the trackers: a
    lookup per request, not per key, in every process at once."""
    shared = Restarting()
    cache = make_cache(lookup, clock, backend=shared)
    assert cache.backend is shared
    assert version(cache.get("k")) == "v1"
    shared.down = True
    assert [version(cache.get("k")) for _ in range(5)] == ["v2"] * 5
    # Fresh for a second at most: a change another process marks meanwhile, unread, reaches it then.
    clock.advance(STANDBY_SECONDS - 0.01)
    assert version(cache.get("k")) == "v2"
    clock.advance(0.01)
    assert version(cache.get("k")) == "v3"
    clock.advance(TTL + STALE - 0.01)  # with the trackers down too: served stale, as long as from memcached
    lookup.error = TrackerUnavailableError("no tracker answered")
    assert version(cache.get("k")) == "v3"
    clock.advance(0.01)
    with pytest.raises(TrackerUnavailableError):
        cache.get("k")
    lookup.error = None
    shared.down = False  # back, with another process's newer entry: the one to go by
    shared.entries["k"] = (["http://10.0.0.5:7500/dev1/k?v=9"], clock())
    assert version(cache.get("k")) == "v9"
    shared.down = True  # what the process kept meanwhile was dropped once the shared cache answered for the key
    assert [version(cache.get("k")) for _ in range(2)] == ["v6"] * 2
    cache.invalidate("k")  # a change this process made
    assert version(cache.get("k")) == "v7"
    assert warnings_in(caplog)[0] == ("path cache backend failed, keeping paths in this process meanwhile: "
                                      "ConnectionRefusedError('memcached down')")


def test_failing_backend_with_trackers_down_raises_the_tracker_error(lookup: Lookup, clock: Clock) -> None:
    cache = make_cache(lookup, clock, backend=FailingBackend({"get", "set", "delete"}, clock))
    lookup.error = TrackerUnavailableError("no tracker answered")
    with pytest.raises(TrackerUnavailableError):
        cache.get("k")


def test_ttl_zero_never_caches(lookup: Lookup, clock: Clock) -> None:
    backend = LaxBackend(clock=clock)
    cache = make_cache(lookup, clock, backend=backend, ttl_seconds=0)
    assert [version(cache.get("k")) for _ in range(3)] == ["v1", "v2", "v3"]
    assert len(backend) == 0


def test_ttl_zero_serves_nothing_stale(lookup: Lookup, clock: Clock) -> None:
    backend = MemoryCache(clock=clock)
    backend.set("k", ["http://10.0.0.5:7500/dev1/k?v=0"], clock(), TTL + STALE)  # another process's
    cache = make_cache(lookup, clock, backend=backend, ttl_seconds=0)
    lookup.error = TrackerUnavailableError("no tracker answered")
    with pytest.raises(TrackerUnavailableError):
        cache.get("k")


def test_ttl_zero_is_still_single_flight(clock: Clock) -> None:
    lookup = Lookup(delay=0.1)
    cache = make_cache(lookup, clock, ttl_seconds=0)
    values = run_together(20, lambda n: cache.get("k"))
    assert lookup.calls == 1
    assert all(value is values[0] for value in values)
