"""The asyncio client and tracker pool on their own event loops: what a blocking facade cannot show.

Kept-open connections per event loop, many coroutines on one pool, cancellation, dead trackers,
deadlines. Plain test functions that run ``asyncio.run`` (no pytest plugin needed).
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from conftest import DOMAIN, require_module
from integration._async_facade import LoopThread
from integration._slow_clients import node_connections, storage_port
from integration._wire_client import eventually
from integration.test_deadlines import ScriptedServer, answer_first_then_drip
from integration.test_memcached import longest_stall
from wiretools import CountingRelay, ScriptedTracker, SilentServer, ok

from mogile_middleware import AsyncClient, BadKeyError, Client, TrackerUnavailableError, UnknownKeyError, async_tracker
from mogile_middleware.async_tracker import AsyncTrackerPool
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.upload import may_have_stored


@pytest.fixture
def relay(devmogile: DevMogileFS) -> Iterator[CountingRelay]:
    """A relay to the embedded tracker that counts connections, with the key ``hot`` stored."""
    asyncio.run(AsyncClient(DOMAIN, devmogile.trackers).store_content("hot", b"x", cls="thumb"))
    relay = CountingRelay(devmogile.tracker_address)
    yield relay
    relay.stop()


def test_one_thousand_get_paths_open_one_connection(relay: CountingRelay) -> None:
    async def main() -> None:
        client = AsyncClient(DOMAIN, [relay.tracker])
        for _ in range(1000):
            assert await client.get_paths("hot")
        await client.aclose()

    asyncio.run(main())
    assert relay.connections == 1


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_the_connections_of_closed_event_loops_are_ended(devmogile: DevMogileFS, new_loop: Callable[[], Any]) -> None:
    # Dropped when the next loop came, they stayed open until the garbage collector ran: one
    # more per asyncio.run of a program that asks a tracker in each (uvloop closes them itself,
    # and its sockets cannot be shut down: the next loop's first call raised TypeError).
    asyncio.run(AsyncClient(DOMAIN, devmogile.trackers).store_content("hot", b"x", cls="thumb"))
    client = AsyncClient(DOMAIN, devmogile.trackers)
    tracker_port = int(devmogile.trackers[0].rpartition(":")[2])

    async def twice() -> list[str]:  # the second call checks the kept connection before it reuses it
        return await client.get_paths("hot") + await client.get_paths("hot")

    gc.disable()
    try:
        for _ in range(20):
            loop = new_loop()
            try:
                assert loop.run_until_complete(twice())
            finally:
                loop.close()
        assert node_connections(tracker_port, os.getpid()) <= 2  # the last loop's, and one ending
    finally:
        gc.enable()


def test_a_child_forked_in_a_running_loop_leaves_the_parents_connections_alone(relay: CountingRelay) -> None:
    """The child's copy of the loop ends as the parent's would: closing its connections there took
    their sockets out of the epoll instance both share, and the parent's next call waited for a
    reply it could no longer hear (``io_timeout``), then marked the tracker dead."""
    client = AsyncClient(DOMAIN, [relay.tracker])

    async def main() -> str | float:
        assert await client.get_paths("hot")
        child = os.fork()
        if child == 0:
            return "child"  # its asyncio.run ends its copy of the loop
        os.waitpid(child, 0)
        started = time.monotonic()
        assert await asyncio.wait_for(client.get_paths("hot"), 3)
        return time.monotonic() - started

    answered = asyncio.run(main())
    if answered == "child":
        os._exit(0)
    assert answered < 1 and relay.connections == 1  # the parent's, still its own


def test_each_event_loop_has_its_own_connections(relay: CountingRelay) -> None:
    client = AsyncClient(DOMAIN, [relay.tracker])
    other = LoopThread()
    try:
        assert other.run(client.get_paths("hot"))
        assert asyncio.run(client.get_paths("hot"))  # a loop of its own: a connection of its own
        assert relay.connections == 2
        assert other.run(client.get_paths("hot"))  # the first loop's connection was left alone
        assert asyncio.run(client.get_paths("hot"))  # the loop before was closed: a new one again
        assert relay.connections == 3
    finally:
        other.stop()


def test_a_hundred_concurrent_requests_share_a_bounded_number_of_connections(relay: CountingRelay) -> None:
    pool = AsyncTrackerPool([relay.tracker])
    client = AsyncClient(DOMAIN, pool=pool)

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(client.get_paths("hot") for _ in range(100)))

    answers = asyncio.run(main())
    assert len(answers) == 100 and all(len(paths) == 1 for paths in answers)
    assert 1 <= relay.connections <= pool.max_connections


def test_a_request_waits_for_a_connection_no_longer_than_io_timeout_and_connect_timeout() -> None:
    """One connection per loop, a tracker answering each request in 0.6 s, io_timeout 1 s and
    connect_timeout 0.1 s: the third request, still without a connection after 1.1 s, fails as if
    no tracker answered, instead of queuing behind the others (those of clients long gone, in a
    server) for 1.8 s."""
    tracker = ScriptedTracker(lambda line: (time.sleep(0.6), ok(line))[1])
    pool = AsyncTrackerPool([tracker.tracker], io_timeout=1, connect_timeout=0.1)
    pool.max_connections = 1
    client = AsyncClient(DOMAIN, pool=pool)

    async def timed() -> tuple[float, Exception | None]:
        started = time.monotonic()
        try:
            await client.get_paths("k")
        except TrackerUnavailableError as error:
            return time.monotonic() - started, error
        return time.monotonic() - started, None

    async def main() -> list[tuple[float, Exception | None]]:
        return await asyncio.gather(*(timed() for _ in range(3)))

    try:
        outcomes = asyncio.run(main())
    finally:
        tracker.stop()
    assert [error is None for _, error in outcomes] == [True, True, False]
    assert "requests in flight took longer than io_timeout and connect_timeout (1.1 s)" in str(outcomes[2][1])
    assert max(took for took, _ in outcomes) < 1.5


def test_requests_queued_behind_those_a_silent_tracker_holds_are_answered_by_the_next() -> None:
    """The first tracker accepts and answers nothing, the second answers at once; one connection
    per loop, three lookups at once: the first leaves the silent tracker after io_timeout, and the
    two queued behind it, which waited that long, are answered by the second tracker too."""
    silent, answering = SilentServer(), ScriptedTracker(ok)
    pool = AsyncTrackerPool([silent.tracker, answering.tracker], io_timeout=0.5, connect_timeout=0.3)
    pool.max_connections = 1
    client = AsyncClient(DOMAIN, pool=pool)

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(client.get_paths(f"k{number}") for number in range(3)))

    try:
        answers = asyncio.run(main())
    finally:
        silent.stop()
        answering.stop()
    assert [len(paths) for paths in answers] == [1, 1, 1]


def test_a_cancelled_request_closes_its_connection() -> None:
    replies = iter([b""])  # the first request gets silence, the next ones an answer
    tracker = ScriptedTracker(lambda line: next(replies, ok(line)))

    async def main() -> list[str]:
        client = AsyncClient(DOMAIN, [tracker.tracker])
        waiting = asyncio.create_task(client.get_paths("k"))
        await asyncio.sleep(0.2)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return await client.get_paths("k")

    try:
        assert asyncio.run(main()) == ["http://127.0.0.1:1/dev1/0/000/000/0000000001.fid"]
        assert tracker.connections == 2  # the silent connection was not reused
    finally:
        tracker.stop()


def test_requests_cancelled_after_the_pool_closed_leave_no_connection_open() -> None:
    """A server's shutdown closes the pool (the lifespan), then the requests it cancelled end: the
    first kept its connection to hear the tracker by its deadline, a timer of a loop about to close."""
    silent = SilentServer()

    async def main() -> None:
        pool = AsyncTrackerPool([silent.tracker], io_timeout=10)
        waiting = [asyncio.create_task(pool.request("noop")) for _ in range(3)]
        while silent.connections < 3:
            await asyncio.sleep(0.01)
        await pool.aclose()
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    try:
        asyncio.run(main())
        for conn in silent._open:  # each closed by the client: its request, then the end (not a timeout)
            conn.settimeout(2)
            assert conn.recv(4096) == b"noop\r\n" and conn.recv(4096) == b""
    finally:
        silent.stop()


def test_a_dead_tracker_is_skipped_until_its_dead_time_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()[:2]
    tracker = ScriptedTracker(ok)
    now = [0.0]
    dials: list[tuple[str, int]] = []
    connect = async_tracker.connect

    async def counting_connect(host: str, port: int, timeout: float | None = None) -> socket.socket:
        dials.append((host, port))
        return await connect(host, port, timeout)

    monkeypatch.setattr(async_tracker, "connect", counting_connect)
    pool = AsyncTrackerPool([dead, tracker.tracker], dead_seconds=30, clock=lambda: now[0])

    async def main(requests: int) -> None:
        for _ in range(requests):
            assert (await pool.request("noop"))[1] == tracker.address
            now[0] += 1

    try:
        asyncio.run(main(20))
        assert dials.count(dead) == 1 and pool.live_trackers() == [tracker.address]
        now[0] += 10  # past the dead time: dialled again (still refused), then skipped again
        asyncio.run(main(2))
        assert dials.count(dead) == 2
    finally:
        tracker.stop()


def test_a_bad_key_is_refused_before_any_connection() -> None:
    tracker = ScriptedTracker(lambda line: b"OK \r\n")
    client = AsyncClient(DOMAIN, [tracker.tracker])
    bad = "a\ud800b"  # no tracker holds it

    async def main() -> None:
        for call in (client.get_paths(bad), client.file_info(bad), client.delete(bad), client.rename(bad, "ok"),
                     client.update_class(bad, "thumb"), client.store_content(bad, b"x")):
            with pytest.raises(BadKeyError):
                await call

    try:
        asyncio.run(main())
        assert tracker.connections == 0
    finally:
        tracker.stop()


def test_a_dripping_tracker_costs_the_io_timeout_and_no_retry() -> None:
    tracker = ScriptedServer(answer_first_then_drip)
    client = AsyncClient("d", [tracker.tracker], io_timeout=1)

    async def main() -> None:
        assert await client.get_paths("k")  # kept open, and it passes the stale check next time
        started = time.monotonic()
        with pytest.raises(TrackerUnavailableError, match="timed out|no reply within 1s"):
            await client.get_paths("k")
        assert 0.9 <= time.monotonic() - started < 2.5

    try:
        asyncio.run(main())
        assert tracker.connections == 1  # the deadline passed: no retry on a new connection
    finally:
        tracker.stop()


def test_a_coroutine_listener_is_awaited_before_the_change_returns(devmogile: DevMogileFS,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    heard: list[str] = []

    async def slow(key: str) -> None:
        await asyncio.sleep(0.05)
        heard.append(key)

    async def broken(key: str) -> None:
        raise RuntimeError("async listener bug")

    async def main() -> list[list[str]]:
        client = AsyncClient(DOMAIN, devmogile.trackers, on_change=slow)
        client.add_change_listener(broken)
        seen = []
        try:
            for change in (client.store_content("a", b"x", cls="thumb"), client.rename("a", "b"), client.delete("b")):
                await change
                seen.append(list(heard))
        finally:
            await client.aclose()
        return seen

    assert asyncio.run(main()) == [["a"], ["a", "a", "b"], ["a", "a", "b", "b"]]
    assert caplog.text.count("RuntimeError('async listener bug')") == 4  # logged; the writes stand


def test_a_file_a_starlette_app_received_is_stored_as_it_is_read(devmogile: DevMogileFS) -> None:
    starlette = require_module("starlette.datastructures")
    data = bytes(range(256)) * 1000  # several pieces

    async def main() -> tuple[int, bytes]:
        client = AsyncClient(DOMAIN, devmogile.trackers)
        upload = starlette.UploadFile(tempfile.SpooledTemporaryFile(max_size=64 * 1024), filename="a.bin")
        try:
            await upload.write(data)  # past max_size: on disk, where its read() runs in a thread
            await upload.seek(0)
            stored = await client.store_file("uploaded.bin", upload, cls="thumb")
            return stored, await client.get_file_data("uploaded.bin")
        finally:
            await upload.close()
            await client.aclose()

    assert asyncio.run(main()) == (len(data), data)


def test_a_cancelled_call_never_runs_on(devmogile: DevMogileFS) -> None:
    """Cancelled at every turn of the event loop in turn, a call ends cancelled: never with its
    result, as when a cancellation lands just as the tracker's reply arrives."""
    data = b"x" * 100_000

    async def main() -> list[int]:
        client = AsyncClient(DOMAIN, devmogile.trackers)
        ran_on = []
        try:
            for turns in range(40):
                call = asyncio.ensure_future(client.store_content(f"k{turns}", data, cls="thumb"))
                for _ in range(turns):
                    await asyncio.sleep(0)
                if call.done():
                    break
                call.cancel()
                try:
                    await call
                    ran_on.append(turns)
                except asyncio.CancelledError:
                    pass
        finally:
            await client.aclose()
        return ran_on

    assert asyncio.run(main()) == []


def test_a_call_cancelled_as_its_tracker_times_out_ends_cancelled(devmogile: DevMogileFS) -> None:
    """A cancellation landing in the loop turn the first tracker's deadline passes (the loop was
    busy) ends the call cancelled: it neither asked the next tracker nor raised a timeout."""
    silent = SilentServer()

    async def main() -> list[str]:
        ended = []
        for _ in range(3):
            client = AsyncClient(DOMAIN, [silent.tracker, devmogile.trackers[0]], io_timeout=0.3)
            call = asyncio.ensure_future(client.get_paths("stored"))
            await asyncio.sleep(0.05)  # waiting for the silent tracker
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, time.sleep, 0.35)  # the loop busy past the deadline
            loop.call_later(0.3, call.cancel)  # run in the same turn as the deadline's timer
            try:
                await call
                ended.append("with the next tracker's answer")
            except asyncio.CancelledError:
                ended.append("cancelled")
            except Exception as error:
                ended.append(type(error).__name__)
            await client.aclose()
        return ended

    Client(DOMAIN, devmogile.trackers).store_content("stored", b"content")
    try:
        assert asyncio.run(main()) == ["cancelled"] * 3
    finally:
        silent.stop()


def test_a_request_cancelled_as_it_gets_the_connection_leaves_it_to_the_next() -> None:
    """One connection at most: a request waiting for it, cancelled in one of the loop turns
    around the moment the request holding it ends, leaves it free (a connection's place lost
    for good would leave every later request waiting for one until its timeout)."""

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        gate = asyncio.Event()

        async def tracker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                if line.startswith(b"slow"):
                    await gate.wait()
                writer.write(b"OK \r\n")
                await writer.drain()
            writer.close()

        def after_turns(turns: int, then: Callable[[], Any]) -> None:
            if turns:
                loop.call_soon(after_turns, turns - 1, then)
            else:
                then()

        server = await asyncio.start_server(tracker, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        next_requests = []
        for turns in range(4):
            gate.clear()
            pool = AsyncTrackerPool([address], connect_timeout=0.5, io_timeout=0.5)
            pool.max_connections = 1
            holding = asyncio.ensure_future(pool.request("slow"))
            await asyncio.sleep(0.05)
            waiting = asyncio.ensure_future(pool.request("fast"))
            await asyncio.sleep(0.05)
            gate.set()
            holding.add_done_callback(lambda _, turns=turns: after_turns(turns, waiting.cancel))
            await asyncio.wait({holding, waiting})
            try:
                await pool.request("next")
                next_requests.append("answered")
            except TrackerUnavailableError as error:
                next_requests.append(str(error))
            await pool.aclose()
        server.close()
        await server.wait_closed()
        return next_requests

    assert asyncio.run(main()) == ["answered"] * 4


def test_a_connection_the_tracker_closed_while_the_loop_was_busy_is_not_used(tmp_path: Path) -> None:
    with DevMogileFS(data_dir=tmp_path, domains={DOMAIN: {"thumb": 1}}, tracker_idle_timeout=0.2) as mogile:
        async def main() -> None:
            client = AsyncClient(DOMAIN, mogile.trackers)
            try:
                await client.store_content("k", b"x", cls="thumb")
                time.sleep(0.5)  # busy: the tracker's close has arrived, the loop has not read it
                await client.delete("k")  # not sent on the closed connection: carried out
                with pytest.raises(UnknownKeyError):
                    await client.get_paths("k")
            finally:
                await client.aclose()

        asyncio.run(main())


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_event_loops_one_after_another_leave_no_storage_connection_open(devmogile: DevMogileFS,
                                                                        new_loop: Callable[[], Any]) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("k", b"x" * 1000, cls="thumb")
    port = storage_port(Client(DOMAIN, devmogile.trackers), "k")
    client = AsyncClient(DOMAIN, devmogile.trackers)
    for _ in range(20):  # each loop keeps its storage connection for the next read, then closes
        loop = new_loop()
        try:
            assert loop.run_until_complete(client.get_file_data("k")) == b"x" * 1000
        finally:
            loop.close()
    assert eventually(lambda: node_connections(port), lambda count: count <= 1) <= 1  # the last loop's, at most


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_body_dropped_unclosed_ends_its_storage_connection(devmogile: DevMogileFS,
                                                             new_loop: Callable[[], Any]) -> None:
    """A ``read_file`` body read in part and dropped without ``aclose`` (as a blocking one may be)
    ends its connection to the node once it is collected, with a ResourceWarning; it stayed open."""
    Client(DOMAIN, devmogile.trackers).store_content("big", os.urandom(4 * 1024 * 1024), cls="thumb")
    port = storage_port(Client(DOMAIN, devmogile.trackers), "big")
    client = AsyncClient(DOMAIN, devmogile.trackers, storage_timeout=0.5)

    async def read_a_part_of_each() -> None:
        for _ in range(5):
            body = await client.read_file("big")
            assert len(await body.read(1000)) == 1000
        del body
        await asyncio.sleep(1)  # the read timeout's timer, which holds each body, has run
        gc.collect()
        await asyncio.sleep(0.1)
        assert node_connections(port, os.getpid()) == 0

    loop = new_loop()
    try:
        with pytest.warns(ResourceWarning, match="unclosed <AsyncReplicaResponse 200 "):
            loop.run_until_complete(read_a_part_of_each())
        loop.run_until_complete(client.aclose())
    finally:
        loop.close()


def test_listeners_run_to_their_end_when_the_call_is_cancelled_meanwhile(devmogile: DevMogileFS) -> None:
    """The key was stored: the cancellation says it may have been (as a blocking client's Ctrl-C)."""
    heard: list[str] = []

    async def main() -> bool:
        started = asyncio.Event()

        async def slow(key: str) -> None:
            started.set()
            await asyncio.sleep(0.2)
            heard.append(key)

        client = AsyncClient(DOMAIN, devmogile.trackers, on_change=slow)
        try:
            call = asyncio.ensure_future(client.store_content("k", b"x", cls="thumb"))
            await started.wait()
            call.cancel()  # while the listener runs: the call ends cancelled, the listener does not
            await asyncio.sleep(0.4)
            try:
                await call
            except asyncio.CancelledError as cancelled:
                return may_have_stored(cancelled)
            return False
        finally:
            await client.aclose()

    assert asyncio.run(main()) and heard == ["k"]


def test_a_timeout_while_listeners_run_says_the_key_may_be_stored(devmogile: DevMogileFS) -> None:
    """asyncio.wait_for ends the call with a TimeoutError of its own, raised from the call's."""
    async def main() -> bool:
        started = asyncio.Event()

        async def slow(key: str) -> None:
            started.set()
            await asyncio.sleep(2.0)  # the upload itself takes far less than the timeout

        client = AsyncClient(DOMAIN, devmogile.trackers, on_change=slow)
        try:
            await asyncio.wait_for(client.store_content("k", b"x", cls="thumb"), timeout=1.0)
        except asyncio.TimeoutError as timeout:
            assert started.is_set()  # the timeout came while the listener ran, the key stored
            await asyncio.sleep(1.2)  # the listener runs to its end
            return may_have_stored(timeout)
        finally:
            await client.aclose()
        return False

    assert asyncio.run(main())


def test_an_awaited_read_that_gives_none_is_refused_and_stores_nothing(devmogile: DevMogileFS) -> None:
    class NotReady:
        async def read(self, size: int) -> None:
            return None

    async def main() -> None:
        client = AsyncClient(DOMAIN, devmogile.trackers)
        try:
            with pytest.raises(TypeError, match="gave None"):
                await client.store_file("k", NotReady(), cls="thumb")
            with pytest.raises(UnknownKeyError):
                await client.get_paths("k")
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_large_buffer_is_stored_without_a_copy_of_it(devmogile: DevMogileFS) -> None:
    """``io.BytesIO`` copied any buffer but bytes whole: twice the memory, copied on the event loop."""
    data = bytearray(range(256)) * (64 * 1024 * 4)  # 64 MiB
    client = AsyncClient(DOMAIN, devmogile.trackers)
    tracemalloc.start()
    try:
        assert asyncio.run(client.store_content("buffer", memoryview(data), cls="thumb")) == len(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, f"{peak >> 20} MiB traced while storing {len(data) >> 20} MiB"
    assert Client(DOMAIN, devmogile.trackers).get_file_data("buffer") == data


def test_a_large_chunk_is_hashed_a_part_at_a_time(devmogile: DevMogileFS) -> None:
    """Hashed whole, one 128 MiB chunk of an async iterable held the event loop 0.24 s."""
    chunk = bytes(128 * 1024 * 1024)

    async def one_chunk() -> AsyncIterator[bytes]:
        yield chunk

    async def store() -> tuple[int, float]:
        client = AsyncClient(DOMAIN, devmogile.trackers)
        return await longest_stall(client.store_file("big", one_chunk(), cls="thumb"))

    stored, stall = asyncio.run(store())
    assert stored == len(chunk) and stall < 0.12, stall
