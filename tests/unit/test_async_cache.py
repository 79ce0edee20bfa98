"""The path cache on an event loop: single flight among tasks, TTL, stale-if-error, a thread for I/O."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from unit.test_cache import Restarting

from mogile_middleware.cache import AsyncPathCache, MemoryCache
from mogile_middleware.exceptions import TrackerUnavailableError, UnknownKeyError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Lookup:
    """An async lookup that counts its calls and can be made to wait, fail or be slow."""

    def __init__(self) -> None:
        self.calls = 0
        self.previous: list[str | None] = []  # what each call was told was last known
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self, key: str, previous: str | None) -> str:
        self.calls += 1
        self.previous.append(previous)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return f"{key}@{self.calls}"


def make(lookup: Lookup, clock: Clock, **options: Any) -> AsyncPathCache[str]:
    return AsyncPathCache(lookup, clock=clock, ttl_seconds=10, stale_seconds=30, **options)


def test_concurrent_misses_await_one_lookup() -> None:
    async def scenario() -> None:
        lookup, clock = Lookup(), Clock()
        cache = make(lookup, clock)
        lookup.gate = asyncio.Event()
        tasks = [asyncio.create_task(cache.get("k")) for _ in range(50)]
        await asyncio.sleep(0)
        lookup.gate.set()
        assert set(await asyncio.gather(*tasks)) == {"k@1"} and lookup.calls == cache.lookups == 1
        assert await cache.get("k") == "k@1"
        clock.now += 11
        assert await cache.get("k") == "k@2"
    asyncio.run(scenario())


def test_a_lookup_error_reaches_every_waiter_and_nothing_is_stored() -> None:
    async def scenario() -> None:
        lookup, clock = Lookup(), Clock()
        cache = make(lookup, clock)
        lookup.gate, lookup.error = asyncio.Event(), UnknownKeyError("unknown_key")
        tasks = [asyncio.create_task(cache.get("k")) for _ in range(5)]
        await asyncio.sleep(0)
        lookup.gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(outcome, UnknownKeyError) for outcome in outcomes) and lookup.calls == 1
        lookup.error = None
        assert await cache.get("k") == "k@2"
    asyncio.run(scenario())


def test_stale_paths_while_the_trackers_are_down_then_fresh_ones() -> None:
    async def scenario() -> None:
        lookup, clock = Lookup(), Clock()
        cache = make(lookup, clock)
        assert await cache.get("k") == "k@1"
        clock.now += 20
        lookup.error = TrackerUnavailableError("down")
        assert await cache.get("k") == "k@1"  # within ttl + stale
        clock.now += 30
        with pytest.raises(TrackerUnavailableError):
            await cache.get("k")
        lookup.error = None
        assert await cache.get("k") == "k@4"
    asyncio.run(scenario())


def test_requests_joining_a_refresh_that_hangs_get_the_expired_value_rather_than_wait_it_out() -> None:
    """As in a thread: a tracker that hangs held every request for a hot key until it timed out."""
    async def scenario() -> None:
        lookup, clock = Lookup(), Clock()
        cache = make(lookup, clock)
        assert await cache.get("k") == "k@1"
        clock.now += 11  # expired, within the stale window
        lookup.gate = asyncio.Event()
        leader = asyncio.create_task(cache.get("k"))
        await asyncio.sleep(0)
        started = time.monotonic()
        assert await asyncio.gather(*(cache.get("k") for _ in range(8))) == ["k@1"] * 8
        assert time.monotonic() - started < 1.0 and not leader.done()
        lookup.gate.set()
        assert await leader == "k@2" and await cache.get("k") == "k@2" and lookup.calls == 2
    asyncio.run(scenario())


def test_a_cancelled_leader_lets_its_waiters_look_up_for_themselves() -> None:
    async def scenario() -> None:
        lookup, clock = Lookup(), Clock()
        cache = make(lookup, clock)
        lookup.gate = asyncio.Event()
        leader = asyncio.create_task(cache.get("k"))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(cache.get("k"))
        await asyncio.sleep(0)
        leader.cancel()
        await asyncio.sleep(0)
        lookup.gate.set()
        assert await waiter == "k@2"
        with pytest.raises(asyncio.CancelledError):
            await leader
    asyncio.run(scenario())


def test_invalidate_and_refresh() -> None:
    async def scenario() -> None:
        lookup, clock = Lookup(), Clock()
        cache = make(lookup, clock)
        first = await cache.get("k")
        cache.invalidate("k")
        second = await cache.get("k")
        assert (first, second) == ("k@1", "k@2")
        assert await cache.refresh("k", "k@1") == "k@2"  # already replaced: no lookup
        assert await cache.refresh("k", "k@2") == "k@3" and lookup.calls == 3
        assert lookup.previous == [None, None, "k@2"]  # the refresh told what proved outdated
    asyncio.run(scenario())


def test_requests_whose_replicas_failed_and_those_meanwhile_share_one_refresh() -> None:
    """As with the blocking cache: one lookup for every request that found the paths dead, and for
    a request arriving meanwhile."""
    async def scenario() -> None:
        lookup, clock = Lookup(), Clock()
        cache = make(lookup, clock)
        first = await cache.get("k")
        lookup.gate = asyncio.Event()
        tasks = [asyncio.create_task(cache.refresh("k", first)) for _ in range(3)]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(cache.get("k")))
        await asyncio.sleep(0.01)
        lookup.gate.set()
        assert await asyncio.gather(*tasks) == ["k@2"] * 4 and lookup.calls == 2
    asyncio.run(scenario())


def test_a_refresh_while_trackers_are_down_keeps_the_outdated_value() -> None:
    """As with the blocking cache: the refresh fails, the next request still gets the value, stale."""
    async def scenario() -> None:
        lookup, clock = Lookup(), Clock()
        cache = make(lookup, clock)
        first = await cache.get("k")
        clock.now += 20
        lookup.error = TrackerUnavailableError("no tracker answered")
        with pytest.raises(TrackerUnavailableError):
            await cache.refresh("k", first)
        assert await cache.get("k") == first
    asyncio.run(scenario())


class SlowBackend:
    """A backend with I/O, as memcached is: records the thread of every call."""

    def __init__(self, clock: Clock) -> None:
        self.memory = MemoryCache(clock=clock)
        self.threads: set[int] = set()

    def get(self, key: str) -> Any:
        self.threads.add(threading.get_ident())
        return self.memory.get(key)

    def set(self, key: str, value: Any, stored_at: float, keep_seconds: float) -> None:
        self.threads.add(threading.get_ident())
        self.memory.set(key, value, stored_at, keep_seconds)

    def delete(self, key: str) -> None:
        self.memory.delete(key)


def test_a_backend_with_io_is_asked_from_a_thread_never_the_loop() -> None:
    async def scenario() -> set[int]:
        lookup, clock = Lookup(), Clock()
        backend = SlowBackend(clock)
        cache = make(lookup, clock, backend=backend)
        assert await cache.get("k") == "k@1" and await cache.get("k") == "k@1"
        return backend.threads

    loop_thread = threading.get_ident()  # asyncio.run runs the loop in this thread
    threads = asyncio.run(scenario())
    assert threads and loop_thread not in threads


class StallingBackend(SlowBackend):
    """A backend with I/O whose stores wait until ``resume`` is set (memcached on a stalling host)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.storing, self.resume = threading.Event(), threading.Event()

    def set(self, key: str, value: Any, stored_at: float, keep_seconds: float) -> None:
        self.storing.set()
        self.resume.wait(5)
        super().set(key, value, stored_at, keep_seconds)


def test_a_change_while_a_lookups_store_waits_neither_stalls_the_loop_nor_leaves_the_old_value() -> None:
    """The change waited on the event loop for the lock the store held in its thread."""
    async def scenario() -> float:
        lookup, clock = Lookup(), Clock()
        backend = StallingBackend(clock)
        cache = make(lookup, clock, backend=backend)
        getting = asyncio.ensure_future(cache.get("k"))
        await asyncio.to_thread(backend.storing.wait, 5)  # the lookup's value is being stored
        started = time.monotonic()
        await cache.ainvalidate("k")
        took = time.monotonic() - started
        backend.resume.set()
        assert await getting == "k@1"
        assert await cache.get("k") == "k@2"  # the value the store left after the change is dropped
        return took

    assert asyncio.run(scenario()) < 1


class VersionedStallingBackend:
    """A shared backend with versions, as memcached's, whose stores wait until ``resume`` is set."""

    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}
        self.version = self.deletes = 0
        self.storing, self.resume = threading.Event(), threading.Event()

    def get(self, key: str) -> Any:
        return self.entries.get(key)

    def get_versioned(self, key: str) -> tuple[Any, int]:
        return self.entries.get(key), self.version

    def set(self, key: str, value: Any, stored_at: float, keep_seconds: float) -> None:
        self.entries[key] = (value, stored_at)
        self.version += 1

    def set_if_unchanged(self, key: str, value: Any, stored_at: float, keep_seconds: float, version: int) -> None:
        self.storing.set()
        self.resume.wait(5)
        if version == self.version:
            self.set(key, value, stored_at, keep_seconds)

    def delete(self, key: str) -> None:  # in memcached, a mark of a change every host reads
        self.deletes += 1
        self.entries.pop(key, None)
        self.version += 1


def test_a_refresh_while_a_lookups_store_waits_on_a_shared_backend_marks_no_change() -> None:
    """A refresh is no change of the key: a store it outdated was followed by a drop, in memcached
    a mark of a change that every host read as one."""
    async def scenario() -> tuple[int, Any]:
        backend = VersionedStallingBackend()
        cache = AsyncPathCache(Lookup(), backend=backend)
        getting = asyncio.ensure_future(cache.get("k"))
        await asyncio.to_thread(backend.storing.wait, 5)
        refreshing = asyncio.ensure_future(cache.refresh("k", "k@0"))  # replicas of an older value failed
        await asyncio.sleep(0.1)
        backend.resume.set()
        await asyncio.gather(getting, refreshing)
        return backend.deletes, backend.entries["k"][0]

    assert asyncio.run(scenario()) == (0, "k@1")


class OrderedStoresBackend(VersionedStallingBackend):
    """The shared backend whose first store is slow, and any later one reaches it after the first."""

    def __init__(self) -> None:
        super().__init__()
        self.stores = 0
        self.first_done = threading.Event()

    def set_if_unchanged(self, key: str, value: Any, stored_at: float, keep_seconds: float, version: int) -> None:
        self.stores += 1
        if self.stores == 1:
            super().set_if_unchanged(key, value, stored_at, keep_seconds, version)
            self.first_done.set()
            return
        self.first_done.wait(5)
        if version == self.version:
            self.set(key, value, stored_at, keep_seconds)


def test_a_refresh_is_not_undone_by_the_store_of_a_lookup_begun_before_it() -> None:
    """The lookup stored the paths the refresh found wrong, and the refresh's were refused: both
    had found the same version of the entry, and the first store won."""
    async def scenario() -> tuple[str, Any]:
        backend, lookup = OrderedStoresBackend(), Lookup()
        cache = AsyncPathCache(lookup, backend=backend)
        getting = asyncio.ensure_future(cache.get("k"))  # finds "k@1", stored slowly
        await asyncio.to_thread(backend.storing.wait, 5)
        asyncio.get_running_loop().call_later(0.2, backend.resume.set)
        refreshed = await cache.refresh("k", "k@1")  # every replica of "k@1" failed
        await getting
        return refreshed, backend.entries["k"][0]

    assert asyncio.run(scenario()) == ("k@2", "k@2")


@pytest.mark.parametrize("cancelled_first", [True, False], ids=["before-the-refresh", "as-the-refresh-waits"])
def test_a_refresh_is_not_undone_by_the_store_of_a_lookup_whose_task_was_cancelled(cancelled_first: bool) -> None:
    """Its client gone, the lookup's task ends, but its store goes on in a thread: it stored the
    paths the refresh found wrong, after the refresh's."""
    async def scenario() -> tuple[str, Any]:
        backend, lookup = OrderedStoresBackend(), Lookup()
        cache = AsyncPathCache(lookup, backend=backend)
        getting = asyncio.ensure_future(cache.get("k"))
        await asyncio.to_thread(backend.storing.wait, 5)
        if cancelled_first:
            getting.cancel()
            await asyncio.sleep(0)
        refreshing = asyncio.ensure_future(cache.refresh("k", "k@1"))
        await asyncio.sleep(0.1)
        getting.cancel()
        asyncio.get_running_loop().call_later(0.2, backend.resume.set)
        refreshed = await refreshing
        await asyncio.gather(getting, return_exceptions=True)
        return refreshed, backend.entries["k"][0]

    assert asyncio.run(scenario()) == ("k@2", "k@2")


def test_a_warm_in_process_entry_is_had_without_awaiting() -> None:
    async def scenario() -> None:
        lookup, clock = Lookup(), Clock()
        cache = make(lookup, clock)
        assert cache.cached("k") is None
        assert await cache.get("k") == "k@1"
        assert cache.cached("k") == "k@1"
        clock.now += 11
        assert cache.cached("k") is None  # stale: get() decides, with stale-if-error
        slow = make(lookup, clock, backend=SlowBackend(clock))
        await slow.get("k")
        assert slow.cached("k") is None  # a backend with I/O is never asked on the loop
    asyncio.run(scenario())


def test_the_check_of_a_held_value_fails_once_the_cache_forgets_replaces_or_outlives_it() -> None:
    """What an answer decided from a cached value is kept by: true while that very entry is the
    cache's and fresh; no check for a value the cache does not hold now."""
    async def scenario() -> None:
        lookup, clock = Lookup(), Clock()
        cache = make(lookup, clock)
        value = await cache.get("k")
        assert cache.holding("k", "".join(["k@", "1"])) is None  # equal, but not the one held
        assert cache.holding("other", value) is None
        holds = cache.holding("k", value)
        assert holds is not None and holds() and holds()
        clock.now += 9.9
        assert holds()
        clock.now += 0.1
        assert not holds()  # stale: get() decides, with stale-if-error
        assert cache.holding("k", value) is None
        clock.now -= 10
        replaced = cache.holding("k", value)
        assert replaced is not None and replaced()
        again = await cache.refresh("k", value)
        assert again == "k@2" and not replaced()
        forgotten = cache.holding("k", again)
        assert forgotten is not None and forgotten()
        await cache.ainvalidate("k")
        assert not forgotten()
        held = cache.holding("k", await cache.get("k"))
        assert held is not None and held() and not forgotten()
        clock.now -= 1_000  # a clock set back: the entry is no longer known to be fresh
        assert not held()
        slow = make(lookup, clock, backend=SlowBackend(clock))
        assert slow.holding("k", await slow.get("k")) is None  # a backend with I/O is never asked on the loop
        own_clock = make(lookup, clock, backend=MemoryCache(clock=Clock()))
        assert own_clock.holding("k", await own_clock.get("k")) is None  # its expiry times are on another clock
        same_clock = make(lookup, clock, backend=MemoryCache(clock=clock))
        assert same_clock.holding("k", await same_clock.get("k")) is not None
    asyncio.run(scenario())


class ThreadWatchedCache(MemoryCache):
    """A MemoryCache that tells when a thread of a given name has asked it."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.asked = threading.Event()

    def get(self, key: str) -> Any:
        if threading.current_thread().name == self.name:
            self.asked.set()
        return super().get(key)


def test_a_lookup_under_way_on_another_threads_loop_is_joined() -> None:
    """One middleware shared by threads, each running its own loop: a miss of a key being looked
    up on another loop awaits that lookup, its value or its error, as on the same loop."""
    calls: list[str] = []
    started, release = threading.Event(), threading.Event()

    async def lookup(key: str, previous: str | None) -> str:
        calls.append(key)
        started.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        if key == "bad":
            raise ValueError("the tracker said no")
        return f"{key}@{len(calls)}"

    backend = ThreadWatchedCache("follower")
    cache = AsyncPathCache(lookup, backend=backend, ttl_seconds=10, stale_seconds=30)
    results: dict[str, Any] = {}

    def ask(name: str, key: str) -> None:
        try:
            results[name] = asyncio.run(asyncio.wait_for(cache.get(key), 10))
        except Exception as error:
            results[name] = error

    for key in ("k", "bad"):
        started.clear(), release.clear(), backend.asked.clear()
        leader = threading.Thread(target=ask, args=(f"leader {key}", key), name="leader")
        leader.start()
        assert started.wait(5)
        follower = threading.Thread(target=ask, args=(f"follower {key}", key), name="follower")
        follower.start()
        assert backend.asked.wait(5)
        time.sleep(0.1)  # the follower waits on the leader's lookup, which goes on until released
        release.set()
        leader.join(10), follower.join(10)
    assert results["leader k"] == results["follower k"] == "k@1"
    assert isinstance(results["follower bad"], ValueError) and isinstance(results["leader bad"], ValueError)
    assert calls == ["k", "bad"]  # one lookup each


class FirstLookupHangs:
    """A lookup whose first call never ends (its loop stops under it); the later ones answer."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, key: str, previous: str | None) -> str:
        self.calls.append(key)
        if len(self.calls) == 1:
            await asyncio.sleep(3600)
        return f"{key}@{len(self.calls)}"


def test_a_lookup_left_on_a_stopped_loop_does_not_hold_up_another() -> None:
    """A loop stopped mid-lookup (a server stopped abruptly) leaves its lookup unfinished: the
    next loop's request looks the key up itself, at once."""
    lookup = FirstLookupHangs()
    cache = AsyncPathCache(lookup, ttl_seconds=10, stale_seconds=30)
    stopped = asyncio.new_event_loop()
    abandoned = stopped.create_task(cache.get("k"))
    stopped.run_until_complete(asyncio.sleep(0.05))  # the lookup is under way when the loop stops
    try:
        started = time.monotonic()
        assert asyncio.run(asyncio.wait_for(cache.get("k"), 5)) == "k@2"
        assert time.monotonic() - started < 1
    finally:
        abandoned.cancel()
        stopped.run_until_complete(asyncio.gather(abandoned, return_exceptions=True))
        stopped.close()
    assert cache.cached("k") == "k@2"  # what the abandoned lookup left behind is not kept


def test_a_request_awaiting_a_loop_that_stops_mid_lookup_looks_the_key_up_itself() -> None:
    """The loop leading a lookup stops while another thread's request awaits it: that request
    does not wait out ``wait_seconds`` (then a 503, or stale paths), it looks the key up."""
    lookup = FirstLookupHangs()
    backend = ThreadWatchedCache("follower")
    cache = AsyncPathCache(lookup, backend=backend, ttl_seconds=10, stale_seconds=30)
    leading = asyncio.new_event_loop()
    leader = threading.Thread(target=leading.run_forever)
    leader.start()
    asyncio.run_coroutine_threadsafe(cache.get("k"), leading)
    result: dict[str, Any] = {}

    def follow() -> None:
        started = time.monotonic()
        result["value"] = asyncio.run(asyncio.wait_for(cache.get("k"), 5))
        result["seconds"] = time.monotonic() - started

    try:
        for _ in range(500):
            if lookup.calls:
                break
            time.sleep(0.01)
        follower = threading.Thread(target=follow, name="follower")
        follower.start()
        assert backend.asked.wait(5)
        time.sleep(0.1)  # the follower awaits the leader's lookup
        leading.call_soon_threadsafe(leading.stop)
        follower.join(10)
        assert result.get("value") == "k@2" and result["seconds"] < 2
    finally:
        if leader.is_alive():
            leading.call_soon_threadsafe(leading.stop)
            leader.join(10)
        pending = asyncio.all_tasks(leading)
        for task in pending:
            task.cancel()
        leading.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        leading.close()


def test_a_refresh_that_joins_a_lookup_begun_after_it_is_not_given_the_value_it_found_outdated() -> None:
    """The trackers down, a request's lookup that began as a refresh awaited its store serves the
    outdated value stale to itself; the refresh, joining it, was given it too (a 502, not a 503)."""
    down = TrackerUnavailableError("no tracker answered")
    calls = 0

    async def scenario() -> None:
        clock, gate = Clock(), asyncio.Event()

        async def lookup(key: str, previous: str | None) -> str:
            nonlocal calls
            calls += 1
            if calls == 2:  # the plain request's lookup, in flight as the refresh comes
                await gate.wait()
                return "v1"  # the tracker still names the replicas that failed
            if calls > 2:
                await asyncio.sleep(0.01)  # a tracker that fails after a moment
                raise down
            return "v1"

        cache = AsyncPathCache(lookup, clock=clock, ttl_seconds=10, stale_seconds=300)
        first = await cache.get("k")
        clock.now += 11  # expired: kept for stale serving
        plain = asyncio.ensure_future(cache.get("k"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)

        async def later_request() -> str:
            await asyncio.sleep(0)
            return await cache.get("k")

        gate.set()  # the plain lookup ends, its store queued; the trackers then go down
        refreshed, got_later = await asyncio.gather(cache.refresh("k", first), later_request(),
                                                    return_exceptions=True)
        assert await plain == "v1" and got_later == "v1"
        assert refreshed is down

    asyncio.run(scenario())


def test_while_a_shared_backend_fails_tasks_share_what_the_process_looked_up() -> None:
    """As the blocking cache: one lookup for the key while memcached is skipped, not one per request."""

    async def scenario() -> None:
        lookup, clock, shared = Lookup(), Clock(), Restarting()
        cache = make(lookup, clock, backend=shared)
        assert await cache.get("k") == "k@1"
        shared.down = True
        assert [await cache.get("k") for _ in range(5)] == ["k@2"] * 5
        assert set(await asyncio.gather(*(cache.get("j") for _ in range(20)))) == {"j@3"}
        await cache.ainvalidate("k")
        assert await cache.get("k") == "k@4" and lookup.calls == cache.lookups == 4

    asyncio.run(scenario())
