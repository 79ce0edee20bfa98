"""The development MogileFS under hostile clients: regex prefixes, half-sent lines, idle and surplus connections."""

from __future__ import annotations

import logging
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import pytest
from integration._wire_client import LineClient, eventually, read_http_reply, upload

from mogile_middleware.devserver import DevMogileFS, StorageNode
from mogile_middleware.devserver.netutil import STOP_SECONDS
from mogile_middleware.protocol import encode_request

DOMAIN = "testdom"
CLASSES = {"avatar": 2, "thumb": 1}
#: Threads a server may have beyond one per connection (its accept loop, one ending thread or two).
SPARE_THREADS = 5

MogileFactory = Callable[..., DevMogileFS]


@pytest.fixture
def mogile_with(tmp_path: Path) -> Iterator[MogileFactory]:
    """Starts a DevMogileFS with the given tracker limits; stopped after the test."""
    with ExitStack() as stack:

        def start(**limits: Any) -> DevMogileFS:
            return stack.enter_context(DevMogileFS(tmp_path / "mogdata", domains={DOMAIN: CLASSES}, **limits))

        yield start


def open_sockets(
    address: tuple[str, int], count: int, payload: bytes = b"", pause: float = 0.0
) -> dict[socket.socket, float]:
    """``count`` connections to ``address``, each having sent ``payload``, with when it was sent.

    ``pause`` between connections keeps a small listen backlog from overflowing (a dropped SYN
    is retried only a second later).
    """
    sockets = {}
    for _ in range(count):
        sock = socket.create_connection(address, timeout=5)
        sockets[sock] = time.monotonic()
        sock.sendall(payload)
        time.sleep(pause)
    return sockets


def closing_times(
    sockets: Iterable[socket.socket], timeout: float, enough: int | None = None
) -> dict[socket.socket, float]:
    """When the server closed each socket it closed within ``timeout`` (or until ``enough`` are closed).

    Bytes arriving before the end are ignored.
    """
    open_, closed = list(sockets), {}
    deadline = time.monotonic() + timeout
    while open_ and len(closed) != enough and (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select(open_, [], [], remaining)
        for sock in readable:
            try:
                ended = not sock.recv(65536)
            except ConnectionResetError:
                ended = True
            if ended:
                open_.remove(sock)
                closed[sock] = time.monotonic()
    return closed


def close_all(sockets: Iterable[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


# -- list_keys: the prefix is literal -----------------------------------------------------------


@pytest.fixture
def tracker_process(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A dev MogileFS in a child process: a regex stalling the tracker cannot stall the test too."""
    command = [sys.executable, "-m", "mogile_middleware", "devserver", "--port", "0", "--storage-ports", "0"]
    command += ["--data", str(tmp_path / "mogdata"), "--domain", DOMAIN, "--class", "avatar=1", "--class", "thumb=1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 20)
        first = process.stdout.readline().decode() if ready else ""
        assert first.startswith("tracker "), first
        host, _, port = first.split()[1].rpartition(":")
        yield host, int(port)
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def test_regex_prefix_answers_at_once(tracker_process: tuple[str, int]) -> None:
    hostile = encode_request("list_keys", {"domain": DOMAIN, "prefix": "(a+)+$", "after": "a" * 40 + "!"})
    with LineClient(tracker_process, timeout=1) as attacker, LineClient(tracker_process, timeout=1) as other:
        started = time.monotonic()
        attacker.send(hostile)
        assert other.ask("noop") == b"OK \r\n"
        reply = attacker.read_line()
        assert time.monotonic() - started < 1
    assert reply.split(b" ")[:2] in ([b"ERR", b"after_mismatch"], [b"ERR", b"none_match"]), reply


def test_regex_characters_in_a_prefix_are_literal(mogile_with: MogileFactory) -> None:
    mogile = mogile_with()
    keys = ["a.c/1", "a.cd", "abc/1", "axc", "[x]/1", "x/1", "xx"]
    with LineClient(mogile.tracker_address) as client:
        for key in keys:
            assert upload(client, DOMAIN, key, b"data", "thumb").startswith(b"OK"), key

        def listed(prefix: str, after: str = "") -> set[str]:
            reply = client.ok("list_keys", domain=DOMAIN, prefix=prefix, **({"after": after} if after else {}))
            return {reply[f"key_{number}"] for number in range(1, int(reply["key_count"]) + 1)}

        assert listed("a.c") == {"a.c/1", "a.cd"}
        assert listed("[x]") == {"[x]/1"}
        assert listed("a.c", after="a.c/1") == {"a.cd"}
        # A regex would match these "after" values; literally they do not start with the prefix.
        assert client.call("list_keys", domain=DOMAIN, prefix="a.c", after="abc").startswith(b"ERR after_mismatch ")
        assert client.call("list_keys", domain=DOMAIN, prefix="[x]", after="xx").startswith(b"ERR after_mismatch ")


# -- tracker connections: timeouts and the bound ------------------------------------------------


def test_half_sent_lines_are_cut_after_the_line_timeout(mogile_with: MogileFactory) -> None:
    mogile = mogile_with(tracker_line_timeout=0.5, tracker_idle_timeout=30, tracker_max_connections=400)
    threads_before = threading.active_count()
    sockets = open_sockets(mogile.tracker_address, 300, b"noop domain=te")
    try:
        closed = closing_times(sockets, 10)
    finally:
        close_all(sockets)
    assert len(closed) == 300
    assert all(0.5 <= closed[sock] - sent < 3 for sock, sent in sockets.items())
    threads = eventually(threading.active_count, lambda count: count <= threads_before + 2, timeout=3)
    assert threads <= threads_before + 2
    with LineClient(mogile.tracker_address) as client:
        assert client.ask("noop") == b"OK \r\n"


def test_a_line_sent_in_pieces_within_the_line_timeout_is_answered(mogile_with: MogileFactory) -> None:
    mogile = mogile_with(tracker_line_timeout=0.5, tracker_idle_timeout=2)
    with LineClient(mogile.tracker_address) as client:
        client.send(b"no")
        time.sleep(0.2)
        client.send(b"op\r\nno")  # the next line's deadline starts with its first byte
        assert client.read_line() == b"OK \r\n"
        time.sleep(0.2)
        client.send(b"op\r\n")
        assert client.read_line() == b"OK \r\n"


def test_an_idle_connection_is_closed_after_the_idle_timeout(mogile_with: MogileFactory) -> None:
    mogile = mogile_with(tracker_idle_timeout=1, tracker_line_timeout=0.5)
    with LineClient(mogile.tracker_address) as client:
        assert client.ask("noop") == b"OK \r\n"
        answered = time.monotonic()
        assert client.silent_for(0.6)  # longer than the line timeout: an idle connection is not cut by it
        assert client.closed_within(3)
        assert 0.9 < time.monotonic() - answered < 3


def test_an_idle_connection_is_kept_open_as_mogilefsd_keeps_it(mogile_with: MogileFactory) -> None:
    """It was closed after a minute without a request: MogileFS::Client, which keeps its connection
    between requests, died on the next one ("socket closed on read")."""
    mogile = mogile_with(tracker_line_timeout=0.3)
    assert mogile.tracker.idle_timeout is None
    with LineClient(mogile.tracker_address) as client:
        assert client.ask("noop") == b"OK \r\n"
        assert client.silent_for(1.5)
        assert client.ask("noop") == b"OK \r\n"


def test_a_client_not_reading_its_replies_is_cut_after_the_line_timeout(mogile_with: MogileFactory) -> None:
    mogile = mogile_with(tracker_line_timeout=0.5)
    threads_before = threading.active_count()
    with socket.create_connection(mogile.tracker_address, timeout=0.2) as sock:
        with suppress(OSError):  # until the tracker stops reading: it waits to write a reply
            for _ in range(10_000):
                sock.sendall(b"get_domains\r\n" * 100)
        stuck = time.monotonic()
        threads = eventually(threading.active_count, lambda count: count <= threads_before, timeout=5)
        assert threads <= threads_before and time.monotonic() - stuck < 3  # its thread gone, unread


def test_connections_beyond_the_bound_are_closed_at_once(mogile_with: MogileFactory) -> None:
    mogile = mogile_with(tracker_max_connections=20, tracker_idle_timeout=30, tracker_line_timeout=30)
    threads_before = threading.active_count()
    sockets = open_sockets(mogile.tracker_address, 60)
    try:
        closed = closing_times(sockets, 3, enough=40)
        assert len(closed) == 40
        assert threading.active_count() <= threads_before + 20 + SPARE_THREADS
        served = [sock for sock in sockets if sock not in closed]
        for sock in served:  # the connections already served keep working
            sock.sendall(b"noop\r\n")
            assert sock.recv(100) == b"OK \r\n"
        assert closing_times(served, 0.3) == {}
    finally:
        close_all(sockets)
    threads = eventually(threading.active_count, lambda count: count <= threads_before + 2, timeout=3)
    assert threads <= threads_before + 2
    with LineClient(mogile.tracker_address) as client:  # room again
        assert client.ask("noop") == b"OK \r\n"


def test_refused_connections_are_logged_once_in_a_while(mogile_with: MogileFactory,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A line per refusal, written by the accepting thread, filled a stderr nobody read: the
    write that then waited stopped the tracker's accepting, and its stop, for good."""
    mogile = mogile_with(tracker_max_connections=5, tracker_idle_timeout=30, tracker_line_timeout=30)
    sockets = open_sockets(mogile.tracker_address, 5)
    try:
        with caplog.at_level(logging.WARNING, logger="mogile_middleware.devserver.netutil"):
            surplus = open_sockets(mogile.tracker_address, 40)
            assert len(closing_times(surplus, 3, enough=40)) == 40
            close_all(surplus)
    finally:
        close_all(sockets)
    assert [record.getMessage()[:42] for record in caplog.records] == ["5 connections open: refusing ('127.0.0.1',"]


def test_a_stop_returns_while_the_accepting_thread_is_stuck(mogile_with: MogileFactory) -> None:
    """A write that never returns on the thread that accepts (a log line to a full stderr pipe):
    the servers' stop waited for it, and SIGINT and SIGTERM stopped nothing."""
    mogile = mogile_with(tracker_max_connections=1, tracker_idle_timeout=30, tracker_line_timeout=30)
    written = threading.Event()
    released = threading.Event()

    class FullPipe(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written.set()
            released.wait(30)

    stuck = FullPipe()
    netutil = logging.getLogger("mogile_middleware.devserver.netutil")
    netutil.addHandler(stuck)
    sockets = open_sockets(mogile.tracker_address, 2)  # the second one is refused: a line written
    try:
        assert written.wait(5)
        tracker, address = mogile.tracker, mogile.tracker_address
        assert tracker is not None
        start = time.monotonic()
        tracker.stop()
        assert time.monotonic() - start < STOP_SECONDS * 2 + 3
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=1).close()
    finally:
        released.set()
        netutil.removeHandler(stuck)
        close_all(sockets)


def test_a_kept_open_connection_sending_slowly_keeps_working(mogile_with: MogileFactory) -> None:
    mogile = mogile_with(tracker_line_timeout=0.3, tracker_idle_timeout=2)
    with LineClient(mogile.tracker_address) as client:
        for _ in range(4):
            time.sleep(0.5)  # longer than the line timeout, shorter than the idle timeout
            reply = client.call("list_keys", domain=DOMAIN, prefix="none/")
            assert reply.startswith(b"ERR none_match "), reply
            assert client.ask("noop") == b"OK \r\n"


# -- storage nodes: request heads have a deadline -----------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> Iterator[StorageNode]:
    """A storage node with a short head timeout and a longer idle timeout."""
    storage = StorageNode(tmp_path / "stor", idle_timeout=2, head_timeout=0.5)
    storage.start()
    (storage.docroot / "dev1").mkdir()
    (storage.docroot / "dev1" / "file").write_bytes(b"hello")
    try:
        yield storage
    finally:
        storage.stop()


def test_a_half_sent_request_head_is_cut(node: StorageNode) -> None:
    threads_before = threading.active_count()
    sockets = open_sockets(("127.0.0.1", node.port), 20, b"GET /dev1/file HTTP/1.0\r\nHost: x", pause=0.01)
    try:
        closed = closing_times(sockets, 5)
    finally:
        close_all(sockets)
    assert len(closed) == 20
    assert all(0.5 <= closed[sock] - sent < 3 for sock, sent in sockets.items())
    threads = eventually(threading.active_count, lambda count: count <= threads_before + 2, timeout=3)
    assert threads <= threads_before + 2


def test_a_trickled_request_head_is_cut(node: StorageNode) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        started, cut = time.monotonic(), False
        for byte in b"GET /dev1/file HTTP/1.0\r\nX-Slow: " + b"x" * 40:  # one byte every 0.1 s
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                cut = True
            cut = cut or bool(closing_times([sock], 0.1))
            if cut:
                break
        assert cut
        assert 0.5 <= time.monotonic() - started < 2


def test_keep_alive_requests_slower_than_the_head_timeout_work(node: StorageNode) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        pending = b""
        for _ in range(3):
            time.sleep(0.7)  # longer than the head timeout, shorter than the idle timeout
            sock.sendall(b"GET /dev1/file HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            reply, pending = read_http_reply(sock, "GET", pending)
            assert (reply.status, reply.body) == (200, b"hello")
            assert reply.headers["keep-alive"] == "timeout=2, max=100"


def test_a_data_directory_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    """mkdir said "File exists", which reads as no error at all."""
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=f"the data directory is a file: '{tmp_path}/afile'"):
        DevMogileFS(tmp_path / "afile").start()
