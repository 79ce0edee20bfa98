"""The shared path cache in a real memcached: the backend, an outage, and two gunicorn workers sharing it."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import pickle
import re
import signal
import socket
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import DOMAIN, require_module
from forks import children_failing, exit_code, fork_without_hooks, holding
from integration._gunicorn import run_gunicorn
from integration._memcached import MemcachedServer, start_memcached, writes_delayed
from integration._wire_client import eventually, http_request
from pymemcache.client.base import Client as MemcacheClient
from pymemcache.client.rendezvous import RendezvousHash
from pymemcache.exceptions import MemcacheError
from webtest import TestApp

from mogile_middleware import AsyncClient, Client, memcache
from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware
from mogile_middleware.cache import STANDBY_SECONDS, AsyncPathCache, PathCache, entry_key
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.cli import main
from mogile_middleware.memcache import MemcachedBackend
from mogile_middleware.paste import filter_factory
from mogile_middleware.middleware import MogileFSMiddleware
from mogile_middleware.locate import Location


def location(fid: int, key: str = "avatars/42.png") -> Location:
    """A location of ``key`` as the tracker would give it, with one replica of ``fid``."""
    return Location(key, (f"http://10.0.0.1:7500/dev1/0/000/000/{fid:010d}.fid",), f"fid-{fid}", fid * 10, True)


LOCATION = location(42)
BODY = b"shared by every worker\n"
#: What pymemcache raises for a server that is down, hung or marked dead.
DOWN = (MemcacheError, OSError)


@pytest.fixture
def memcached() -> Iterator[MemcachedServer]:
    """A memcached of the test's own, which it may stop."""
    with start_memcached() as server:
        yield server


@pytest.fixture(scope="module")
def shared_memcached() -> Iterator[MemcachedServer]:
    # memcached takes a second to stop: the tests that leave it running share one.
    with start_memcached() as server:
        yield server


@pytest.fixture
def backend(shared_memcached: MemcachedServer) -> MemcachedBackend:
    return MemcachedBackend(shared_memcached.address)


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"app\n"]


# The backend against a running memcached.

def test_a_location_and_no_such_key_come_back_equal(backend: MemcachedBackend) -> None:
    backend.set("avatars/42.png", LOCATION, 1700000000.5, 60)
    backend.set("avatars/missing.png", None, 1700000000.5, 60)
    assert backend.get("avatars/42.png") == (LOCATION, 1700000000.5)
    assert backend.get("avatars/missing.png") == (None, 1700000000.5)
    assert backend.get("avatars/43.png") is None
    with pytest.raises(TypeError, match="locations"):
        backend.set("other", "paths of other", 1.0, 60)


def test_a_location_whose_urls_name_no_fid_is_not_kept(backend: MemcachedBackend,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    # Never read back (an entry's URLs must be replica URLs of its fid), it was stored anyway,
    # and every request for the key logged an invalid entry before asking the trackers.
    rewritten = Location("no-fid", ("http://10.0.0.1:7500/files/k?v=1",), "paths-f1c93728eb3e0a43", 5, True)
    backend.set("no-fid", rewritten, 1700000000.5, 60)
    assert backend.get_versioned("no-fid") == (None, None)  # nothing in memcached under its name
    assert "invalid" not in caplog.text


def test_an_entry_expires_after_keep_seconds(backend: MemcachedBackend) -> None:
    backend.set("brief", LOCATION, time.time(), 1)
    assert backend.get("brief") is not None
    # memcached counts whole seconds on its own clock: gone within 1 to 2 s, allow a margin.
    assert eventually(lambda: backend.get("brief"), lambda entry: entry is None, timeout=4.0, every=0.1) is None


def test_delete_forgets_a_key(backend: MemcachedBackend) -> None:
    backend.set("gone", LOCATION, time.time(), 60)
    backend.delete("gone")
    backend.delete("never-set")
    assert backend.get("gone") is None


def test_a_lookup_stores_its_finding_only_over_the_entry_it_saw(backend: MemcachedBackend) -> None:
    other_process, key = MemcachedBackend(backend.servers), "versioned"
    old, new = location(1, key), location(2, key)
    for before in (lambda: None, lambda: backend.set(key, old, time.time(), 60)):  # no entry, or one
        before()
        _, version = backend.get_versioned(key)
        other_process.delete(key)  # a write elsewhere, as the lookup runs
        backend.set_if_unchanged(key, old, time.time(), 60, version)  # what the lookup found: the old version
        assert backend.get(key) is None  # the mark of the change: a miss for everyone
    seen, version = backend.get_versioned(key)  # a lookup that began after the change
    assert seen is None and version is not None
    backend.set_if_unchanged(key, new, time.time(), 60, version)
    assert backend.get(key)[0] == new  # type: ignore[index]
    other_process.set_if_unchanged(key, old, time.time(), 60, version)  # over a finding stored meanwhile: no
    assert backend.get(key)[0] == new  # type: ignore[index]


def test_a_worker_never_brings_back_the_version_a_writer_replaced(devmogile: DevMogileFS,
                                                                  shared_memcached: MemcachedServer) -> None:
    """Worker A looks a key up; another process overwrites the key and drops it from memcached while
    A's answer is on its way: A must not store the old version for every other worker."""
    writer = Client(DOMAIN, devmogile.trackers, cache_backend=MemcachedBackend(shared_memcached.address))
    writer.store_content("raced.txt", b"old", "thumb")
    reader = Client(DOMAIN, devmogile.trackers)
    looked_up, release = threading.Event(), threading.Event()

    def lookup(entry: str, previous: Location | None = None) -> Location:  # entries by domain, as the middleware's
        key = entry.split(":", 2)[2]
        info = reader.file_info(key)
        return Location(key, tuple(reader.get_paths(key)), f"fid-{info.fid}", info.length, True)

    def slow_lookup(entry: str, previous: Location | None) -> Location:
        paths = lookup(entry, previous)
        looked_up.set()
        release.wait(10)
        return paths

    worker_a = PathCache(slow_lookup, backend=MemcachedBackend(shared_memcached.address), ttl_seconds=60)
    other_worker = PathCache(lookup, backend=MemcachedBackend(shared_memcached.address), ttl_seconds=60)
    racing = threading.Thread(target=worker_a.get, args=(entry_key(DOMAIN, "raced.txt"),))
    racing.start()
    assert looked_up.wait(10)
    writer.store_content("raced.txt", b"new", "thumb")  # drops the key from memcached, then returns
    release.set()
    racing.join(10)
    assert other_worker.get(entry_key(DOMAIN, "raced.txt")).etag == f"fid-{reader.file_info('raced.txt').fid}"
    assert other_worker.lookups == 1  # a miss: worker A stored nothing
    assert worker_a.get(entry_key(DOMAIN, "raced.txt")) == other_worker.get(entry_key(DOMAIN, "raced.txt"))


def test_the_lookup_after_a_change_is_stored_at_once(backend: MemcachedBackend) -> None:
    """A change marks the key; the first lookup after it replaces the mark, for every process."""
    key, found = "after-change", iter([location(1, "after-change"), location(2, "after-change")])
    cache = PathCache(lambda key, previous: next(found), backend=backend, ttl_seconds=60)
    async_cache = AsyncPathCache(_async(lambda key, previous: location(3, key)),
                                 backend=MemcachedBackend(backend.servers), ttl_seconds=60)
    assert cache.get(key) == location(1, key)
    cache.invalidate(key)  # a write through this process's client, or replicas that failed
    assert [cache.get(key) for _ in range(3)] == [location(2, key)] * 3 and cache.lookups == 2
    assert asyncio.run(async_cache.get(key)) == location(2, key) and async_cache.lookups == 0
    async_cache.invalidate(key)
    assert [asyncio.run(async_cache.get(key)) for _ in range(3)] == [location(3, key)] * 3
    assert async_cache.lookups == 1 and cache.get(key) == location(3, key) and cache.lookups == 2


def test_refreshes_of_the_same_failed_paths_share_one_lookup_whose_finding_is_kept(backend: MemcachedBackend) -> None:
    """Two requests found the same replicas dead: the second joins the first's lookup, and what it
    found is stored (the second re-storing the dead paths as expired made the first's store fail)."""
    key, entered, release = "refreshed", threading.Event(), threading.Event()
    found = iter([location(1, key), location(2, key), location(3, key)])

    def lookup(key: str, previous: Location | None) -> Location:
        value = next(found)
        if value == location(2, key):
            entered.set()
            release.wait(5)
        return value

    cache = PathCache(lookup, backend=backend, ttl_seconds=60)
    dead = cache.get(key)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(cache.refresh, key, dead)
        assert entered.wait(5)
        second = pool.submit(cache.refresh, key, dead)
        time.sleep(0.2)
        release.set()
        assert first.result(5) == second.result(5) == location(2, key)
    assert cache.lookups == 2 and cache.get(key) == location(2, key) and cache.lookups == 2


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_request_after_a_change_does_not_join_a_lookup_begun_before_it(backend: MemcachedBackend,
                                                                         flavour: str) -> None:
    """A lookup is in progress when another process changes the key (its mark in memcached); a
    request that comes after the change and joins that lookup must not answer its old finding."""
    key = f"joined-{flavour}"
    started, release = threading.Event(), threading.Event()
    found = iter([location(1, key), location(2, key)])  # before the change, then after it

    def lookup(entry: str, previous: Location | None) -> Location:
        value = next(found)
        if value.etag == "fid-1":
            started.set()
            release.wait(10)
        return value

    writer = MemcachedBackend(backend.servers)
    if flavour == "sync":
        cache = PathCache(lookup, backend=backend, ttl_seconds=60)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(cache.get, key)
            assert started.wait(10)
            writer.delete(key)  # another process's write
            after = pool.submit(cache.get, key)  # joins the lookup begun before the write
            time.sleep(0.2)
            assert not after.done()  # waiting on that lookup (a lookup of its own would not wait)
            release.set()
            assert first.result(10) == location(1, key)  # it began before the change
            assert after.result(10) == location(2, key)
    else:
        async_cache = AsyncPathCache(_async_in_thread(lookup), backend=backend, ttl_seconds=60)

        async def race() -> tuple[Location, Location]:
            first = asyncio.ensure_future(async_cache.get(key))
            assert await asyncio.to_thread(started.wait, 10)
            await asyncio.to_thread(writer.delete, key)
            after = asyncio.ensure_future(async_cache.get(key))
            await asyncio.sleep(0.2)
            assert not after.done()  # waiting on that lookup (a lookup of its own would not wait)
            release.set()
            return await first, await after

        assert asyncio.run(race()) == (location(1, key), location(2, key))
    assert backend.get(key)[0] == location(2, key)  # type: ignore[index]


def _async_in_thread(lookup: Callable[[str, Location | None], Location]
                     ) -> Callable[[str, Location | None], Awaitable[Location]]:
    async def looked_up(key: str, previous: Location | None) -> Location:
        return await asyncio.to_thread(lookup, key, previous)
    return looked_up


def _async(lookup: Callable[[str, Location | None], Location]
           ) -> Callable[[str, Location | None], Awaitable[Location]]:
    async def looked_up(key: str, previous: Location | None) -> Location:
        return lookup(key, previous)
    return looked_up


def test_a_mark_asks_a_server_taken_for_dead_each_time_and_is_left_once_it_is_back(memcached: MemcachedServer) -> None:
    backend = MemcachedBackend(memcached.address, timeout=0.3)
    reader = MemcachedBackend(memcached.address)
    reader.set("k", location(1, "k"), time.time(), 60)
    os.kill(memcached.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(DOWN):
            backend.get("k")  # a timeout: marked dead
        for _ in range(2):  # the server asked all the same, each time
            started = time.monotonic()
            with pytest.raises(DOWN):
                backend.delete("other")
            assert 0.25 <= time.monotonic() - started < 2  # its timeout, not skipped at once
    finally:
        os.kill(memcached.process.pid, signal.SIGCONT)
    # Back within the time it is taken for dead: the mark of the next change is left. It was
    # skipped for 5 s after the last ask, and every host served the old version it kept.
    backend.delete("k")
    assert reader.get("k") is None


def test_keys_memcached_could_not_hold_work_and_stay_distinct(backend: MemcachedBackend,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    keys = ["with spaces in it", " leading blank", "ünïcødé/файл.png", "tab\there", "k" * 255, "k" * 253 + "é",
            "caf\udce9", "caf\udce8"]  # the last two not UTF-8 (b"caf\xe9"), as clients give such keys
    for number, key in enumerate(keys):
        backend.set(key, location(number, key), 1.0, 60)
    assert [backend.get(key) for key in keys] == [(location(number, key), 1.0) for number, key in enumerate(keys)]
    for key in keys:
        backend.delete(key)
    assert [backend.get(key) for key in keys] == [None] * len(keys) and not caplog.records


def test_servers_are_written_as_trackers_are() -> None:
    backend = MemcachedBackend(["::1", "[::1]:11212", "cache.example", "10.0.0.9:11213"])
    assert backend.servers == [("::1", 11211), ("::1", 11212), ("cache.example", 11211), ("10.0.0.9", 11213)]
    # A unix socket as Django's PyMemcacheCache and pymemcache write it, or its path alone.
    sockets = MemcachedBackend("unix:/run/memcached.sock /run/other.sock").servers
    assert sockets == ["/run/memcached.sock", "/run/other.sock"]
    assert MemcachedBackend(backend.servers).servers == backend.servers


def test_a_prefix_memcached_cannot_take_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        MemcachedBackend(prefix="my site:")


@pytest.mark.parametrize(("options", "named"), [
    ({"servers": "127.0.0.1:99999"}, "127.0.0.1:99999"), ({"servers": ["127.0.0.1:11211", "cache:abc"]}, "cache:abc"),
    ({"timeout": 0}, "timeout"), ({"connect_timeout": -1}, "connect_timeout"),
    # Read by pymemcache as hosts "http://127.0.0.1" and "127.0.0.1:11211": the cache was off at every request.
    ({"servers": "http://127.0.0.1:11211"}, "http://127.0.0.1:11211"), ({"servers": "127.0.0.1:11211:3"}, "11211:3"),
    ({"servers": "10.0.0.300"}, "10.0.0.300"),
    # An AttributeError or a TypeError naming nothing; bytes were read as a list of numbers.
    ({"servers": None}, "servers must be"), ({"servers": b"127.0.0.1:11211"}, "servers must be"),
    ({"servers": [None]}, "server None is not"), ({"servers": [("127.0.0.1", "11211")]}, "is not host:port"),
    ({"prefix": None}, "prefix must be text"),
    # An IPv6 address's last group was read as the port, and text around brackets was dropped.
    ({"servers": "2001:db8::1:11212"}, "2001:db8::1:11212"), ({"servers": "[::1]]:11211"}, r"\[::1\]\]:11211"),
    ({"servers": "[cache.example]:11211"}, r"\[cache.example\]:11211"),
    ({"prefix": b"site:"}, "prefix must be text"),
])
def test_servers_and_timeouts_no_request_could_use_are_refused(options: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        MemcachedBackend(**options)  # type: ignore[arg-type]


def test_keys_spread_over_several_servers(memcached: MemcachedServer) -> None:
    with start_memcached() as second:
        backend = MemcachedBackend(f"{memcached.address}, {second.address}")
        for number in range(40):
            backend.set(f"key{number}", location(number, f"key{number}"), 1.0, 60)
        assert [backend.get(f"key{number}") for number in range(40)] == [
            (location(number, f"key{number}"), 1.0) for number in range(40)]
        items = [int(MemcacheClient(server.address).stats()[b"curr_items"]) for server in (memcached, second)]
        assert sum(items) == 40 and min(items) > 0, items


def test_a_dead_servers_keys_do_not_move_to_another_server(memcached: MemcachedServer) -> None:
    """Stored on another server meanwhile, a key would outlive a writer's drop on its own server."""
    with start_memcached() as second:
        backend = MemcachedBackend(f"{memcached.address}, {second.address}")
        ring = RendezvousHash([memcached.address, second.address])
        first_keys = [key for key in (f"key{number}" for number in range(40))
                      if ring.get_node(backend._memcached_key(key)) == memcached.address][:5]
        assert len(first_keys) == 5
        memcached.stop()
        for key in first_keys:
            with pytest.raises(DOWN):
                backend.set(key, location(1, key), time.time(), 60)
            with pytest.raises(DOWN):
                backend.get(key)
        assert int(MemcacheClient(second.address).stats()[b"curr_items"]) == 0


def test_threads_share_a_backend(backend: MemcachedBackend) -> None:
    failures: list[object] = []

    def work(thread: int) -> None:
        try:
            for number in range(50):
                key = f"thread{thread}/{number}"
                backend.set(key, location(thread * 100 + number, key), 1.0, 60)
                if (entry := backend.get(key)) != (location(thread * 100 + number, key), 1.0):
                    failures.append(entry)
        except Exception as error:  # noqa: BLE001 - an exception in a thread would not fail the test
            failures.append(error)

    threads = [threading.Thread(target=work, args=(thread,)) for thread in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == []


def test_a_backend_dropped_closes_its_connections_unwarned(shared_memcached: MemcachedServer) -> None:
    """A backend made for each test (an application factory's) left its connections to the
    collector, a ResourceWarning each: a suite with ``filterwarnings = error`` failed on them."""
    stats = MemcacheClient(shared_memcached.address)
    backend = MemcachedBackend(shared_memcached.address)
    with ThreadPoolExecutor(3) as pool:  # a connection each, kept idle after
        list(pool.map(lambda _: backend.set("key", LOCATION, 1.0, 60), range(30)))
    opened = stats.stats()[b"curr_connections"]
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        del backend
        gc.collect()
    assert [str(warning.message)[:40] for warning in caught if warning.category is ResourceWarning] == []
    assert eventually(lambda: stats.stats()[b"curr_connections"], lambda now: now < opened) < opened


@pytest.mark.parametrize("fork", [os.fork, fork_without_hooks], ids=["os.fork", "without-hooks"])
def test_a_forked_child_uses_its_own_connection(backend: MemcachedBackend, shared_memcached: MemcachedServer,
                                                fork: Callable[[], int]) -> None:
    parent, child = location(1, "parent"), location(2, "child")
    backend.set("parent", parent, 1.0, 60)
    backend.set("child", child, 1.0, 60)  # the parent's connection is open before the fork
    stats = MemcacheClient(shared_memcached.address)
    opened = stats.stats()[b"total_connections"]
    pid = fork()
    if pid == 0:  # the child's first call opens a connection of its own (stats' aside)
        ok = backend.get("child") == (child, 1.0) and stats.stats()[b"total_connections"] == opened + 1
        os._exit(0 if ok else 1)
    assert exit_code(pid) == 0
    pid = fork()
    if pid == 0:  # the child: a shared socket would mix its replies with the parent's
        ok = all(backend.get("child") == (child, 1.0) for _ in range(300))
        os._exit(0 if ok else 1)
    parent_ok = all(backend.get("parent") == (parent, 1.0) for _ in range(300))
    assert parent_ok and exit_code(pid) == 0


def test_a_child_forked_while_a_thread_takes_a_connection_can_take_one(backend: MemcachedBackend) -> None:
    backend.set("child", location(2, "child"), 1.0, 60)
    assert children_failing(holding(backend._lock), lambda: backend.get("child")) == 0


# Entries that cannot be forged or mixed up.

class _Boom:
    """A pickle payload that would run code in whoever unpickles it."""

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (RAN,))


RAN = Path("/tmp/mogile-memcached-pickle-ran")


@pytest.mark.parametrize("forged", [
    pytest.param(lambda: pickle.dumps((_Boom(), 1.0)), id="pickle-payload"),
    pytest.param(lambda: json.dumps([1, "k", 1.0, ["k", ["http://169.254.169.254/latest/meta-data/"], "fid-1", 5,
                                                   True]]).encode(), id="foreign-url"),
    pytest.param(lambda: json.dumps([1, "k", 1.0, ["k", ["http://169.254.169.254/latest/meta-data/?/dev1/1.fid"],
                                                   "fid-1", 5, True]]).encode(), id="foreign-url-replica-in-query"),
    pytest.param(lambda: json.dumps([1, "k", 1.0, ["k", ["http://10.0.0.9/internal/admin#/dev1/1.fid"],
                                                   "fid-1", 5, True]]).encode(), id="foreign-url-replica-in-fragment"),
    pytest.param(lambda: json.dumps([1, "k", 1.0, ["k", ["http://10.0.0.1:7500/dev1/0/000/000/0000000002.fid"],
                                                   "fid-1", 5, True]]).encode(), id="another-fids-replica"),
    pytest.param(lambda: json.dumps([1, "k", 1.0, ["k", ["http://10.0.0.1:7500/dev1/0/000/000/0000000001.fid\r\n"
                                                         "X-Evil: 1"], "fid-1", 5, True]]).encode(), id="header-break"),
    pytest.param(lambda: json.dumps([1, "k", 1.0, ["k", [], "fid-1", 5, True]]).encode(), id="no-paths"),
    pytest.param(lambda: json.dumps([1, "other", 1.0, None]).encode(), id="stored-for-another-key"),
    pytest.param(lambda: b"\x80garbage", id="garbage"),
    # Times at which an entry would never grow old: "no such key" for ever.
    pytest.param(lambda: b'[1, "k", 1e400, null]', id="stored-at-infinity"),
    pytest.param(lambda: json.dumps([1, "k", time.time() + 2 * 86400, None]).encode(), id="stored-in-two-days"),
    pytest.param(lambda: b'[1, "k", 1' + b"0" * 400 + b", null]", id="stored-at-a-time-no-float-holds"),
    pytest.param(lambda: b"[" * 100_000 + b"]" * 100_000, id="nested-deeper-than-the-parser-goes"),
])
def test_a_forged_entry_is_a_miss_and_runs_nothing(backend: MemcachedBackend, shared_memcached: MemcachedServer,
                                                   forged, caplog: pytest.LogCaptureFixture) -> None:
    RAN.unlink(missing_ok=True)
    MemcacheClient(shared_memcached.address).set(backend._memcached_key("k"), forged(), noreply=False)
    assert backend.get("k") is None
    assert not RAN.exists()
    assert "invalid memcached entry" in caplog.text
    backend.set("k", location(3, "k"), time.time(), 60)  # what a lookup finds replaces it
    assert backend.get("k")[0] == location(3, "k")  # type: ignore[index]


def test_invalid_entries_are_logged_a_line_at_a_time(shared_memcached: MemcachedServer,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Sites with different secrets over one memcached read each other's entries on every request:
    one line, then one per interval counting those left out."""
    monkeypatch.setattr(memcache, "INVALID_WARNING_INTERVAL", 0.5)
    other_site, backend = MemcachedBackend(shared_memcached.address, secret="theirs"), MemcachedBackend(
        shared_memcached.address, secret="ours")
    other_site.set("theirs", LOCATION, time.time(), 60)
    for _ in range(5):
        assert backend.get("theirs") is None
    time.sleep(0.6)
    assert backend.get("theirs") is None
    lines = [record.getMessage() for record in caplog.records if "invalid memcached entry" in record.getMessage()]
    assert len(lines) == 2 and "signature does not match" in lines[0]
    assert re.search(r"\(4 more invalid entries in the \d+ s since the last line like this\)$", lines[1])


def test_an_entry_stored_ahead_of_this_hosts_clock_is_logged(backend: MemcachedBackend,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Hosts whose clocks differ by more than ``path_cache_seconds`` miss on each other's every
    entry, each lookup storing over the other's (twice the tracker calls of no memcached), and
    nothing said so."""
    backend.set("ahead", LOCATION, time.time() + 30, 60)  # a host 30 s ahead
    backend.set("same", LOCATION, time.time() + 0.01, 60)  # one NTP keeps with this host's
    assert backend.get("ahead") is not None and backend.get("same") is not None
    lines = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(lines) == 1 and lines[0].startswith("the memcached entry for 'ahead' was stored ")
    assert " s ahead of this host's clock: the clocks of the hosts sharing memcached differ" in lines[0]


def test_a_secret_signs_every_entry(shared_memcached: MemcachedServer) -> None:
    signed = MemcachedBackend(shared_memcached.address, secret="s3cret")
    unsigned = MemcachedBackend(shared_memcached.address)
    other = MemcachedBackend(shared_memcached.address, secret=b"another")
    signed.set("signed", LOCATION, 1.0, 60)
    assert signed.get("signed") == (LOCATION, 1.0)
    assert other.get("signed") is None and unsigned.get("signed") is None
    unsigned.set("unsigned", LOCATION, 1.0, 60)  # valid, but not signed: a forgery to the signed backend
    assert signed.get("unsigned") is None
    entry = MemcacheClient(shared_memcached.address).get(signed._memcached_key("signed"))
    tampered = entry.replace(b"0000000042.fid", b"0000000043.fid").replace(b"fid-42", b"fid-43")
    MemcacheClient(shared_memcached.address).set(signed._memcached_key("signed"), tampered, noreply=False)
    assert signed.get("signed") is None


@pytest.mark.parametrize(("first", "second"), [
    pytest.param("old", ["old", "new"], id="the new one given second"),
    pytest.param(["old", "new"], ["new", "old"], id="then first"),
    pytest.param(["new", "old"], "new", id="then alone"),
])
def test_sites_changing_their_secret_step_by_step_read_each_others_entries(
        devmogile: DevMogileFS, shared_memcached: MemcachedServer, first: object, second: object) -> None:
    """Two secrets at once, each process's entries were invalid to the other: every request was a
    lookup, whose finding replaced the other's, and every 404 waited for the key to settle."""
    Client(DOMAIN, devmogile.trackers).store_content("rotated.txt", b"kept", "thumb")
    prefix = f"rotation-{os.urandom(4).hex()}:"  # none of the other cases' entries
    sites = [TestApp(MogileFSMiddleware(hello, domain=DOMAIN, trackers=devmogile.trackers, cache_backend=MemcachedBackend(
        shared_memcached.address, prefix=prefix, secret=secret))) for secret in (first, second)]
    for _ in range(3):
        for site in sites:
            assert site.get("/mogilefs/rotated.txt").body == b"kept"
            site.get("/mogilefs/missing.txt", status=404)
    assert sum(site.app.locator.paths.lookups for site in sites) == 2  # each key's first request


EMPTY = "an empty one, or one of blanks only"


@pytest.mark.parametrize(("secret", "named"), [("", EMPTY), (b"", EMPTY), (42, "int"), ([], "an empty list"),
                                               (["new", ""], EMPTY),
                                               (" ", EMPTY), (["new", b"\n"], EMPTY),  # a template left unfilled
                                               (["new", 42], "a list holding int")])
def test_a_secret_that_signs_nothing_is_refused(secret: object, named: str) -> None:
    """An empty secret used to sign nothing, silently: entries anyone could forge."""
    with pytest.raises(ValueError, match=f"secret must be a non-empty string or bytes, or a list of them, not {named}$"):
        MemcachedBackend("127.0.0.1:1", secret=secret)  # type: ignore[arg-type]


def test_two_domains_on_one_memcached_each_get_their_own_bytes(tmp_path: Path,
                                                               shared_memcached: MemcachedServer) -> None:
    with DevMogileFS(tmp_path / "mogdata", domains={"photos": {"one": 1}, "music": {"one": 1}}) as mogile:
        sites = {}
        for domain in ("photos", "music"):
            Client(domain, mogile.trackers).store_content("same/name.txt", f"from {domain}".encode(), cls="one")
            sites[domain] = TestApp(MogileFSMiddleware(
                hello, domain=domain, trackers=mogile.trackers, reproxy="perlbal",
                cache_backend=MemcachedBackend(shared_memcached.address)))
        for _ in range(2):
            for domain, site in sites.items():
                urls = site.get("/mogilefs/same/name.txt").headers["X-REPROXY-URL"].split()
                assert {http_request(url).body for url in urls} == {f"from {domain}".encode()}


# memcached down: errors are quick, and each process keeps what the trackers answer meanwhile.

def test_a_stopped_memcached_fails_fast(memcached: MemcachedServer) -> None:
    backend = MemcachedBackend(memcached.address)
    backend.set("key", LOCATION, 1.0, 60)
    memcached.stop()
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(DOWN):
            backend.get("key")
        assert time.monotonic() - started < 1.0


def test_a_silent_memcached_costs_one_timeout_then_is_skipped() -> None:
    # It accepts connections (the kernel's backlog) but never answers, like a hung memcached.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        backend = MemcachedBackend(f"127.0.0.1:{silent.getsockname()[1]}", timeout=1.0)
        started = time.monotonic()
        with pytest.raises(DOWN):
            backend.get("key")
        assert 0.95 < time.monotonic() - started < 3.0
        started = time.monotonic()
        for _ in range(20):  # marked dead: no connection, no wait
            with pytest.raises(DOWN):
                backend.set("key", LOCATION, 1.0, 60)
        assert time.monotonic() - started < 0.5  # not one timeout more


#: How each server of ``babbling_memcached`` answers, and what a call to it ends with, and within how long.
BABBLES = {"trickling": ((b"V", 0.1), "did not answer within 0.3 s", 0.6),
           "endless": ((b"x" * 65536, 0.0), f"sent over {memcache.MAX_REPLY_BYTES} bytes for one call", 0.2)}


@pytest.fixture(params=sorted(BABBLES))
def babbling_memcached(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, float]]:
    """The address of a server that answers every call without end, for 10 s at most: a byte
    every 0.1 s (trickling), or bytes with no line end as fast as they go (endless); and what a
    call to it ends with, within how many seconds."""
    (piece, pause), error, seconds = BABBLES[request.param]
    stop = threading.Event()

    def babble(connection: socket.socket) -> None:
        with connection:
            try:
                connection.recv(4096)
                ends = time.monotonic() + 10
                while not stop.is_set() and time.monotonic() < ends:
                    connection.sendall(piece)
                    time.sleep(pause)
            except OSError:
                pass  # the client gave up

    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.1)

        def accept() -> None:
            while not stop.is_set():
                try:
                    threading.Thread(target=babble, args=(server.accept()[0],), daemon=True).start()
                except TimeoutError:
                    pass

        accepting = threading.Thread(target=accept, daemon=True)
        accepting.start()
        try:
            yield f"127.0.0.1:{server.getsockname()[1]}", error, seconds
        finally:
            stop.set()
            accepting.join()


@pytest.mark.parametrize("call", ["get", "delete"])
def test_a_memcached_answering_without_end_costs_one_timeout_then_is_skipped(
        babbling_memcached: tuple[str, str, float], call: str) -> None:
    """``timeout`` bounds a whole call, not each read of it (pymemcache's own), and what it reads
    is bounded too: a reader and a writer's mark give up in time, and the server counts as down."""
    address, error, seconds = babbling_memcached
    backend = MemcachedBackend(address, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(DOWN, match=f"^memcached at {address} {error}$"):
        getattr(backend, call)("key")
    assert time.monotonic() - started < seconds
    started = time.monotonic()
    with pytest.raises(DOWN):
        backend.get("key")  # marked dead: no connection, no wait
    assert time.monotonic() - started < 0.1


def test_a_writer_marks_a_change_on_a_server_it_took_for_dead_once_it_is_back(memcached: MemcachedServer) -> None:
    """Other hosts may read that server again already: without the mark they would serve the old version."""
    with start_memcached() as second:
        writer = MemcachedBackend(f"{memcached.address}, {second.address}", timeout=0.3)
        reader = MemcachedBackend(f"{memcached.address}, {second.address}")
        reader.set("k", location(1, "k"), time.time(), 60)
        os.kill(memcached.process.pid, signal.SIGSTOP)
        os.kill(second.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(DOWN):
                writer.get("k")  # a timeout: the key's server is marked dead for a few seconds
        finally:
            os.kill(memcached.process.pid, signal.SIGCONT)
            os.kill(second.process.pid, signal.SIGCONT)
        writer.delete("k")  # the change, with the server back
        assert reader.get("k") is None


def test_the_path_cache_keeps_paths_in_process_while_memcached_is_down(memcached: MemcachedServer) -> None:
    """A restart of memcached well under a second had every request of every process ask the
    trackers for as long as the server was skipped after (5 s): a lookup per request, not per key."""
    cache = PathCache(lambda key, previous: location(7, key), backend=MemcachedBackend(memcached.address))
    assert [cache.get("a") for _ in range(3)] == [location(7, "a")] * 3 and cache.lookups == 1
    memcached.stop()
    assert [cache.get("a") for _ in range(20)] == [location(7, "a")] * 20 and cache.lookups == 2
    assert [cache.get("b") for _ in range(20)] == [location(7, "b")] * 20 and cache.lookups == 3


def test_the_warning_of_a_memcached_down_names_it(caplog: pytest.LogCaptureFixture) -> None:
    """With several servers, the one down is told apart."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{unused.getsockname()[1]}"
    backend = MemcachedBackend(closed)
    cache = PathCache(lambda key, previous: location(7, key), backend=backend)
    assert cache.get("a") == location(7, "a")
    assert f"memcached at {closed}: Connection refused" in caplog.text
    # Then marked down, it was "All servers seem to be down right now", whichever was.
    with pytest.raises(MemcacheError, match=f"^memcached at {closed} failed lately: not asked again for up to 10 s$"):
        backend.get("a")


def test_the_warning_of_a_memcached_gone_while_connected_names_it(memcached: MemcachedServer,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    cache = PathCache(lambda key, previous: location(7, key), backend=MemcachedBackend(memcached.address))
    assert cache.get("a") == location(7, "a")  # a connection kept open
    memcached.stop()
    assert cache.get("a") == location(7, "a")
    assert f"memcached at {memcached.address} closed the connection" in caplog.text


def test_the_site_answers_from_a_shared_cache_and_without_it(devmogile: DevMogileFS,
                                                             memcached: MemcachedServer) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("hello.txt", BODY, cls="thumb")

    def site() -> tuple[TestApp, MogileFSMiddleware]:
        middleware = MogileFSMiddleware(hello, domain=DOMAIN, trackers=devmogile.trackers,
                                        cache_backend=MemcachedBackend(memcached.address))
        return TestApp(middleware, lint=True), middleware

    (first, first_middleware), (second, second_middleware) = site(), site()
    assert first.get("/mogilefs/hello.txt").body == BODY
    assert second.get("/mogilefs/hello.txt").body == BODY
    assert (first_middleware.locator.paths.lookups, second_middleware.locator.paths.lookups) == (1, 0)

    memcached.stop()
    for _ in range(3):
        assert second.get("/mogilefs/hello.txt").body == BODY
    assert second_middleware.locator.paths.lookups == 1  # kept in the process meanwhile
    assert second.get("/").body == b"app\n"


def test_a_site_reproxying_for_anyone_stores_entries_a_serving_site_can_use(devmogile: DevMogileFS,
                                                                             memcached: MemcachedServer) -> None:
    """A site that needs no length (reproxy without trusted_proxies) still keeps it in a shared
    cache: a site serving bodies from the same entries asks no tracker, not even while all are down."""
    writer = Client(DOMAIN, devmogile.trackers)
    writer.store_content("hello.txt", BODY, cls="avatar")
    assert len(eventually(lambda: writer.get_paths("hello.txt"), lambda paths: len(paths) == 2)) == 2

    def site(**options: Any) -> tuple[TestApp, MogileFSMiddleware]:
        middleware = MogileFSMiddleware(hello, domain=DOMAIN, trackers=devmogile.trackers,
                                        cache_backend=MemcachedBackend(memcached.address), **options)
        return TestApp(middleware), middleware

    (reproxying, _), (serving, serving_middleware) = site(reproxy="perlbal"), site()
    assert reproxying.get("/mogilefs/hello.txt").headers["X-REPROXY-URL"]
    devmogile.stop_tracker()
    try:
        assert serving.get("/mogilefs/hello.txt").body == BODY
        assert serving_middleware.locator.paths.lookups == 0
    finally:
        devmogile.start_tracker()


# Under asyncio: the event loop never waits on memcached, which a write or a relocation marks.

T = TypeVar("T")
#: The longest the event loop may go without running a task ready to run (a memcached call takes
#: 0.3 s or more in these tests).
STALL = 0.15


async def longest_stall(work: Awaitable[T]) -> tuple[T, float]:
    """``work``'s result, and the longest meanwhile between two turns of a task ticking every 10 ms
    (or between its last turn and the end of ``work``)."""
    gaps = [0.0]
    turns = [time.monotonic()]

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.01)
            turns.append(time.monotonic())
            gaps.append(turns[-1] - turns[-2])

    ticker = asyncio.ensure_future(tick())
    try:
        result = await work
        return result, max(*gaps, time.monotonic() - turns[-1])
    finally:
        ticker.cancel()


async def asgi_get(app: ASGIMiddleware, path: str) -> tuple[int, bytes]:
    """The status and body of ``GET path`` from ``app``."""
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return incoming.pop() if incoming else await asyncio.sleep(3600)  # the client stays

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
               "headers": [], "client": ("127.0.0.1", 5000), "root_path": ""}, receive, send)
    return sent[0]["status"], b"".join(message.get("body", b"") for message in sent[1:])


async def hello_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"app\n"})


@pytest.fixture
def hung_memcached() -> Iterator[str]:
    """The address of a memcached that accepts connections and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        yield f"127.0.0.1:{silent.getsockname()[1]}"


def test_an_async_writer_marks_its_changes_without_stalling_the_event_loop(
        devmogile: DevMogileFS, hung_memcached: str, caplog: pytest.LogCaptureFixture) -> None:
    async def write() -> list[tuple[float, bool]]:
        client = AsyncClient(DOMAIN, devmogile.trackers, cache_backend=MemcachedBackend(hung_memcached, timeout=0.3))
        outcomes = []
        try:
            for change in (client.store_content("a.txt", BODY, cls="thumb"), client.rename("a.txt", "b.txt"),
                           client.delete("b.txt")):
                caplog.clear()
                _, stall = await longest_stall(change)
                # The call returns once the mark was tried: here, once it failed.
                outcomes.append((stall, "could not drop" in caplog.text))
        finally:
            await client.aclose()
        return outcomes

    outcomes = asyncio.run(write())
    assert all(stall < STALL for stall, _ in outcomes), outcomes
    assert all(told for _, told in outcomes), outcomes


def test_the_asgi_middleware_forgets_what_its_client_changes_without_stalling_the_event_loop(
        devmogile: DevMogileFS, hung_memcached: str) -> None:
    middleware = ASGIMiddleware(hello_asgi, domain=DOMAIN, trackers=devmogile.trackers,
                                cache_backend=MemcachedBackend(hung_memcached, timeout=0.3))

    async def write() -> list[float]:
        try:
            stored = await longest_stall(middleware.client.store_content("a.txt", BODY, cls="thumb"))
            deleted = await longest_stall(middleware.client.delete("a.txt"))
            return [stored[1], deleted[1]]
        finally:
            await middleware.client.aclose()

    assert all(stall < STALL for stall in asyncio.run(write()))


def test_a_relocation_marks_the_change_without_stalling_the_event_loop(devmogile: DevMogileFS,
                                                                       memcached: MemcachedServer) -> None:
    elsewhere = Client(DOMAIN, devmogile.trackers)  # a writer no listener of the middleware hears
    elsewhere.store_content("moved.txt", BODY, cls="thumb")
    with writes_delayed(memcached, 0.4) as address:
        middleware = ASGIMiddleware(hello_asgi, domain=DOMAIN, trackers=devmogile.trackers,
                                    cache_backend=MemcachedBackend(address, timeout=2))

        async def read_twice() -> tuple[tuple[int, bytes], tuple[tuple[int, bytes], float]]:
            try:
                first = await asgi_get(middleware, "/mogilefs/moved.txt")
                elsewhere.delete("moved.txt")  # the cached paths now name no file
                return first, await longest_stall(asgi_get(middleware, "/mogilefs/moved.txt"))
            finally:
                await middleware.client.aclose()

        first, (second, stall) = asyncio.run(read_twice())
    assert first == (200, BODY)
    assert second[0] == 404 and stall < STALL, (second, stall)


def test_a_change_made_while_a_lookups_store_waits_on_memcached_does_not_stall_the_event_loop(
        devmogile: DevMogileFS, memcached: MemcachedServer) -> None:
    """The change waited on the lock the store held in its thread for all of memcached's answer."""
    Client(DOMAIN, devmogile.trackers).store_content("k.txt", BODY, cls="thumb")
    with writes_delayed(memcached, 0.4, commands=(b"add ", b"cas ")) as address:
        middleware = ASGIMiddleware(hello_asgi, domain=DOMAIN, trackers=devmogile.trackers,
                                    cache_backend=MemcachedBackend(address, timeout=2))

        async def read_and_write() -> tuple[tuple[int, bytes], float, tuple[int, bytes]]:
            try:
                reading = asyncio.ensure_future(asgi_get(middleware, "/mogilefs/k.txt"))
                await asyncio.sleep(0.15)  # its lookup found the file; its store waits on memcached
                _, stall = await longest_stall(middleware.client.store_content("k.txt", b"new", cls="thumb"))
                return await reading, stall, await asgi_get(middleware, "/mogilefs/k.txt")
            finally:
                await middleware.client.aclose()

        read, stall, after = asyncio.run(read_and_write())
    assert read[0] == 200 and read[1] in (BODY, b"new")  # served after the write: either version, whole
    assert stall < STALL, stall
    assert after == (200, b"new")


# Two gunicorn workers, one cache.

def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_two_gunicorn_workers_share_one_lookup(devmogile: DevMogileFS, memcached: MemcachedServer,
                                               tmp_path: Path) -> None:
    require_module("gunicorn")
    Client(DOMAIN, devmogile.trackers).store_content("shared.txt", BODY, cls="thumb")
    counts, hits, access = tmp_path / "get_paths", tmp_path / "app_hits", tmp_path / "access.log"
    env = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0], "MOGILE_MEMCACHED": memcached.address,
           "MOGILE_COUNT_FILE": str(counts), "MOGILE_APP_HITS_FILE": str(hits)}
    # %(p)s is the worker's PID: which worker answered each request.
    log_args = ["--access-logfile", str(access), "--access-logformat", "%(p)s %(U)s %(s)s"]
    with run_gunicorn(env, workers=2, extra_args=log_args) as server:
        url = f"http://127.0.0.1:{server.port}/mogilefs/shared.txt"
        # A sync worker reads one request at a time: while one holds this unfinished request,
        # the other worker must answer the next, so both serve the key.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as held:
            held.sendall(b"GET /mogilefs/shared.txt HTTP/1.0\r\nHost: test\r\n")
            assert http_request(url).body == BODY
            held.sendall(b"\r\n")
            assert held.makefile("rb").read().endswith(BODY)
        replies = [http_request(url) for _ in range(40)]  # a new connection each
        assert {(reply.status, reply.body) for reply in replies} == {(200, BODY)}
        assert len(lines(counts)) == 1, "one tracker lookup for both workers"

        served = eventually(lambda: [line.split() for line in lines(access)], lambda got: len(got) >= 42)
        workers = {pid for pid, path, status in served if path == "/mogilefs/shared.txt" and status == "200"}
        assert len(workers) == 2 and {pid.strip("<>") for pid in workers} == set(map(str, server.worker_pids()))
        assert http_request(f"http://127.0.0.1:{server.port}/").body == b"hello from the app\n"
        assert len(lines(hits)) == 1 and int(lines(hits)[0]) in server.worker_pids()

        memcached.stop()
        started = time.monotonic()
        replies = [http_request(url) for _ in range(20)]
        seconds = time.monotonic() - started
        assert {(reply.status, reply.body) for reply in replies} == {(200, BODY)}
        # Without memcached, each worker asks the tracker once a second, not on each request.
        assert 1 <= len(lines(counts)) - 1 <= 2 * (math.floor(seconds / STANDBY_SECONDS) + 1) < 20


def test_sites_of_two_mogilefs_with_one_domain_name_keep_apart_in_one_memcached_by_their_prefixes(
        devmogile: DevMogileFS, tmp_path: Path, memcached: MemcachedServer, monkeypatch: pytest.MonkeyPatch,
        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """Entries are keyed by domain and key: staging's site answered production's file, and one
    MogileFS's key that the other has not, with a 200."""
    with DevMogileFS(data_dir=tmp_path / "staging", storage_nodes=1, domains={DOMAIN: {"thumb": 1}}) as staging:
        Client(DOMAIN, devmogile.trackers).store_content("logo.png", b"production")
        Client(DOMAIN, devmogile.trackers).store_content("only-in-production.png", b"x")
        Client(DOMAIN, staging.trackers).store_content("logo.png", b"staging")
        sites = {name: TestApp(filter_factory({}, domain=DOMAIN, trackers=mogile.trackers[0], reproxy="none",
                                              memcached_servers=memcached.address,
                                              memcached_prefix=f"{name}:")(hello))
                 for name, mogile in [("production", devmogile), ("staging", staging)]}
        assert sites["production"].get("/mogilefs/logo.png").body == b"production"
        assert sites["production"].get("/mogilefs/only-in-production.png").body == b"x"
        assert sites["staging"].get("/mogilefs/logo.png").body == b"staging"
        assert sites["staging"].get("/mogilefs/only-in-production.png", status=404)
        # The CLI marks a change under the same prefix as the site it writes for.
        monkeypatch.setenv("MOGILEFS_MEMCACHED_PREFIX", "staging:")
        assert main(["rm", "--trackers", staging.trackers[0], "--domain", DOMAIN, "--memcached", memcached.address,
                     "logo.png"]) == 0
        capsysbinary.readouterr()
        assert sites["staging"].get("/mogilefs/logo.png", status=404)
        assert sites["production"].get("/mogilefs/logo.png").body == b"production"
