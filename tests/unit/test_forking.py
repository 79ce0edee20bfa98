"""A process forked while its other threads use the package serves on its own: no lock copied held
(the child waited for it for ever), no lookup of the parent's waited for."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from forks import children_failing, holding
from mogile_middleware.async_tracker import AsyncTrackerPool
from mogile_middleware.bodies import BodyCache
from mogile_middleware.cache import AsyncPathCache, MemoryCache, PathCache
from mogile_middleware.downnodes import DownNodes
from mogile_middleware.exceptions import TrackerUnavailableError
from mogile_middleware.nodepool import NodePool
from mogile_middleware.tracker import TrackerPool
from mogile_middleware.upload import hasher

#: No tracker listens there: every request is refused at once.
NOWHERE = "127.0.0.1:1"


class _NeverUsable:
    """A kept connection the pool takes out and discards (its process is none)."""

    pid = 0
    closed = False

    def close(self) -> None:
        pass


def _node_pool() -> tuple[Callable[[], object], Callable[[], object]]:
    pool = NodePool()

    def churn() -> None:
        pool.give(("127.0.0.1", 1), _NeverUsable())  # type: ignore[arg-type]
        pool.take(("127.0.0.1", 1))

    return churn, lambda: pool.take(("127.0.0.1", 2))


def _memory_cache() -> tuple[Callable[[], object], Callable[[], object]]:
    cache = MemoryCache()

    def churn() -> None:
        cache.set("churned", 1, time.time(), 60)
        cache.delete("churned")

    return churn, lambda: cache.set("child's", 1, time.time(), 60)


def _path_cache() -> tuple[Callable[[], object], Callable[[], object]]:
    cache: PathCache[str] = PathCache(lambda key, previous: key, ttl_seconds=0)  # every get looks up
    return lambda: cache.get("churned"), lambda: cache.get("child's")


def _caches_of_the_process() -> tuple[Callable[[], object], Callable[[], object]]:
    cache: PathCache[str] = PathCache(lambda key, previous: key)
    return lambda: cache.invalidate("churned"), lambda: PathCache(lambda key, previous: key)


def _body_cache() -> tuple[Callable[[], object], Callable[[], object]]:
    bodies = BodyCache(1000, 100)
    count = iter(range(10**9))
    return lambda: bodies.put(f"fid-{next(count)}", b"x" * 50), lambda: bodies.put("fid-child", b"y")


def _down_nodes() -> tuple[Callable[[], object], Callable[[], object]]:
    down = DownNodes(seconds=60)

    def churn() -> None:  # marked once: a thread writing a warning at the fork is another story
        down.failed("http://127.0.0.1:7500/dev1/0/1.fid", TimeoutError())
        down.done("http://127.0.0.1:7500/dev1/0/1.fid")

    return churn, lambda: down.failed("http://127.0.0.1:7502/dev2/0/1.fid", TimeoutError())


def _refused(call: Callable[[], object]) -> Callable[[], None]:
    """``call``, which must fail as no tracker answers."""
    def refused() -> None:
        with pytest.raises(TrackerUnavailableError):
            call()
    return refused


def _tracker_pool() -> tuple[Callable[[], object], Callable[[], object]]:
    pool = TrackerPool([NOWHERE], dead_seconds=0)  # each request asks whether it is back

    def churn() -> None:
        with contextlib.suppress(TrackerUnavailableError):
            pool.request("noop")

    return churn, _refused(lambda: pool.request("noop"))


def _async_tracker_pool() -> tuple[Callable[[], object], Callable[[], object]]:
    pool = AsyncTrackerPool([NOWHERE], dead_seconds=0)
    # A loop's first request takes the pool's lock for a moment: held here as long as a thread may.
    return holding(pool._loops._lock), _refused(lambda: asyncio.run(pool.request("noop")))


def _upload_hashers() -> tuple[Callable[[], object], Callable[[], object]]:
    return hasher, lambda: hasher().submit(len, b"child").result(1)


@pytest.mark.parametrize("used", [
    pytest.param(_node_pool, id="storage node connections"),
    pytest.param(_memory_cache, id="in-process path cache"),
    pytest.param(_path_cache, id="path cache lookups"),
    pytest.param(_caches_of_the_process, id="path caches of the process"),
    pytest.param(_body_cache, id="body cache"),
    pytest.param(_down_nodes, id="storage nodes marked down"),
    pytest.param(_tracker_pool, id="trackers asked whether back"),
    pytest.param(_async_tracker_pool, id="asyncio tracker connections"),
    pytest.param(_upload_hashers, id="upload checksum threads"),
])
def test_a_child_forked_while_a_thread_uses_it_can_use_it(
        used: Callable[[], tuple[Callable[[], object], Callable[[], object]]]) -> None:
    assert children_failing(*used()) == 0


def test_a_child_looks_up_a_key_the_parent_was_looking_up_at_the_fork() -> None:
    """A lookup of the parent's thread never ends in the child: its requests for the key waited
    ``wait_seconds`` for it, then failed, every one of them."""
    release = threading.Event()

    def lookup(key: str, previous: Any) -> str:
        if os.getpid() == parent:
            release.wait(10)
        return f"paths of {key}"

    parent = os.getpid()
    cache: PathCache[str] = PathCache(lookup, wait_seconds=3, stale_seconds=0)
    thread = threading.Thread(target=cache.get, args=("avatars/1.png",))
    thread.start()
    try:
        while cache.lookups == 0:
            time.sleep(0.001)
        assert _in_child(lambda: cache.get("avatars/1.png")) == 0
    finally:
        release.set()
        thread.join(5)


def test_an_asyncio_child_looks_up_a_key_the_parent_was_looking_up_at_the_fork() -> None:
    release = threading.Event()
    started = threading.Event()

    async def lookup(key: str, previous: Any) -> str:
        if os.getpid() == parent:
            started.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        return f"paths of {key}"

    parent = os.getpid()
    cache: AsyncPathCache[str] = AsyncPathCache(lookup, wait_seconds=3, stale_seconds=0)
    thread = threading.Thread(target=asyncio.run, args=(cache.get("avatars/1.png"),))
    thread.start()
    try:
        assert started.wait(5)
        assert _in_child(lambda: asyncio.run(cache.get("avatars/1.png"))) == 0
    finally:
        release.set()
        thread.join(5)


def _in_child(call: Callable[[], object]) -> int:
    """The exit status of a child that makes ``call`` within 1 s: 0 once it answered in time."""
    pid = os.fork()
    if pid == 0:
        started = time.monotonic()
        try:
            call()
        except BaseException:
            os._exit(1)
        os._exit(0 if time.monotonic() - started < 1 else 2)
    return os.waitpid(pid, 0)[1]
