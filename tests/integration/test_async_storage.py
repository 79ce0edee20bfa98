"""The asyncio storage client: replica failover, deadlines, closing and backpressure, streaming PUT.

Real loopback sockets: a development MogileFS for the real node's answers, and small scripted
nodes for the misbehaving ones. No pytest plugin: every test runs its coroutine with asyncio.run.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import os
import re
import select
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from wiretools import LoopbackServer

from mogile_middleware import Client
from mogile_middleware.async_storage import (
    BODY_CHUNK_SIZE,
    GROW_AFTER_BYTES,
    SMALL_PIECE_SIZE,
    AsyncPutStream,
    AsyncReplicaResponse,
    AsyncResumedReplica,
    close_idle_connections,
    open_replica,
    read_replica,
)
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.exceptions import StorageError
from mogile_middleware.storage import PUT_PIECE_SIZE, PutStream, Resumption, Target

CONTENT = bytes(range(256)) * 400 + b"the end"  # 102,407 bytes: more than one chunk
OTHER = b"another file, another length"

BAD_URLS = [
    pytest.param("http://127.0.0.1:99999/dev1/0/000/000/0000000001.fid", id="port-out-of-range"),
    pytest.param("http://127.0.0.1:abc/dev1/0/000/000/0000000001.fid", id="port-not-a-number"),
    pytest.param("http://[::1/dev1/0/000/000/0000000001.fid", id="unclosed-ipv6-bracket"),
]


def run(coroutine: Coroutine[Any, Any, Any], seconds: float = 30) -> Any:
    """Run ``coroutine`` in a new event loop, cut after ``seconds`` so a hang fails the test."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, seconds)

    return asyncio.run(bounded())


def run_on(new_loop: Callable[[], asyncio.AbstractEventLoop], coroutine: Coroutine[Any, Any, Any],
           seconds: float = 30) -> Any:
    """:func:`run` on a loop of ``new_loop`` (asyncio's or uvloop's)."""
    loop = new_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coroutine, seconds))
    finally:
        loop.close()


async def ends_at_once(waiting: Awaitable[Any], match: str) -> None:
    """``waiting``, ended from elsewhere, raises StorageError (matching ``match``) within a second."""
    started = time.monotonic()
    with pytest.raises(StorageError, match=match):
        await waiting
    assert time.monotonic() - started < 1


def eventually(condition: Callable[[], bool], seconds: float = 2.0) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


async def eventually_async(condition: Callable[[], bool], seconds: float = 1.0) -> bool:
    """:func:`eventually` without blocking the event loop (whose turns may be what is awaited)."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def refused_url() -> str:
    """A URL on a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/dev1/0/000/000/0000000001.fid"


async def read_all(replica: AsyncReplicaResponse) -> bytes:
    async with replica:
        return b"".join([chunk async for chunk in replica.chunks()])


@pytest.fixture(scope="module")
def mogile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevMogileFS]:
    with DevMogileFS(tmp_path_factory.mktemp("mogdata"), storage_nodes=1, domains={"d": {"c": 1}}) as mogile:
        client = Client("d", mogile.trackers)
        client.store_content("content", CONTENT, "c")
        client.store_content("other", OTHER, "c")
        client.close()
        yield mogile


@pytest.fixture(scope="module")
def urls(mogile: DevMogileFS) -> dict[str, str]:
    """The replica URLs of ``content`` and ``other``, and one the node answers 404."""
    client = Client("d", mogile.trackers)
    (content,), (other,) = client.get_paths("content"), client.get_paths("other")
    client.close()
    return {"content": content, "other": other, "missing": content.rsplit("/", 1)[0] + "/9999999999.fid"}


# -- GET from the development node ------------------------------------------------------------

def test_get_reads_the_whole_file(urls: dict[str, str]) -> None:
    async def main() -> tuple[AsyncReplicaResponse, bytes]:
        replica = await open_replica([urls["content"]], timeout=5)
        return replica, await read_all(replica)

    replica, body = run(main())
    assert body == CONTENT
    assert (replica.url, replica.status, replica.length) == (urls["content"], 200, len(CONTENT))
    assert replica.headers["content-length"] == str(len(CONTENT))  # names lower-cased


def test_a_node_named_by_host_name_is_read(urls: dict[str, str]) -> None:
    url = urls["content"].replace("127.0.0.1", "localhost")

    async def main() -> bytes:
        return await read_all(await open_replica([url], timeout=5))

    assert run(main()) == CONTENT


def test_get_a_range_reads_those_bytes(urls: dict[str, str]) -> None:
    async def main() -> tuple[AsyncReplicaResponse, bytes, bytes]:
        replica = await open_replica([urls["content"]], byte_range=(1000, 70999), timeout=5)
        body = await read_all(replica)
        return replica, body, await replica.read(10)

    replica, body, after = run(main())
    assert (replica.status, replica.length) == (206, 70000)
    assert replica.headers["content-range"] == f"bytes 1000-70999/{len(CONTENT)}"
    assert body == CONTENT[1000:71000]
    assert after == b""  # and b"" again at the end


def test_a_read_size_below_one_is_refused(urls: dict[str, str]) -> None:
    async def main() -> bytes:
        async with await open_replica([urls["content"]], timeout=5) as replica:
            with pytest.raises(ValueError, match="positive"):
                await replica.read(-1)  # would read the whole body at once
            return await replica.read(10)

    assert run(main()) == CONTENT[:10]


def test_head_has_the_length_and_no_body(urls: dict[str, str]) -> None:
    async def main() -> tuple[AsyncReplicaResponse, bytes]:
        async with await open_replica([urls["content"]], method="HEAD", timeout=5) as replica:
            return replica, await replica.read(100)

    replica, body = run(main())
    assert (replica.status, replica.length, body) == (200, len(CONTENT), b"")


# -- failover ---------------------------------------------------------------------------------

def test_failover_past_refused_404_wrong_length_and_bad_urls(urls: dict[str, str]) -> None:
    bad = [param.values[0] for param in BAD_URLS]
    tried = [refused_url(), urls["missing"], urls["other"], *bad, urls["content"]]

    async def main() -> tuple[str, bytes]:
        replica = await open_replica(tried, size=len(CONTENT), timeout=5)
        return replica.url, await read_all(replica)

    assert run(main()) == (urls["content"], CONTENT)


def test_all_replicas_failing_is_a_storage_error_naming_each(urls: dict[str, str]) -> None:
    bad = [param.values[0] for param in BAD_URLS]
    refused = refused_url()
    with pytest.raises(StorageError, match="no replica answered") as raised:
        run(open_replica([refused, urls["other"], urls["missing"], *bad], size=len(CONTENT), timeout=5))
    message = str(raised.value)
    assert f"{refused}: " in message
    assert f"{urls['missing']}: HTTP 404" in message
    assert f"{urls['other']}: {len(OTHER)} bytes, expected {len(CONTENT)}" in message
    assert all(f"{url}: bad storage URL" in message for url in bad)
    assert raised.value.status == 404  # the last status seen


def test_no_urls_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="no paths"):
        run(open_replica([], timeout=1))


# -- scripted nodes ---------------------------------------------------------------------------

RESPONSE_HEAD = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n"


class ScriptedNode(LoopbackServer):
    """Reads a request head, then ``behaviour(conn)`` answers; counts connections still open."""

    def __init__(self, behaviour: Callable[[socket.socket], None]) -> None:
        self.behaviour = behaviour
        self.open = 0
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self.open += 1
        try:
            head = b""
            while b"\r\n\r\n" not in head and (data := conn.recv(4096)):
                head += data
            self.behaviour(conn)
            while conn.recv(65536):  # until the client closes its end
                pass
        except OSError:
            pass
        finally:
            conn.close()
            with self._lock:
                self.open -= 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dev1/0/000/000/0000000001.fid"


@pytest.fixture
def nodes() -> Iterator[Callable[[Callable[[socket.socket], None]], ScriptedNode]]:
    started: list[ScriptedNode] = []

    def start(behaviour: Callable[[socket.socket], None]) -> ScriptedNode:
        started.append(ScriptedNode(behaviour))
        return started[-1]

    yield start
    for node in started:
        node.stop()


def good_node(conn: socket.socket) -> None:
    conn.sendall(RESPONSE_HEAD % 5 + b"hello")
    conn.shutdown(socket.SHUT_WR)


def dripping_node(conn: socket.socket) -> None:
    for byte in RESPONSE_HEAD % 5 + b"hello":  # 13 s in all
        conn.sendall(bytes([byte]))
        time.sleep(0.3)


def endless_node(conn: socket.socket) -> None:
    """A head announcing 10 MB, the first 1000 bytes, then nothing: the body is still coming."""
    conn.sendall(RESPONSE_HEAD % 10_000_000 + b"x" * 1000)


def fast_node(size: int) -> Callable[[socket.socket], None]:
    """A node sending a body of ``size`` zero bytes as fast as the client takes it."""
    block = memoryview(bytes(1024 * 1024))  # sent again and again: the node allocates nothing

    def send(conn: socket.socket) -> None:
        conn.sendall(RESPONSE_HEAD % size)
        for _ in range(size // len(block)):
            conn.sendall(block)

    return send


def test_a_node_dripping_its_head_costs_the_timeout_then_the_next_replica_answers(nodes) -> None:
    dripping, good = nodes(dripping_node), nodes(good_node)

    async def main() -> tuple[str, bytes, float]:
        started = time.monotonic()
        replica = await open_replica([dripping.url, good.url], timeout=1)
        return replica.url, await read_all(replica), time.monotonic() - started

    url, body, elapsed = run(main())
    assert (url, body) == (good.url, b"hello")
    assert 0.9 <= elapsed < 2.0
    assert eventually(lambda: dripping.open == 0)  # the dripping connection was dropped


def test_a_node_dripping_its_head_alone_is_a_storage_error_at_the_deadline(nodes) -> None:
    dripping = nodes(dripping_node)
    started = time.monotonic()
    with pytest.raises(StorageError, match="no status line and headers, or no body after them, within 1s"):
        run(open_replica([dripping.url], timeout=1))
    assert 0.9 <= time.monotonic() - started < 2.0


def test_a_slow_but_live_body_is_read_to_the_end(nodes) -> None:
    chunks = [bytes([65 + n]) * 1000 for n in range(7)]

    def slow_body(conn: socket.socket) -> None:
        conn.sendall(RESPONSE_HEAD % sum(map(len, chunks)))
        for chunk in chunks:  # one every 0.3 s: 2.1 s in all, each well within the timeout
            time.sleep(0.3)
            conn.sendall(chunk)

    node = nodes(slow_body)

    async def main() -> bytes:
        return await read_all(await open_replica([node.url], timeout=1))

    started = time.monotonic()
    assert run(main()) == b"".join(chunks)
    assert time.monotonic() - started >= 2  # longer than the timeout, and not cut


def test_a_silent_body_is_a_storage_error_after_the_timeout(nodes) -> None:
    node = nodes(endless_node)

    async def main() -> None:
        await read_all(await open_replica([node.url], timeout=1))

    started = time.monotonic()
    with pytest.raises(StorageError, match="sent nothing for 1s"):
        run(main())
    assert 0.9 <= time.monotonic() - started < 2.0
    assert eventually(lambda: node.open == 0)


def test_a_caller_pausing_longer_than_the_timeout_between_reads_is_not_cut(nodes) -> None:
    def two_parts(conn: socket.socket) -> None:
        conn.sendall(RESPONSE_HEAD % 2000 + b"a" * 1000)
        time.sleep(0.5)
        conn.sendall(b"b" * 1000)  # long buffered by the time the caller reads on

    node = nodes(two_parts)

    async def main() -> bytes:
        async with await open_replica([node.url], timeout=0.3) as replica:
            first = await replica.read(1000)
            await asyncio.sleep(1)  # the timeout is per read, not for the caller's own pace
            return first + b"".join([chunk async for chunk in replica.chunks()])

    assert run(main()) == b"a" * 1000 + b"b" * 1000


def test_a_silent_body_after_a_live_part_is_a_storage_error_after_the_timeout(nodes) -> None:
    def live_then_silent(conn: socket.socket) -> None:
        conn.sendall(RESPONSE_HEAD % 10_000)
        for _ in range(4):  # 1.2 s of a live body, each part within the timeout
            conn.sendall(b"x" * 100)
            time.sleep(0.3)

    node = nodes(live_then_silent)
    received: list[bytes] = []

    async def main() -> None:
        async with await open_replica([node.url], timeout=0.8) as replica:
            async for chunk in replica.chunks():
                received.append(chunk)

    started = time.monotonic()
    with pytest.raises(StorageError, match=r"sent nothing for 0\.8s"):
        run(main())
    assert 1.7 <= time.monotonic() - started < 2.8  # 0.8 s after the last part, not after the first
    assert b"".join(received) == b"x" * 400
    assert eventually(lambda: node.open == 0)


@pytest.mark.parametrize("size", [70 * 1024, 1024 * 1024])
def test_a_response_head_over_64_kib_is_refused(nodes, size: int) -> None:
    def big_head(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.0 200 OK\r\nX-Padding: " + b"p" * size + b"\r\nContent-Length: 0\r\n\r\n")

    node = nodes(big_head)
    with pytest.raises(StorageError, match="sent a response head over 65536 bytes"):
        run(open_replica([node.url], timeout=5))
    assert eventually(lambda: node.open == 0)


def test_chunks_are_at_most_the_size_asked(nodes) -> None:
    size = 3 * 1024 * 1024

    def big_body(conn: socket.socket) -> None:
        conn.sendall(RESPONSE_HEAD % size + bytes(size))

    node = nodes(big_body)

    async def main(chunk_size: int | None) -> list[int]:
        async with await open_replica([node.url], timeout=5) as replica:
            chunks = replica.chunks() if chunk_size is None else replica.chunks(chunk_size)
            return [len(chunk) async for chunk in chunks]

    default = run(main(None))
    assert sum(default) == size and max(default) <= BODY_CHUNK_SIZE
    small = run(main(1000))
    assert sum(small) == size and max(small) <= 1000


def test_a_body_cut_short_is_a_storage_error_from_chunks(nodes) -> None:
    def cut(conn: socket.socket) -> None:
        conn.sendall(RESPONSE_HEAD % 100 + b"x" * 60)
        conn.shutdown(socket.SHUT_WR)

    node = nodes(cut)
    received: list[bytes] = []

    async def main() -> None:
        async with await open_replica([node.url], timeout=5) as replica:
            async for chunk in replica.chunks():
                received.append(chunk)

    with pytest.raises(StorageError, match="ended 40 bytes short of its length"):
        run(main())
    assert b"".join(received) == b"x" * 60


def test_aclose_closes_the_connection(nodes) -> None:
    node = nodes(endless_node)

    async def main() -> None:
        replica = await open_replica([node.url], timeout=5)
        assert await replica.read(100) == b"x" * 100
        assert node.open == 1
        await replica.aclose()
        assert await eventually_async(lambda: node.open == 0)  # within the loop, not by its end
        await replica.aclose()  # again: nothing happens
        with pytest.raises(ValueError, match="closed"):
            await replica.read(100)

    run(main())
    assert node.connections == 1


def test_a_task_cancelled_while_reading_closes_the_connection(nodes) -> None:
    node = nodes(endless_node)

    async def main() -> list[bytes]:
        received: list[bytes] = []
        replica = await open_replica([node.url], timeout=30)

        async def consume() -> None:
            async for chunk in replica.chunks():  # no async with: the cancellation alone must close it
                received.append(chunk)

        task = asyncio.create_task(consume())
        while not received:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # now waiting for more of the body
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await eventually_async(lambda: node.open == 0)  # while the response is still referenced
        assert replica.status == 200
        return received

    assert b"".join(run(main())) == b"x" * 1000


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_response_closed_while_a_read_waits_ends_that_read(
        nodes, urls: dict[str, str], new_loop: Callable[[], Any]) -> None:
    """Closed from elsewhere (a callback, another task) while a read waits on the node: the read
    raises StorageError at once rather than at its timeout, the connection closes, and the loop's
    next response is read as usual."""
    node = nodes(endless_node)

    async def main() -> bytes:
        replica = await open_replica([node.url], timeout=30)
        assert await replica.read(1000) == b"x" * 1000
        reading = asyncio.ensure_future(replica.read(100))
        await asyncio.sleep(0.1)  # waiting for the rest of the body
        replica.close()
        await ends_at_once(reading, re.escape(node.url))
        assert await eventually_async(lambda: node.open == 0)
        return await read_all(await open_replica([urls["content"]], timeout=5))

    assert run_on(new_loop, main()) == CONTENT


LOOPS = pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])


@LOOPS
def test_a_read_begun_as_the_loop_stalls_past_its_timeout_keeps_that_timeout(nodes, new_loop: Callable[[], Any]) -> None:
    """The watchdog came due in the turn the read gave the loop before it waited, found no read
    waiting, and stopped: the read then waited on a silent node with no timeout at all."""
    node = nodes(endless_node)
    go = asyncio.Event()

    async def reader(replica: AsyncReplicaResponse) -> None:
        await go.wait()
        with pytest.raises(StorageError, match="sent nothing for 0.2s"):
            await replica.read(100)

    async def staller() -> None:
        await asyncio.sleep(0.1)
        time.sleep(0.15)  # the loop stalls (another request's work) as the first read's deadline passes
        go.set()

    async def blocker() -> None:
        await go.wait()
        time.sleep(0.3)  # and again, right behind the read

    async def main() -> None:
        async with await open_replica([node.url], timeout=0.2) as replica:
            assert await replica.read(1000) == b"x" * 1000  # the deadline: 0.2 s from now
            await asyncio.gather(reader(replica), staller(), blocker())

    run_on(new_loop, main(), seconds=3)


@LOOPS
def test_a_resumed_transfer_closed_while_it_waits_ends_and_goes_on_from_no_replica(
        nodes, new_loop: Callable[[], Any]) -> None:
    """Closed from a callback while its read waited, it took the close for a transfer cut midway
    and went on from a replica again (a second GET, the rest of the body read)."""
    node = nodes(endless_node)

    async def main() -> None:
        replica = await open_replica([node.url], size=10_000_000, timeout=30)
        resumed = AsyncResumedReplica(replica, Resumption([node.url], None, 10_000_000), timeout=30)
        chunks = resumed.chunks()
        assert await chunks.__anext__() == b"x" * 1000
        asyncio.get_running_loop().call_later(0.1, resumed.close)  # while the next read waits
        await ends_at_once(chunks.__anext__(), "connection closed")
        with pytest.raises(ValueError, match="closed"):
            await resumed.replica.read(1)

    run_on(new_loop, main())
    assert node.connections == 1


def kept_alive_node(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")


def test_a_child_forked_while_a_loop_was_open_ends_its_copies_of_that_loops_kept_connections(nodes) -> None:
    """The child kept them for its whole life: the node never saw the parent close its own."""
    node = nodes(kept_alive_node)
    loop = asyncio.new_event_loop()
    assert loop.run_until_complete(read_replica([node.url], length=5, timeout=5)) == b"hello"  # kept
    child_ready, child_may_end = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a loop of its own, which ends what it kept too
        code = 1
        try:
            async def own() -> bytes:
                try:
                    return await read_replica([node.url], length=5, timeout=5)
                finally:
                    close_idle_connections()
            code = 0 if asyncio.run(own()) == b"hello" else 1
            os.write(child_ready[1], b"x")
            select.select([child_may_end[0]], [], [], 10)
        finally:
            os._exit(code)
    try:
        assert select.select([child_ready[0]], [], [], 10)[0]

        async def close() -> None:
            close_idle_connections()  # the parent ends its kept connection
        loop.run_until_complete(close())
        assert eventually(lambda: node.open == 0)  # while the child lives
    finally:
        os.write(child_may_end[1], b"x")
        _, status = os.waitpid(pid, 0)
        loop.close()
        for end in (*child_ready, *child_may_end):
            os.close(end)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_second_read_while_one_waits_is_refused_and_the_first_goes_on(nodes) -> None:
    def two_parts(conn: socket.socket) -> None:
        conn.sendall(RESPONSE_HEAD % 20 + b"x" * 10)
        time.sleep(0.3)
        conn.sendall(b"y" * 10)

    node = nodes(two_parts)

    async def main() -> bytes:
        async with await open_replica([node.url], timeout=5) as replica:
            assert await replica.read(100) == b"x" * 10
            first = asyncio.ensure_future(replica.read(100))
            await asyncio.sleep(0.05)  # waiting for the node
            with pytest.raises(RuntimeError, match="another read"):
                await replica.read(100)
            return await first

    assert run(main()) == b"y" * 10


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_node_that_keeps_up_leaves_the_loops_other_tasks_their_turns(nodes, new_loop: Callable[[], Any]) -> None:
    """Each piece read gives the event loop a turn, also when the next one is there already."""
    node = nodes(fast_node(16 * 1024 * 1024))

    async def main() -> list[int]:
        turns = 0

        async def other_task() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        other = asyncio.ensure_future(other_task())
        seen = []  # the other task's turns as each piece came
        async with await open_replica([node.url], timeout=10) as replica:
            await asyncio.sleep(0.5)  # megabytes wait in the kernel's buffers
            async for _ in replica.chunks():
                seen.append(turns)
        other.cancel()
        await asyncio.gather(other, return_exceptions=True)
        return seen

    seen = run_on(new_loop, main(), 60)
    assert len(seen) > 100
    assert all(later > earlier for earlier, later in zip(seen, seen[1:]))


def test_interim_answers_without_end_cost_the_timeout(nodes) -> None:
    def flood(conn: socket.socket) -> None:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 1000)

    node = nodes(flood)
    started = time.monotonic()
    with pytest.raises(StorageError, match="within 1s"):
        run(open_replica([node.url], timeout=1))
    assert time.monotonic() - started < 2.5


def test_a_body_read_slowly_is_not_read_ahead(nodes) -> None:
    size = 64 * 1024 * 1024
    node = nodes(fast_node(size))

    async def main() -> list[int]:
        pieces = []
        async with await open_replica([node.url], timeout=10) as replica:
            async for chunk in replica.chunks():
                pieces.append(len(chunk))
                await asyncio.sleep(0.002)  # slower than the node sends
        return pieces

    tracemalloc.start()
    try:
        pieces = run(main(), seconds=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(pieces) == size
    assert max(pieces) <= SMALL_PIECE_SIZE  # past the first 16 MiB too: a slow reader gets small pieces
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB while reading 64 MiB"


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_reader_that_keeps_up_gets_larger_pieces_past_the_first_16_mib(nodes, new_loop: Callable[[], Any]) -> None:
    """Every response, also the next one on a kept connection, starts in small pieces (a client
    seems fast while the kernel's buffers towards it fill); past them, a reader waiting for its
    pieces gets larger ones, up to BODY_CHUNK_SIZE, and small ones again once it falls behind."""
    size = GROW_AFTER_BYTES + 8 * 1024 * 1024
    slow_from = GROW_AFTER_BYTES + 4 * 1024 * 1024  # where the second reader starts to dawdle
    block = memoryview(bytes(1024 * 1024))
    connections = []

    def keep_alive_node(conn: socket.socket) -> None:
        connections.append(conn)
        for answer in range(2):
            head = b""
            while answer and b"\r\n\r\n" not in head and (data := conn.recv(4096)):
                head += data  # the second request, on the same connection
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size // len(block)):
                conn.sendall(block)

    node = nodes(keep_alive_node)

    async def pieces(slow_after: int = size) -> list[int]:
        sizes: list[int] = []
        async with await open_replica([node.url], timeout=10) as replica:
            async for chunk in replica.chunks():
                sizes.append(len(chunk))
                if sum(sizes) > slow_after:
                    await asyncio.sleep(0.002)  # slower than the node sends
        return sizes

    async def main() -> list[list[int]]:
        try:
            return [await pieces(), await pieces(slow_from)]
        finally:
            close_idle_connections()

    fast, turning = run_on(new_loop, main(), 60)
    assert len(connections) == 1  # the second response came on the connection the first left open
    for sizes in (fast, turning):
        assert sum(sizes) == size
        starts = itertools.accumulate([0] + sizes)
        early = [piece for piece, start in zip(sizes, starts) if start + piece < GROW_AFTER_BYTES - 4096]
        assert max(early) <= SMALL_PIECE_SIZE
        assert SMALL_PIECE_SIZE < max(sizes) <= BODY_CHUNK_SIZE
    turned = next(index for index, start in enumerate(itertools.accumulate(turning)) if start > slow_from)
    assert max(turning[turned + 2:]) <= SMALL_PIECE_SIZE  # past the piece read as it turned aside


# -- PUT --------------------------------------------------------------------------------------

@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_put_aborted_while_its_write_waits_ends_that_write(
        nodes, urls: dict[str, str], new_loop: Callable[[], Any]) -> None:
    """Aborted from elsewhere while a write waits for a node that takes nothing: the write raises
    StorageError at once rather than at its timeout, and the loop's next connection (perhaps on
    the same descriptor number) is read as usual."""
    node = nodes(lambda conn: time.sleep(1.5))  # takes the request head, then reads nothing

    async def main() -> bytes:
        put = await AsyncPutStream.open(node.url, length=1 << 30, timeout=10)

        async def write() -> None:
            for _ in range(1024):
                await put.write(b"y" * (1 << 20))

        writing = asyncio.ensure_future(write())
        await asyncio.sleep(0.5)  # the kernel's buffers are full: the write waits
        assert not writing.done()
        put.abort()
        await ends_at_once(writing, "dropped")
        return await read_all(await open_replica([urls["content"]], timeout=5))

    assert run_on(new_loop, main()) == CONTENT


def node_url(mogile: DevMogileFS, path: str) -> str:
    return f"{mogile.nodes[0].url}/dev1/7/777/777/{path}"


@pytest.mark.parametrize("with_length", [pytest.param(True, id="content-length"), pytest.param(False, id="chunked")])
def test_put_stores_the_body_byte_exact(mogile: DevMogileFS, with_length: bool) -> None:
    url = node_url(mogile, f"put-{with_length}.fid")
    pieces = [CONTENT[:1], CONTENT[1:70000], b"", CONTENT[70000:]]

    async def main() -> bytes:
        put = await AsyncPutStream.open(url, length=len(CONTENT) if with_length else None, timeout=5)
        buffer = bytearray(len(CONTENT))
        for piece in pieces:
            buffer[:len(piece)] = piece  # one buffer filled again and again, as a reader would
            await put.write(memoryview(buffer)[:len(piece)])
        await put.finish()
        return await read_all(await open_replica([url], timeout=5))

    assert run(main()) == CONTENT


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("with_length", [pytest.param(True, id="content-length"), pytest.param(False, id="chunked")])
def test_a_view_of_wider_items_is_put_as_its_bytes(mogile: DevMogileFS, kind: str, with_length: bool) -> None:
    """Its length counted items: a quarter of an ``array('i')``'s bytes, so that the PUT was refused
    as longer than announced, or its chunk announced a quarter of what it held."""
    url = node_url(mogile, f"wide-{kind}-{with_length}.fid")
    data = memoryview(array.array("i", range(30_000)))
    length = data.nbytes if with_length else None
    if kind == "sync":
        put = PutStream(url, length=length, timeout=5)
        put.write(data)
        put.finish()
    else:
        async def main() -> None:
            stream = await AsyncPutStream.open(url, length=length, timeout=5)
            await stream.write(data)
            await stream.finish()
        run(main())

    async def read() -> bytes:
        return await read_all(await open_replica([url], timeout=5))

    assert run(read()) == data.tobytes()


@pytest.mark.parametrize("with_length", [pytest.param(True, id="content-length"), pytest.param(False, id="chunked")])
def test_an_aborted_put_leaves_no_file(mogile: DevMogileFS, with_length: bool) -> None:
    name = f"aborted-{with_length}.fid"
    url = node_url(mogile, name)

    async def main() -> None:
        put = await AsyncPutStream.open(url, length=len(CONTENT) if with_length else None, timeout=5)
        await put.write(CONTENT[:50000])
        put.abort()
        put.abort()  # again: nothing happens
        with pytest.raises(StorageError, match="aborted"):
            await put.write(b"more")
        await asyncio.sleep(0.2)  # for the node to see the connection end

    run(main())
    directory = Path(mogile.nodes[0].docroot) / "dev1/7/777/777"
    assert eventually(lambda: not any(directory.glob(f"*{name}*")))  # neither the file nor its temporary
    with pytest.raises(StorageError, match="HTTP 404"):
        run(open_replica([url], timeout=5))


def test_put_to_a_refused_port_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="refused"):
        run(AsyncPutStream.open(refused_url(), length=1, timeout=1))


@pytest.mark.parametrize("url", BAD_URLS)
def test_put_to_a_bad_url_is_a_storage_error(url: str) -> None:
    with pytest.raises(StorageError, match="bad storage URL"):
        run(AsyncPutStream.open(url, length=1, timeout=1))


def test_put_answered_non_2xx_is_a_storage_error_with_the_status(mogile: DevMogileFS) -> None:
    async def main() -> None:
        put = await AsyncPutStream.open(f"{mogile.nodes[0].url}/toplevel.fid", length=2, timeout=5)
        await put.write(b"no")
        await put.finish()

    with pytest.raises(StorageError, match="answered HTTP 400") as raised:
        run(main())
    assert raised.value.status == 400


def test_put_shorter_than_its_length_is_a_storage_error(mogile: DevMogileFS) -> None:
    url = node_url(mogile, "short.fid")

    async def main() -> None:
        put = await AsyncPutStream.open(url, length=10, timeout=5)
        await put.write(b"12345")
        await put.finish()

    with pytest.raises(StorageError, match="5 of the 10 bytes"):
        run(main())
    with pytest.raises(StorageError, match="HTTP 404"):
        run(open_replica([url], timeout=5))


def test_a_put_answered_on_a_connection_the_node_keeps_open_ends_at_once(nodes) -> None:
    def answers_and_stays(conn: socket.socket) -> None:  # deaf to the request's Connection: close
        conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")

    node = nodes(answers_and_stays)

    async def main() -> float:
        put = await AsyncPutStream.open(node.url, length=5, timeout=2)
        await put.write(b"hello")
        started = time.monotonic()
        await put.finish()
        return time.monotonic() - started

    assert run(main(), seconds=10) < 1
    assert eventually(lambda: node.open == 0)  # and its connection closed


def test_a_put_answered_with_a_length_of_no_file_is_a_storage_error(nodes) -> None:
    """A Content-Length of thousands of digits, past what int() reads, was a ValueError, which
    an upload does not take as a node's failure."""
    node = nodes(lambda conn: conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 1" + b"0" * 4400 + b"\r\n\r\n"))

    async def main() -> None:
        put = await AsyncPutStream.open(node.url, length=5, timeout=2)
        await put.write(b"hello")
        await put.finish()

    with pytest.raises(StorageError, match="Content-Length"):
        run(main(), seconds=10)


def _put(kind: str, url: str, body: bytes, timeout: float) -> None:
    """PUT ``body`` to ``url`` with the blocking or the asyncio stream."""
    if kind == "sync":
        put = PutStream(url, length=len(body), timeout=timeout)
        put.write(body)
        put.finish()
        return

    async def main() -> None:
        stream = await AsyncPutStream.open(url, length=len(body), timeout=timeout)
        await stream.write(body)
        await stream.finish()
    run(main(), seconds=timeout + 10)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_puts_answer_read_past_interim_ones(nodes, kind: str) -> None:
    node = nodes(lambda conn: conn.sendall(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"))
    _put(kind, node.url, b"hello", timeout=2)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("answer", [
    pytest.param(lambda conn: [conn.sendall(bytes([byte])) or time.sleep(0.2) for byte in b"HTTP/1.1 201 Created\r\n\r\n"],
                 id="trickled"),
    pytest.param(lambda conn: [conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n") or time.sleep(0.2) for _ in range(40)],
                 id="endless-interim"),
])
def test_a_puts_answer_comes_within_the_timeout(nodes, kind: str, answer: Callable[[socket.socket], None]) -> None:
    """The blocking PUT waited on each piece of the answer anew: a node trickling it took minutes."""
    node = nodes(answer)
    started = time.monotonic()
    with pytest.raises(StorageError):
        _put(kind, node.url, b"hello", timeout=1)
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_put_its_node_ends_unanswered_fails_naming_the_put(nodes, kind: str) -> None:
    """What an upload's error lists for each node that failed it, the same from both streams."""
    node = nodes(lambda conn: conn.shutdown(socket.SHUT_WR))
    with pytest.raises(StorageError, match=rf"^PUT {re.escape(node.url)} failed: .*closed the connection"):
        _put(kind, node.url, b"hello", timeout=2)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_puts_answer_body_is_not_read(nodes, kind: str) -> None:
    """The blocking PUT read the whole body of the node's answer into memory (and waited for it)."""
    node = nodes(lambda conn: conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 300000000\r\n\r\n" + b"x" * 100000))
    started = time.monotonic()
    _put(kind, node.url, b"hello", timeout=2)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("url", ["http://ex\u00e4mple.invalid:7500/dev1/0/000/000/0000000001.fid",
                                 "http://127.0.0.1:0/dev1/0/000/000/0000000001.fid"], ids=["non-ascii-host", "port-0"])
def test_a_storage_url_no_request_can_reach_is_a_storage_error(url: str) -> None:
    with pytest.raises(StorageError, match="bad storage URL"):
        Target(url)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_put_answered_204_with_a_length_is_done_at_once(nodes, kind: str) -> None:
    """A 204 has no body whatever its Content-Length says: the asyncio PUT waited for one."""
    node = nodes(lambda conn: conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"))
    started = time.monotonic()
    _put(kind, node.url, b"hello", timeout=2)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_put_refused_is_told_by_its_status_whatever_its_body(nodes, kind: str) -> None:
    """The asyncio PUT waited for the refusal's body, which never came, and reported a timeout."""
    node = nodes(lambda conn: conn.sendall(b"HTTP/1.1 507 Insufficient Storage\r\nContent-Length: 20\r\n\r\n"))
    started = time.monotonic()
    with pytest.raises(StorageError, match="HTTP 507"):
        _put(kind, node.url, b"hello", timeout=2)
    assert time.monotonic() - started < 1


def refusing_at_once(conn: socket.socket) -> None:
    """mogstored with a full disk: its refusal before the body, then the connection closed unread."""
    conn.sendall(b"HTTP/1.0 507 Insufficient Storage\r\nContent-Length: 0\r\n\r\n")
    conn.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_put_refused_before_its_body_is_told_by_its_status_not_the_broken_pipe(nodes, kind: str) -> None:
    """RFC 9112 9.5: a client sending a body watches for an early answer. The node's 507 read as a
    broken pipe, which sent its operators looking for a network fault rather than a full disk."""
    node = nodes(refusing_at_once)
    with pytest.raises(StorageError, match="answered HTTP 507 before taking all of the body") as raised:
        _put(kind, node.url, b"x" * (16 * 1024 * 1024), timeout=5)
    assert raised.value.status == 507


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_put_the_node_stops_reading_fails_after_one_timeout(nodes, kind: str) -> None:
    """Looking for the node's early answer, the blocking PUT waited a second timeout for it."""
    node = nodes(lambda conn: time.sleep(3))  # takes the head, then reads nothing
    started = time.monotonic()
    with pytest.raises(StorageError):
        _put(kind, node.url, b"x" * (64 * 1024 * 1024), timeout=1)
    assert time.monotonic() - started < 1.8


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_put_finished_or_aborted_takes_nothing_more(nodes, kind: str) -> None:
    """The blocking PUT answered a write or a finish after its end with a socket's error."""
    node = nodes(lambda conn: conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"))
    if kind == "sync":
        finished, aborted = PutStream(node.url, timeout=2), PutStream(node.url, timeout=2)
        finished.write(b"hello")
        finished.finish()
        aborted.abort()
        for late in (lambda: finished.write(b"more"), finished.finish, lambda: aborted.write(b"more"), aborted.finish):
            with pytest.raises(StorageError, match="already finished or aborted"):
                late()
        return

    async def main() -> None:
        finished, aborted = await AsyncPutStream.open(node.url, timeout=2), await AsyncPutStream.open(node.url, timeout=2)
        await finished.write(b"hello")
        await finished.finish()
        aborted.abort()
        for late in (lambda: finished.write(b"more"), finished.finish, lambda: aborted.write(b"more"), aborted.finish):
            with pytest.raises(StorageError, match="already finished or aborted"):
                await late()
    run(main(), seconds=10)


#: A storage node in a process of its own, which takes a PUT's body as fast as it comes: it
#: prints its port, reads ``Content-Length`` bytes, answers 201.
FAST_NODE = """
import socket, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
head = b""
while b"\\r\\n\\r\\n" not in head:
    head += conn.recv(65536)
head, _, body = head.partition(b"\\r\\n\\r\\n")
left = int(head.lower().split(b"content-length:")[1].split(b"\\r\\n")[0]) - len(body)
view = memoryview(bytearray(1 << 20))
while left > 0:
    left -= conn.recv_into(view)
conn.sendall(b"HTTP/1.1 201 Created\\r\\nContent-Length: 0\\r\\n\\r\\n")
"""


def test_a_put_gives_the_other_tasks_a_turn_while_the_node_keeps_up() -> None:
    """A node that takes every piece at once never makes the PUT wait for room: it ran on without
    a turn for the loop's other tasks (a 256 MiB upload held a uvicorn worker's requests 0.6 s)."""
    size, chunk = 64 * 1024 * 1024, bytes(1024 * 1024)
    node = subprocess.Popen([sys.executable, "-c", FAST_NODE], stdout=subprocess.PIPE, text=True)
    turns = 0

    async def main() -> None:
        nonlocal turns
        done = asyncio.Event()

        async def other_task() -> None:
            nonlocal turns
            while not done.is_set():
                turns += 1
                await asyncio.sleep(0)

        ticking = asyncio.ensure_future(other_task())
        try:
            put = await AsyncPutStream.open(f"http://127.0.0.1:{node.stdout.readline().strip()}/dev1/1.fid",
                                            length=size, timeout=10)
            turns = 0
            for _ in range(size // len(chunk)):
                await put.write(chunk)
            await put.finish()
        finally:
            done.set()
            await ticking

    try:
        run(main(), seconds=60)
    finally:
        node.kill()
        node.wait()
    # A turn at least per 256 KiB piece sent (they came only when the kernel's buffer was full).
    assert turns >= size // PUT_PIECE_SIZE, f"{turns} turns for the other task in {size >> 20} MiB"
