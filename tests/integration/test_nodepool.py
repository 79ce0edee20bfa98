"""Serve mode's connections to storage nodes: kept alive and reused, never when unsafe (the
WSGI side's thread-safe pool, and the asyncio side's, per event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mogile_middleware.async_storage import close_idle_connections
from mogile_middleware.async_storage import open_replica as async_open_replica
from mogile_middleware.devserver.storage_node import StorageNode
from mogile_middleware.nodepool import IdlePool, NodePool
from mogile_middleware.exceptions import StorageError
from mogile_middleware.storage import NodeConnection, SeekableBody, open_replica
from wiretools import TEN, KeptAliveNode, LoopbackServer, honest

BODY = bytes(range(256)) * 1024  # 256 KiB: more than one read


def established(port: int) -> int:
    """Established TCP connections to the loopback ``port`` (from /proc/net/tcp)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            count += 1
    return count


def settle(port: int, expected: int) -> int:
    """The node's established connections once they reach ``expected`` (or after 5 s)."""
    deadline = time.monotonic() + 5
    while (count := established(port)) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


@pytest.fixture
def node(tmp_path: Path) -> Iterator[StorageNode]:
    (tmp_path / "dev1").mkdir()
    (tmp_path / "dev1" / "file.fid").write_bytes(BODY)
    storage = StorageNode(tmp_path, host="127.0.0.1", port=0)
    storage.start()
    yield storage
    storage.stop()


def url(node: StorageNode) -> str:
    return f"http://127.0.0.1:{node.port}/dev1/file.fid"


def read_all(node: StorageNode, pool: NodePool, **options: object) -> bytes:
    with open_replica([url(node)], pool=pool, **options) as replica:  # type: ignore[arg-type]
        return b"".join(replica.iter_chunks())


def test_responses_read_to_the_end_share_one_connection(node: StorageNode) -> None:
    pool = NodePool()
    for _ in range(5):
        assert read_all(node, pool) == BODY
    assert read_all(node, pool, byte_range=(10, 19)) == BODY[10:20]
    with open_replica([url(node)], method="HEAD", pool=pool) as replica:
        assert replica.length == len(BODY)
    assert settle(node.port, 1) == 1
    pool.close()
    assert settle(node.port, 0) == 0


def test_a_response_left_mid_body_closes_its_connection(node: StorageNode) -> None:
    pool = NodePool()
    with open_replica([url(node)], pool=pool) as replica:
        assert replica.read(10) == BODY[:10]
    assert settle(node.port, 0) == 0
    assert read_all(node, pool) == BODY  # a new connection, and the whole body on it


def test_a_connection_the_node_closed_while_idle_is_not_used(node: StorageNode) -> None:
    pool = NodePool()
    assert read_all(node, pool) == BODY
    node.stop()  # closes every connection, as a restarted mogstored would
    node.start()
    assert read_all(node, pool) == BODY


def test_a_connection_the_garbage_collector_closed_is_not_used(node: StorageNode) -> None:
    # A Django model and its file refer to each other: a file read to its end and left open is
    # freed by the collector, which closed its socket, then gave the connection to the pool, and
    # the next read from that node failed.
    pool = NodePool()
    for _ in range(3):
        replica = open_replica([url(node)], pool=pool)
        assert b"".join(replica.iter_chunks()) == BODY
        replica.cycle = replica  # type: ignore[attr-defined]
        del replica
        gc.collect()
        assert read_all(node, pool) == BODY


def test_an_exception_raised_as_a_response_closes_never_pools_its_connection_twice(node: StorageNode) -> None:
    # A signal handler's exception (Ctrl-C, a SIGALRM timeout) raised in the pool's give() left
    # the response open: closed again (by its finalizer), it gave the same connection twice, and
    # two reads at once shared one socket, one of them getting the other's bytes.
    pool = NodePool()
    replica = open_replica([url(node)], pool=pool)
    assert b"".join(replica.iter_chunks()) == BODY

    def interrupt(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is IdlePool._unused.__code__:
            sys.settrace(None)
            raise KeyboardInterrupt  # where a signal handler may raise: a call in give()

    sys.settrace(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            replica.close()
    finally:
        sys.settrace(None)
    replica.close()
    first, second = open_replica([url(node)], pool=pool), open_replica([url(node)], pool=pool)
    assert b"".join(first.iter_chunks()) == BODY and b"".join(second.iter_chunks()) == BODY


def test_an_exception_raised_as_a_kept_connection_is_asked_closes_it(node: StorageNode) -> None:
    # Ctrl-C or a gevent.Timeout while a reused connection waits for the node's answer: closed at
    # once, as a fresh one is, not left open for as long as the error (and its frames) is kept.
    pool = NodePool()
    assert read_all(node, pool) == BODY
    assert settle(node.port, 1) == 1

    def interrupt(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is NodeConnection.exchange.__code__:
            sys.settrace(None)
            raise KeyboardInterrupt

    sys.settrace(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt) as interrupted:
            open_replica([url(node)], pool=pool)
    finally:
        sys.settrace(None)
    assert settle(node.port, 0) == 0, interrupted  # the error and its frames still kept
    assert read_all(node, pool) == BODY


def test_a_seekable_body_paused_longer_than_its_nodes_idle_timeout_goes_on_from_the_same_replica(
        tmp_path: Path) -> None:
    """What cp and Django's open() read: a file with one replica ended at the node's idle cut."""
    data = os.urandom(32 * 1024 * 1024)  # more than the kernel's buffers hold
    (tmp_path / "dev1").mkdir()
    (tmp_path / "dev1" / "0000000001.fid").write_bytes(data)  # its fid named: the same bytes by the next request
    storage = StorageNode(tmp_path, host="127.0.0.1", port=0, idle_timeout=0.5)
    storage.start()
    try:
        body = SeekableBody([f"http://127.0.0.1:{storage.port}/dev1/0000000001.fid"], length=len(data))
        read = body.read(65536)
        time.sleep(2)  # the node's send waits, then it closes
        read += body.read()
        body.close()
    finally:
        storage.stop()
    assert read == data


def test_idle_connections_are_bounded_per_node(node: StorageNode) -> None:
    pool = NodePool(per_node=2)
    replicas = [open_replica([url(node)], pool=pool) for _ in range(4)]
    for replica in replicas:
        assert b"".join(replica.iter_chunks()) == BODY
        replica.close()
    assert settle(node.port, 2) == 2
    pool.close()


class _Recorded(IdlePool[str]):
    """A pool of names standing for connections, recording those it closes."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(idle_seconds=10, clock=clock)
        self.closed: list[str] = []

    def usable(self, connection: str) -> bool:
        return True

    def discard(self, connection: str) -> None:
        self.closed.append(connection)


def test_connections_idle_for_their_time_close_as_the_pool_is_next_used_for_any_node() -> None:
    # A node no request goes to any more (its files moved, a burst's extra connections) kept its
    # idle connections, half-closed by the node, for the life of the process.
    now = [0.0]
    pool = _Recorded(lambda: now[0])
    pool.give(("a", 1), "a1")
    pool.give(("a", 1), "a2")
    now[0] = 5
    pool.give(("b", 1), "b1")
    assert pool.closed == []
    now[0] = 11
    pool.give(("b", 1), "b2")
    assert pool.closed == ["a1", "a2"]
    assert (pool.take(("b", 1)), pool.take(("b", 1)), pool.take(("a", 1))) == ("b2", "b1", None)


def test_threads_sharing_a_pool_each_get_their_bytes(node: StorageNode) -> None:
    pool = NodePool()
    results: list[bytes] = []
    lock = threading.Lock()

    def fetch() -> None:
        for first in range(0, 200, 10):
            with open_replica([url(node)], pool=pool, byte_range=(first, first + 9)) as replica:
                part = replica.read()
            with lock:
                results.append(part if part == BODY[first:first + 10] else b"wrong")

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 160 and b"wrong" not in results
    assert established(node.port) <= 8
    pool.close()


def test_a_forked_child_opens_connections_of_its_own(node: StorageNode) -> None:
    pool = NodePool()
    assert read_all(node, pool) == BODY
    pid = os.fork()
    if pid == 0:  # the child: the parent's idle socket must not be used here
        code = 1
        try:
            code = 0 if pool.take(("127.0.0.1", node.port)) is None and read_all(node, pool) == BODY else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert read_all(node, pool) == BODY  # the parent's connection is still good


def test_a_response_open_at_a_fork_is_kept_by_the_process_that_made_it_alone(node: StorageNode) -> None:
    """Read to its end but left open (a reference cycle) at the fork, then closed in each process:
    both kept it, and shared one connection, each able to get the other's answers."""
    pool = NodePool()
    replica = open_replica([url(node)], pool=pool)
    assert replica.read() == BODY
    pid = os.fork()
    if pid == 0:  # the child: its copy is closed, not kept
        code = 1
        try:
            replica.close()
            code = 0 if pool.take(("127.0.0.1", node.port)) is None and read_all(node, pool) == BODY else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    replica.close()
    assert read_all(node, pool) == BODY  # on the connection the parent made and kept


def test_a_response_open_mid_body_at_a_fork_and_closed_by_the_child_is_read_whole_by_the_parent(
        node: StorageNode) -> None:
    """A close shuts the connection down (a read waiting in another thread ends at once), but not
    one made before a fork, whose transfer the other process may be reading."""
    replica = open_replica([url(node)], pool=NodePool())
    first = replica.read(1000)
    pid = os.fork()
    if pid == 0:  # the child: its copy is closed
        try:
            replica.close()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert first + replica.read() == BODY


class ClosingAfterOneAnswer(LoopbackServer):
    """A node that keeps a connection alive after its first answer, then closes it when the next
    request arrives, unanswered: the race a kept-alive connection can lose."""

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # stop() closes the connections under it
            conn.recv(65536)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello")
            conn.recv(65536)  # the next request: dropped unanswered


def test_a_kept_connection_dropped_at_the_next_request_is_retried_on_a_fresh_one() -> None:
    node = ClosingAfterOneAnswer()
    try:
        pool = NodePool()
        path = f"http://127.0.0.1:{node.port}/dev1/x.fid"
        for _ in range(3):
            with open_replica([path], pool=pool) as replica:
                assert replica.read() == b"hello"
        assert node.connections == 3  # each reuse failed before any answer, and was retried
    finally:
        node.stop()


# -- the same for the asyncio side --------------------------------------------------------------

async def aread_all(node_url: str, **options: object) -> bytes:
    async with await async_open_replica([node_url], **options) as replica:  # type: ignore[arg-type]
        return b"".join([chunk async for chunk in replica.chunks()])


def test_async_responses_read_to_the_end_share_one_connection(node: StorageNode) -> None:
    async def main() -> int:
        for _ in range(5):
            assert await aread_all(url(node)) == BODY
        assert await aread_all(url(node), byte_range=(10, 19)) == BODY[10:20]
        async with await async_open_replica([url(node)], method="HEAD") as replica:
            assert replica.length == len(BODY)
        kept = settle(node.port, 1)
        close_idle_connections()
        return kept

    assert asyncio.run(main()) == 1
    assert settle(node.port, 0) == 0


def test_async_a_response_left_mid_body_closes_its_connection(node: StorageNode) -> None:
    async def main() -> None:
        async with await async_open_replica([url(node)]) as replica:
            assert (await replica.read(10)) == BODY[:10]
        assert settle(node.port, 0) == 0
        assert await aread_all(url(node)) == BODY
        close_idle_connections()

    asyncio.run(main())


def test_async_a_connection_the_node_closed_while_idle_is_not_used(node: StorageNode) -> None:
    async def main() -> None:
        assert await aread_all(url(node)) == BODY
        node.stop()
        node.start()
        await asyncio.sleep(0.1)  # the loop sees the connection close
        assert await aread_all(url(node)) == BODY
        close_idle_connections()

    asyncio.run(main())


def test_async_a_kept_connection_dropped_at_the_next_request_is_retried_on_a_fresh_one() -> None:
    racing = ClosingAfterOneAnswer()

    async def main() -> None:
        for _ in range(3):
            assert await aread_all(f"http://127.0.0.1:{racing.port}/dev1/x.fid") == b"hello"
        close_idle_connections()

    try:
        asyncio.run(main())
        assert racing.connections == 3
    finally:
        racing.stop()


class AnsweringNode(LoopbackServer):
    """A node answering every request on every connection with ``answer`` (kept alive)."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}/dev1/x.fid"

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # stop() closes the connections under it
            while conn.recv(65536):
                conn.sendall(self.answer)


@pytest.fixture
def overlong() -> Iterator[AnsweringNode]:
    """A node that sends five bytes more than the Content-Length it announces."""
    node = AnsweringNode(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA")
    yield node
    node.stop()


def test_a_connection_whose_node_sent_more_than_its_body_is_not_reused(overlong: AnsweringNode) -> None:
    pool = NodePool()
    for _ in range(3):
        with open_replica([overlong.url], pool=pool) as replica:
            assert b"".join(replica.iter_chunks()) == b"hello"
    assert overlong.connections == 3  # the extra bytes would have been read as the next answer


def test_async_a_connection_whose_node_sent_more_than_its_body_is_not_reused(overlong: AnsweringNode) -> None:
    async def main() -> None:
        for _ in range(3):
            assert await aread_all(overlong.url) == b"hello"
        close_idle_connections()

    asyncio.run(main())
    assert overlong.connections == 3


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_chunked_answer_is_refused_and_the_next_replica_serves(node: StorageNode, flavour: str) -> None:
    chunked = AnsweringNode(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    try:
        if flavour == "sync":
            with open_replica([chunked.url, url(node)], pool=NodePool()) as replica:
                assert (replica.url, b"".join(replica.iter_chunks())) == (url(node), BODY)
        else:
            async def main() -> bytes:
                async with await async_open_replica([chunked.url, url(node)]) as replica:
                    assert replica.url == url(node)
                    body = b"".join([chunk async for chunk in replica.chunks()])
                close_idle_connections()
                return body

            assert asyncio.run(main()) == BODY
    finally:
        chunked.stop()


class ShortNode(LoopbackServer):
    """A node that announces ten bytes, sends five and hangs up."""

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # stop() closes the connections under it
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")


def test_reads_into_buffers_of_any_size_give_the_body_and_a_short_one_raises(node: StorageNode) -> None:
    pool = NodePool()
    with open_replica([url(node)], pool=pool) as replica:
        parts = []
        while part := replica.read(1000):  # RawIOBase.read: readinto, as Django's File reads
            parts.append(part)
    assert b"".join(parts) == BODY
    assert settle(node.port, 1) == 1  # read to its end through readinto: kept
    pool.close()
    short = ShortNode()
    try:
        with open_replica([f"http://127.0.0.1:{short.port}/dev1/x.fid"], pool=pool) as replica:
            assert replica.read(3) == b"hel"
            with pytest.raises(StorageError, match="ended 5 bytes short"):
                while replica.read(3):
                    pass
    finally:
        short.stop()


def test_a_kept_connection_answered_wrongly_is_not_asked_again_on_a_new_one() -> None:
    """A kept connection that fails before any answer is replaced by a fresh one (the node may
    have closed it meanwhile); one the node answered wrongly is that node's answer."""
    answers = iter([honest(b"GET"), b"HTTP/1.0 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"])
    node = KeptAliveNode(lambda head: next(answers, b""))
    pool = NodePool()
    try:
        with open_replica([node.url(9)], pool=pool) as replica:
            assert replica.read() == TEN
        with pytest.raises(StorageError, match="Transfer-Encoding"):
            open_replica([node.url(9)], pool=pool)
        assert len(node.requests) == 2 and node.connections == 1
    finally:
        pool.close()
        node.stop()


def test_a_connection_the_node_says_it_closes_is_not_asked_again() -> None:
    """RFC 9112 9.3: ``close`` among the connection options ends the connection whatever else is
    listed. An HTTP/1.0 answer with ``Connection: keep-alive, close`` was kept, and the next
    request sent on a connection the node was closing (here it keeps it: counted)."""
    node = KeptAliveNode(lambda head: b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 10\r\n\r\n"
                         + TEN)
    pool = NodePool()

    async def read_twice() -> list[bytes]:
        try:
            return [await aread_all(node.url(9)) for _ in range(2)]
        finally:
            close_idle_connections()

    try:
        for _ in range(2):
            with open_replica([node.url(9)], pool=pool) as replica:
                assert replica.read() == TEN
        assert asyncio.run(read_twice()) == [TEN, TEN]
        assert node.connections == 4
    finally:
        pool.close()
        node.stop()


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 099 Low", b"HTTP/1.1 000 None", b"HTTP/1.1 600 High",
                                         b"HTTP/1.Z 200 OK", b"HTTP/1.10 200 OK", b"HTTP/1.\xb2 200 OK"])
def test_a_status_line_of_no_http_1_answer_is_refused(status_line: bytes) -> None:
    """RFC 9112 4 and RFC 9110 15: ``HTTP/1.`` and one digit, then a code from 100 to 599. A code
    below 100 was read past as a 1xx, and the answer after it taken for the node's."""
    node = KeptAliveNode(lambda head: status_line + b"\r\n\r\n" + honest(head))
    try:
        with pytest.raises(StorageError, match="no HTTP/1.x status line"):
            open_replica([node.url(9)], pool=NodePool())
        with pytest.raises(StorageError, match="no HTTP/1.x status line"):
            asyncio.run(aread_all(node.url(9)))
    finally:
        node.stop()


def test_a_seekable_body_reads_elsewhere_with_a_range_and_goes_on_from_the_next_replica() -> None:
    cut = KeptAliveNode(lambda head: b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n0123", closes=True)
    whole = KeptAliveNode(honest)
    try:
        body = SeekableBody([cut.url(1), whole.url(1)], timeout=5)
        assert (body.length, body.read(10)) == (10, b"0123")
        assert body.read(10) == b"456789"  # cut after 4 bytes: the rest from the next replica, from there
        assert body.seek(2) == 2 and body.read(3) == b"234"
        assert body.seek(-1, io.SEEK_END) == 9 and body.read() == b"9" and body.read() == b""
        ranges = [head.split(b"Range: ")[1].split(b"\r\n")[0] for head in whole.requests]
        assert ranges == [b"bytes=4-9", b"bytes=2-9", b"bytes=9-9"]
        body.close()
        with pytest.raises(ValueError, match="closed file"):
            body.read(1)  # not a new connection
        assert len(whole.requests) == 3
    finally:
        cut.stop()
        whole.stop()
