"""Timeouts are deadlines: a tracker or storage node that trickles its answer a byte at a time
costs no more than a silent one. Real loopback sockets, servers scripted byte by byte."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest
from wiretools import ScriptedTracker, LoopbackServer, ok

from mogile_middleware import Client, UploadError
from mogile_middleware.exceptions import OutcomeUnknownError, StorageError, TrackerUnavailableError
from mogile_middleware.storage import PutStream, open_replica
from mogile_middleware.tracker import TrackerPool

#: Seconds between two bytes of a trickled answer.
DRIP = 0.2

#: What a scripted server does on a connection with its nth request (from 1, over all connections).
Behaviour = Callable[[socket.socket, int], None]


def drip(conn: socket.socket, data: bytes, count: int | None = None) -> None:
    """Send the first ``count`` bytes of ``data`` (all by default), one every :data:`DRIP` seconds."""
    for byte in data[:count]:
        conn.sendall(bytes([byte]))
        time.sleep(DRIP)


class ScriptedServer(LoopbackServer):
    """Reads requests (a line for a tracker, a head for HTTP) and answers with ``behaviour``."""

    def __init__(self, behaviour: Behaviour, *, http: bool = False) -> None:
        self.behaviour = behaviour
        self.http = http
        self.requests = 0
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn.makefile("rb") as reader:
                while self._read_request(reader):
                    self.requests += 1
                    self.behaviour(conn, self.requests)
        except OSError:
            pass  # the client gave up, or the test stopped the server
        finally:
            conn.close()

    def _read_request(self, reader) -> bool:
        line = reader.readline()
        while self.http and line not in (b"\r\n", b""):
            line = reader.readline()
        return bool(line)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dev1/0/000/000/0000000001.fid"


@pytest.fixture
def servers() -> Iterator[Callable[..., ScriptedServer]]:
    """Starts :class:`ScriptedServer` instances and stops them all after the test."""
    started: list[LoopbackServer] = []

    def start(behaviour: Behaviour, **options: bool) -> ScriptedServer:
        server = ScriptedServer(behaviour, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


REPLY = ok(b"")


def answer_first_then_drip(conn: socket.socket, n: int) -> None:
    """The first request of a connection is answered at once, later ones a byte at a time."""
    if n == 1:
        conn.sendall(REPLY)
    else:
        drip(conn, REPLY)


@pytest.mark.parametrize(
    "warm_up", [pytest.param(False, id="new-connection"), pytest.param(True, id="kept-open-connection")]
)
def test_a_dripping_tracker_costs_the_io_timeout_not_more(servers, warm_up: bool) -> None:
    tracker = servers(answer_first_then_drip if warm_up else lambda conn, n: drip(conn, REPLY))
    client = Client("d", [tracker.tracker], io_timeout=1)
    if warm_up:
        assert client.get_paths("k")  # the connection is kept, and passes the stale check next time
    started = time.monotonic()
    with pytest.raises(TrackerUnavailableError, match="timed out|no reply within 1s"):
        client.get_paths("k")
    assert 0.9 <= time.monotonic() - started < 2.5
    assert tracker.connections == 1  # the deadline passed: no retry on a new connection


def test_the_retry_on_a_new_connection_gets_only_what_is_left_of_the_deadline(servers) -> None:
    def script(conn: socket.socket, n: int) -> None:
        if n == 1:
            conn.sendall(REPLY)
        elif n == 2:  # on the kept-open connection: a trickle, then a hang-up at 0.8 s
            drip(conn, REPLY, 4)
            conn.shutdown(socket.SHUT_RDWR)
        else:  # on the new connection: a trickle that would go on for 14 s
            drip(conn, REPLY)

    tracker = servers(script)
    client = Client("d", [tracker.tracker], io_timeout=1)
    assert client.get_paths("k")
    started = time.monotonic()
    with pytest.raises(TrackerUnavailableError):
        client.get_paths("k")
    elapsed = time.monotonic() - started
    assert tracker.connections == 2  # retried on a new connection...
    assert 0.9 <= elapsed < 1.5  # ...within the first deadline, not a fresh one (1.8 s)


def test_the_second_tracker_answers_when_the_first_drips(servers) -> None:
    dripping = servers(lambda conn, n: drip(conn, REPLY))
    good = ScriptedTracker(ok)
    try:
        client = Client("d", [dripping.tracker, good.tracker], io_timeout=1)
        started = time.monotonic()
        assert client.get_paths("k") == ["http://127.0.0.1:1/dev1/0/000/000/0000000001.fid"]
        assert time.monotonic() - started < 2.5
        started = time.monotonic()
        assert client.get_paths("k")  # the dripping tracker is now skipped
        assert time.monotonic() - started < 0.5
        assert len(good.requests) == 2
    finally:
        good.stop()


def test_a_command_not_safe_to_repeat_is_an_unknown_outcome_at_the_deadline(servers) -> None:
    tracker = servers(lambda conn, n: drip(conn, REPLY))
    pool = TrackerPool([tracker.tracker], io_timeout=1)
    started = time.monotonic()
    with pytest.raises(OutcomeUnknownError, match="may or may not have been carried out"):
        pool.request("delete", {"domain": "d", "key": "k"})
    assert 0.9 <= time.monotonic() - started < 2.5
    assert tracker.requests == 1


# -- storage nodes ----------------------------------------------------------------------------

BODY = b"hello, slowly"
RESPONSE_HEAD = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n"


def dripping_node(conn: socket.socket, n: int) -> None:
    drip(conn, RESPONSE_HEAD % len(BODY) + BODY)


def good_node(conn: socket.socket, n: int) -> None:
    conn.sendall(RESPONSE_HEAD % len(BODY) + BODY)
    conn.shutdown(socket.SHUT_RDWR)


def test_a_node_dripping_its_head_costs_the_timeout_then_the_next_replica_answers(servers) -> None:
    dripping, good = servers(dripping_node, http=True), servers(good_node, http=True)
    started = time.monotonic()
    with open_replica([dripping.url, good.url], timeout=1) as replica:
        assert 0.9 <= time.monotonic() - started < 2.5
        assert replica.url == good.url
        assert replica.read() == BODY


def test_a_node_dripping_its_head_alone_is_a_storage_error_at_the_deadline(servers) -> None:
    dripping = servers(dripping_node, http=True)
    started = time.monotonic()
    with pytest.raises(StorageError, match="timed out"):
        open_replica([dripping.url], timeout=1)
    assert 0.9 <= time.monotonic() - started < 2.5


def test_a_slow_but_live_body_is_read_to_the_end(servers) -> None:
    chunks = [bytes([65 + n]) * 1000 for n in range(7)]

    def slow_body(conn: socket.socket, n: int) -> None:
        conn.sendall(RESPONSE_HEAD % sum(map(len, chunks)))
        for chunk in chunks:  # one every 0.3 s: 2.1 s in all, each well within the timeout
            time.sleep(0.3)
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_RDWR)

    node = servers(slow_body, http=True)
    started = time.monotonic()
    with open_replica([node.url], timeout=1) as replica:
        assert b"".join(replica.iter_chunks()) == b"".join(chunks)
    assert time.monotonic() - started >= 2  # longer than the timeout, and not cut


# -- bad replica URLs -------------------------------------------------------------------------

BAD_URLS = [
    pytest.param("http://127.0.0.1:99999/dev1/0/000/000/0000000001.fid", id="port-out-of-range"),
    pytest.param("http://127.0.0.1:abc/dev1/0/000/000/0000000001.fid", id="port-not-a-number"),
    pytest.param("http://[::1/dev1/0/000/000/0000000001.fid", id="unclosed-ipv6-bracket"),
    pytest.param("http://" + "a" * 64 + "/dev1/0/000/000/0000000001.fid", id="host-label-too-long"),
]


def test_bad_replica_urls_are_skipped_for_a_good_one(servers) -> None:
    good = servers(good_node, http=True)
    bad = [param.values[0] for param in BAD_URLS]
    with open_replica([*bad, good.url], timeout=1) as replica:
        assert replica.url == good.url


def test_only_bad_replica_urls_are_a_storage_error() -> None:
    bad = [param.values[0] for param in BAD_URLS]
    with pytest.raises(StorageError, match="no replica answered") as raised:
        open_replica(bad, timeout=1)
    assert all(url in str(raised.value) for url in bad)


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_bad_put_url_is_a_storage_error(url: str) -> None:
    with pytest.raises(StorageError):
        PutStream(url, length=1, timeout=1)


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_bad_create_open_path_is_an_upload_error(url: str) -> None:
    def script(line: bytes) -> bytes:
        if line.startswith(b"create_open"):
            return f"OK fid=7&devid=1&path={quote(url, safe='')}\r\n".encode()
        return b"OK \r\n"

    tracker = ScriptedTracker(script)
    try:
        with pytest.raises(UploadError, match="no storage node took 'k'"):
            Client("d", [tracker.tracker]).store_content("k", b"data")
    finally:
        tracker.stop()


def _head_then_silent(conn: socket.socket, n: int) -> None:
    conn.sendall(RESPONSE_HEAD % 1000 + b"x" * 100)
    time.sleep(3)


def _head_then_reset(conn: socket.socket, n: int) -> None:
    conn.sendall(RESPONSE_HEAD % 1000 + b"x" * 100)
    time.sleep(0.2)  # the part sent is read first
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # closed at once: a reset
    raise ConnectionAbortedError("the server closes the connection")


@pytest.mark.parametrize("node, reason", [(_head_then_silent, "sent nothing for 1s"),
                                          (_head_then_reset, "dropped the connection")])
@pytest.mark.parametrize("read", ["iter_chunks", "read"])
def test_a_node_failing_midway_through_a_body_is_a_storage_error_naming_it(servers, node, reason: str,
                                                                            read: str) -> None:
    server = servers(node, http=True)
    with open_replica([server.url], timeout=1) as replica, pytest.raises(StorageError, match=reason) as raised:
        b"".join(replica.iter_chunks()) if read == "iter_chunks" else replica.read()
    assert raised.value.url == server.url
