"""Injected faults: trackers and storage nodes dying, hanging or talking garbage, under load."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import DOMAIN
from integration._async_facade import LoopThread
from integration.test_asgi import Recorder, http_scope, run
from integration.test_async_storage import ScriptedNode, endless_node, eventually
from integration.test_hostile import call
from integration.test_middleware import BODY, wrapped_app
from wiretools import TEN, CountingRelay, KeptAliveNode, ScriptedTracker, SilentServer, files_tracker, honest

from mogile_middleware import Client, StorageError, UnknownKeyError, UploadError, async_storage, cache, core, nodepool
from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.downnodes import down_nodes
from mogile_middleware.middleware import MogileFSMiddleware
from mogile_middleware.storage import ResumedReplica, Resumption, SeekableBody, open_replica, read_replica
from mogile_middleware.tracker import TrackerConnection


@pytest.fixture
def stored(devmogile: DevMogileFS) -> Client:
    client = Client(DOMAIN, devmogile.trackers)
    for n in range(20):
        client.store_content(f"load/{n}", BODY + str(n).encode(), cls="avatar")
    return client


def test_first_tracker_killed_during_load_fails_no_request(devmogile: DevMogileFS, stored: Client) -> None:
    first, second = CountingRelay(devmogile.tracker_address), CountingRelay(devmogile.tracker_address)
    try:
        client = Client(DOMAIN, [first.tracker, second.tracker], connect_timeout=0.5)
        # Paths cached for 10 ms only: nearly every request asks a tracker.
        app = MogileFSMiddleware(wrapped_app, client=client, reproxy="perlbal", path_cache_seconds=0.01)
        statuses: list[int] = []

        def request(n: int) -> None:
            if n == 150:
                first.stop()  # killed midway, with connections open
            statuses.append(call(app, "GET", f"/mogilefs/load/{n % 20}", {})[0])
            time.sleep(0.002)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(request, range(400), timeout=60))
        assert statuses == [200] * 400
        assert second.connections >= 1
    finally:
        first.stop()
        second.stop()


def test_a_tracker_that_never_answers_costs_the_io_timeout(devmogile: DevMogileFS, stored: Client) -> None:
    silent = ScriptedTracker(lambda line: b"")
    try:
        app = MogileFSMiddleware(wrapped_app, client=Client(DOMAIN, [silent.tracker], io_timeout=0.3))
        for n in range(3):
            started = time.monotonic()
            status, headers, _ = call(app, "GET", f"/mogilefs/load/{n}", {})
            assert status == 503 and dict(headers)["Retry-After"] == "5"
            assert time.monotonic() - started < 1.5
    finally:
        silent.stop()


def test_every_tracker_down_answers_503_within_the_connect_timeout(devmogile: DevMogileFS, stored: Client) -> None:
    app = MogileFSMiddleware(wrapped_app, client=Client(DOMAIN, devmogile.trackers, connect_timeout=0.5))
    devmogile.stop_tracker()
    for n in range(5):
        started = time.monotonic()
        assert call(app, "GET", f"/mogilefs/load/{n}", {})[0] == 503
        assert time.monotonic() - started < 0.6


#: A process out of file descriptors asks the tracker, then again once it has them back.
_SHORT_OF_DESCRIPTORS = """
import asyncio, os, resource, sys
from mogile_middleware import AsyncClient, Client, TrackerUnavailableError

def short_then_back(ask):
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    try:
        ask()
        short = "answered"
    except TrackerUnavailableError as error:
        short = str(error)
    finally:
        for fd in held:
            os.close(fd)
    try:
        return short, f"{len(ask())} paths"
    except TrackerUnavailableError as error:
        return short, str(error)

domain, tracker = sys.argv[1:]
client, loop, async_client = Client(domain, [tracker]), asyncio.new_event_loop(), AsyncClient(domain, [tracker])
print(*short_then_back(lambda: client.get_paths("load/0")), sep="\\n")
print(*short_then_back(lambda: loop.run_until_complete(async_client.get_paths("load/0"))), sep="\\n")
"""


@pytest.mark.parametrize("named", [False, True], ids=["by-address", "by-name"])
def test_a_process_out_of_file_descriptors_marks_no_tracker_dead(devmogile: DevMogileFS, stored: Client,
                                                                 named: bool) -> None:
    """Its failure is its own: the tracker was skipped for ``dead_seconds`` after the shortage
    ended ("every tracker is marked dead"), and every request of the worker failed meanwhile. A
    tracker's name then fails to resolve, with a resolver's error. The first lookup of a process
    failed to load the ``idna`` codec (its module a file to open), which could leave it unknown."""
    host, port = devmogile.tracker_address
    tracker = f"{'localhost' if named else host}:{port}"
    process = subprocess.run([sys.executable, "-c", _SHORT_OF_DESCRIPTORS, DOMAIN, tracker],
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    assert len(lines) == 4
    for short, after in (lines[:2], lines[2:]):
        assert short.startswith(f"no tracker answered: {tracker}: ")
        if not named:  # no file of Python's own named
            assert short == f"no tracker answered: {tracker}: [Errno 24] Too many open files"
        assert after == "2 paths"


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_a_process_out_of_file_descriptors_for_the_nodes_answers_503_not_502(
        devmogile: DevMogileFS, stored: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        flavour: str) -> None:
    """No node failed, so no 502 ("the upstream answered wrongly"): the worker could open no
    connection to any, and says when to come back, as when it can reach no tracker."""
    options = {"domain": DOMAIN, "trackers": devmogile.trackers}
    wsgi, asgi = MogileFSMiddleware(wrapped_app, **options), ASGIMiddleware(Recorder(), **options)
    paths = stored.get_paths("load/0")
    nodes = {f"127.0.0.1:{url.split(':')[2].split('/')[0]}" for url in paths}
    shortage = OSError(errno.EMFILE, "Too many open files")

    def get() -> tuple[int, dict[str, str]]:
        if flavour == "wsgi":
            status, headers, _ = call(wsgi, "GET", "/mogilefs/load/0", {})
            return status, dict(headers)
        sent = run(asgi, http_scope("/mogilefs/load/0"), [])
        return sent[0]["status"], {name.decode(): value.decode() for name, value in sent[0]["headers"]}

    assert get()[0] == 200  # the paths kept, the tracker connection idle
    nodepool.nodes.close()  # no idle node connection to take
    connect, create_connection = async_storage.connect, socket.create_connection

    async def connect_short(host: str, port: int, timeout: float | None = None) -> socket.socket:
        if f"{host}:{port}" in nodes:
            raise shortage
        return await connect(host, port, timeout)

    def create_connection_short(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        if f"{address[0]}:{address[1]}" in nodes:
            raise shortage
        return create_connection(address, *args, **kwargs)

    monkeypatch.setattr(async_storage, "connect", connect_short)
    monkeypatch.setattr(socket, "create_connection", create_connection_short)
    status, headers = get()
    assert (status, headers["Retry-After" if flavour == "wsgi" else "retry-after"]) == (503, "5")
    assert "Too many open files" in caplog.text
    monkeypatch.undo()
    assert get()[0] == 200  # and nothing marked down meanwhile


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_an_outage_of_the_trackers_is_logged_once_per_interval_not_per_request(
        devmogile: DevMogileFS, stored: Client, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:
    """Every request fails while no tracker answers: the first is logged at once, the next ones
    only once the interval has passed, in one line counting those left out."""
    monkeypatch.setattr(core, "OUTAGE_LOG_INTERVAL", 0.5)
    options = {"domain": DOMAIN, "trackers": devmogile.trackers, "connect_timeout": 0.2}
    if flavour == "wsgi":
        app = MogileFSMiddleware(wrapped_app, **options)

        def status(n: int) -> int:
            return call(app, "GET", f"/mogilefs/load/{n}", {})[0]
    else:
        asgi = ASGIMiddleware(wrapped_app, **options)

        def status(n: int) -> int:
            return run(asgi, http_scope(f"/mogilefs/load/{n}"), [])[0]["status"]
    devmogile.stop_tracker()
    caplog.set_level(logging.ERROR, logger="mogile_middleware")
    assert [status(n) for n in range(5)] == [503] * 5
    time.sleep(0.6)
    assert status(5) == 503
    lines = [record.getMessage() for record in caplog.records if "no tracker answered" in record.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("no tracker answered for 'load/0'") and "more requests" not in lines[0]
    assert lines[1].startswith("no tracker answered for 'load/5'")
    assert re.search(r"\(4 more requests in the \d+ s since the last line like this\)$", lines[1])


def test_paths_served_stale_are_logged_once_per_interval_not_per_key(
        devmogile: DevMogileFS, stored: Client, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """An outage serves every cached key stale: one line at once, the next once the interval has
    passed, counting those left out (it was a line per key, thousands per worker)."""
    monkeypatch.setattr(cache, "STALE_WARNING_INTERVAL", 0.5)
    app = MogileFSMiddleware(wrapped_app, domain=DOMAIN, trackers=devmogile.trackers, path_cache_seconds=0.2,
                             connect_timeout=0.2)
    for n in range(6):
        assert call(app, "GET", f"/mogilefs/load/{n}", {})[0] == 200
    devmogile.stop_tracker()
    time.sleep(0.3)  # past the paths' time: served stale
    caplog.set_level(logging.WARNING, logger="mogile_middleware")
    assert [call(app, "GET", f"/mogilefs/load/{n}", {})[0] for n in range(5)] == [200] * 5
    time.sleep(0.6)
    assert call(app, "GET", "/mogilefs/load/5", {})[0] == 200
    lines = [record.getMessage() for record in caplog.records if "serving stale paths" in record.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("serving stale paths for 'load/0'") and "more requests" not in lines[0]
    assert lines[1].startswith("serving stale paths for 'load/5'")
    assert re.search(r"\(4 more requests in the \d+ s since the last line like this\)$", lines[1])


#: What a tracker's garbage is answered with: no answer at all (the next tracker is asked, and
#: with none left, a 503), or an answer listing no replica that can be read (a 502).
_UNANSWERED = (503, b"503 Service Unavailable\nNo tracker answered.\n")
_NO_USABLE_REPLICA = (502, b"502 Bad Gateway\nThe trackers list no usable replica of this file.\n")


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        pytest.param(b"OK paths=2&path1=http://x", _UNANSWERED, id="truncated-line"),
        pytest.param(b"HELLO\r\n", _UNANSWERED, id="unknown-reply"),
        pytest.param(b"OK " + b"a" * (5 * 1024 * 1024) + b"\r\n", _UNANSWERED, id="oversized-line"),
        pytest.param(b"OK paths=two\r\n", _UNANSWERED, id="bad-number"),
        pytest.param(b"OK paths=%C2%B2\r\n", _UNANSWERED, id="superscript-digit"),  # isdigit(), but not for int()
        pytest.param(b"OK paths=" + b"9" * 5000 + b"\r\n", _UNANSWERED, id="5000-digit-number"),  # past int()'s 4300
        pytest.param(b"OK paths=1&path1=http://127.0.0.1:1/dev1/" + b"1" * 5000 + b".fid\r\n", _NO_USABLE_REPLICA,
                     id="5000-digit-fid"),
        pytest.param(b"OK paths=1\r\n", _UNANSWERED, id="missing-path"),
        pytest.param(None, _UNANSWERED, id="disconnect"),
    ],
)
def test_garbage_from_the_tracker_is_a_502_or_503_never_a_500(reply: bytes | None, answer: tuple[int, bytes]) -> None:
    tracker = ScriptedTracker(lambda line: reply)
    try:
        app = MogileFSMiddleware(wrapped_app, client=Client(DOMAIN, [tracker.tracker], io_timeout=1))
        status, _, body = call(app, "GET", "/mogilefs/k", {})
        assert (status, body) == answer
    finally:
        tracker.stop()


def test_a_tracker_that_misspeaks_is_passed_over_and_cached_paths_outlive_it(devmogile: DevMogileFS,
                                                                             stored: Client) -> None:
    garbled = ScriptedTracker(lambda line: b"HTTP/1.1 400 Bad Request\r\n")  # a web server on its port
    relay = CountingRelay(devmogile.tracker_address)
    try:
        both = MogileFSMiddleware(wrapped_app, client=Client(DOMAIN, [garbled.tracker, *devmogile.trackers]))
        assert call(both, "GET", "/mogilefs/load/1", {})[:3:2] == (200, BODY + b"1")
        # The only tracker starts to misspeak once the paths are cached: they are served while stale.
        alone = MogileFSMiddleware(wrapped_app, client=Client(DOMAIN, [relay.tracker]), path_cache_seconds=0.05)
        assert call(alone, "GET", "/mogilefs/load/2", {})[0] == 200
        relay.target = garbled.address
        relay.drop_connections()
        time.sleep(0.1)
        assert call(alone, "GET", "/mogilefs/load/2", {})[:3:2] == (200, BODY + b"2")
        assert call(alone, "GET", "/mogilefs/load/3", {})[0] == 503  # never cached: no answer to give
    finally:
        garbled.stop()
        relay.stop()


def test_paths_whose_node_failed_once_in_an_outage_are_served_once_it_is_back(devmogile: DevMogileFS) -> None:
    """While no tracker answers, a storage node that fails one request (restarting) costs that
    request a 503; the next ones, once it is back, are served from the paths still cached."""
    Client(DOMAIN, devmogile.trackers).store_content("restarting.txt", BODY, cls="thumb")
    app = MogileFSMiddleware(wrapped_app, client=Client(DOMAIN, devmogile.trackers, io_timeout=1))
    assert call(app, "GET", "/mogilefs/restarting.txt", {})[::2] == (200, BODY)
    [url] = Client(DOMAIN, devmogile.trackers).get_paths("restarting.txt")
    [node] = [node for node in devmogile.nodes if f":{node.port}/" in url]
    devmogile.stop_tracker()
    node.stop()
    assert call(app, "GET", "/mogilefs/restarting.txt", {})[0] == 503
    node.start()
    down_nodes.clear()  # its refusal is not held against it: as once the down time has passed
    assert call(app, "GET", "/mogilefs/restarting.txt", {})[::2] == (200, BODY)


class _HalfBody(BaseHTTPRequestHandler):
    """A storage node that announces a length, sends part of it and hangs up."""

    def do_HEAD(self) -> None:  # noqa: N802
        self._headers()

    def do_GET(self) -> None:  # noqa: N802
        self._headers()
        self.wfile.write(b"x" * 70000)
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)

    def _headers(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_key_listed_without_replicas_amid_an_overwrite_is_asked_again(devmogile: DevMogileFS,
                                                                          stored: Client) -> None:
    """A tracker reading a key's fid and then its replicas can find none while another client
    replaces the file: the lookup asks once more before answering 502."""
    upstream = TrackerConnection(devmogile.tracker_address, 1.0, 5.0)
    emptied = [b"OK paths=0\r\n"]  # the answer to the first get_paths only

    def script(line: bytes) -> bytes:
        return emptied.pop() if line.startswith(b"get_paths") and emptied else upstream.roundtrip(line)

    relay = ScriptedTracker(script)
    try:
        app = MogileFSMiddleware(wrapped_app, client=Client(DOMAIN, [relay.tracker]))
        assert call(app, "GET", "/mogilefs/load/4", {})[:3:2] == (200, BODY + b"4")
        assert sum(line.startswith(b"get_paths") for line in relay.requests) == 2
    finally:
        relay.stop()
        upstream.close()


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_a_file_listed_without_replicas_is_logged_as_an_outage_is(caplog: pytest.LogCaptureFixture,
                                                                  flavour: str) -> None:
    """mogilefsd lists no replica of a file whose devices were all marked dead, for good: each
    request for it wrote an ERROR line."""
    tracker = files_tracker({"lost.txt": (7, 10, [])})
    try:
        client = Client(DOMAIN, [tracker.tracker])
        with caplog.at_level(logging.ERROR, logger="mogile_middleware"):
            if flavour == "wsgi":
                app = MogileFSMiddleware(wrapped_app, client=client)
                statuses = [call(app, "GET", "/mogilefs/lost.txt", {})[0] for _ in range(20)]
            else:
                asgi = ASGIMiddleware(wrapped_app, domain=DOMAIN, trackers=[tracker.tracker])
                statuses = [run(asgi, http_scope("/mogilefs/lost.txt"), [])[0]["status"] for _ in range(20)]
    finally:
        tracker.stop()
    assert statuses == [502] * 20
    assert [record.getMessage() for record in caplog.records] == [
        "cannot locate 'lost.txt': StorageError(\"the tracker knows no live replica of 'lost.txt'\")"]


def one_file_tracker(node_port: int, key: str, length: int) -> ScriptedTracker:
    """A tracker that knows one file, ``key`` of ``length`` bytes (fid 9), on the node at ``node_port``."""
    return files_tracker({key: (9, length, [f"http://127.0.0.1:{node_port}/dev1/0/000/000/0000000009.fid"])})


def _cut_short(flavour: str, tracker: str) -> None:
    """GET ``/mogilefs/cut.bin`` of the WSGI or the ASGI middleware over ``tracker``: its body
    raises, so that the server closes the connection short of ``Content-Length``."""
    with pytest.raises(StorageError):
        if flavour == "wsgi":
            call(MogileFSMiddleware(wrapped_app, client=Client(DOMAIN, [tracker])), "GET", "/mogilefs/cut.bin", {})
        else:
            run(ASGIMiddleware(Recorder(), domain=DOMAIN, trackers=[tracker]), http_scope("/mogilefs/cut.bin"), [])


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_a_transfer_cut_midway_ends_short_and_is_logged_with_its_key(caplog: pytest.LogCaptureFixture,
                                                                      flavour: str) -> None:
    node = ThreadingHTTPServer(("127.0.0.1", 0), _HalfBody)
    threading.Thread(target=node.serve_forever, daemon=True).start()
    tracker = one_file_tracker(node.server_address[1], "cut.bin", 1000000)
    try:
        _cut_short(flavour, tracker.tracker)
        assert any("cut midway" in record.getMessage() and "'cut.bin'" in record.getMessage()
                   for record in caplog.records)
    finally:
        tracker.stop()
        node.shutdown()
        node.server_close()


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
@pytest.mark.parametrize("byte_range", [None, (1_000_003, 30_000_000)], ids=["whole", "range"])
@pytest.mark.parametrize("reproxy", [None, "nginx"], ids=["serve-mode", "nginx-asking-again"])
def test_a_client_pausing_longer_than_the_nodes_idle_timeout_still_gets_the_whole_body(
        devmogile: DevMogileFS, flavour: str, byte_range: tuple[int, int] | None, reproxy: str | None) -> None:
    """mogstored closes a connection it could send nothing on for 30 s (seen on 2.73: a reader
    pausing 35 s got 3 MB of 40 MiB): a client that paused (a video player with enough buffered)
    had its download closed short. The rest now comes from the replica again, with a Range. (nginx
    asking again once every replica failed gets the body, of a location looked up anew.)"""
    data = os.urandom(32 * 1024 * 1024)  # more than the kernel's buffers between node and middleware
    Client(DOMAIN, devmogile.trackers).store_content("paused.bin", data, cls="avatar")
    for node in devmogile.nodes:  # as mogstored, with a shorter wait
        node.stop()
        node.idle_timeout = 0.5
        node.start()
    first, last = byte_range or (0, len(data) - 1)
    headers = {"Range": f"bytes={first}-{last}"} if byte_range else {}
    options: dict[str, Any] = {}
    if reproxy:
        options, headers = {"reproxy": reproxy}, {**headers, "X-Reproxy-Failed": "1"}
    if flavour == "wsgi":
        app = MogileFSMiddleware(wrapped_app, client=Client(DOMAIN, devmogile.trackers), **options)
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/mogilefs/paused.bin", "SCRIPT_NAME": "",
                   "QUERY_STRING": "", "REMOTE_ADDR": "127.0.0.1", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
                   **{"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()}}
        result = app(environ, lambda status, response_headers, exc_info=None: None)
        chunks = iter(result)
        try:
            body = next(chunks)
            time.sleep(2)  # the client reads nothing: the node's send waits, then the node closes
            body += b"".join(chunks)
        finally:
            result.close()
    else:
        asgi = ASGIMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers, **options)
        pieces: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                pieces.append(message["body"])
                if len(pieces) == 1:
                    await asyncio.sleep(2)

        async def receive() -> dict[str, Any]:
            return await asyncio.sleep(3600)  # the client stays

        scope = {**http_scope("/mogilefs/paused.bin"),
                 "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()]}
        asyncio.run(asyncio.wait_for(asgi(scope, receive, send), 30))
        body = b"".join(pieces)
    assert len(body) == last - first + 1 and body == data[first:last + 1]


class _CutThenRanges(BaseHTTPRequestHandler):
    """A node that cuts a whole-file GET of its 1,000,000 bytes after 70,000, and answers ranges
    whole; ``ranges`` keeps the Range of each request."""

    ranges: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802
        self.ranges.append(self.headers.get("Range"))
        if self.ranges[-1]:
            first = int(self.ranges[-1].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-999999/1000000")
            self.send_header("Content-Length", str(1000000 - first))
            self.end_headers()
            self.wfile.write(b"y" * (1000000 - first))  # another version by now
            return
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        self.wfile.write(b"x" * 70000)
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_a_transfer_cut_from_urls_naming_no_fid_is_not_resumed(flavour: str) -> None:
    """URLs that name the key alone, not mogstored's .fid paths, may serve another version by the
    next request: the rest asked for with a Range joined two versions under one ETag."""
    _CutThenRanges.ranges = []
    node = ThreadingHTTPServer(("127.0.0.1", 0), _CutThenRanges)
    threading.Thread(target=node.serve_forever, daemon=True).start()
    tracker = files_tracker({"cut.bin": (9, 1000000, [f"http://127.0.0.1:{node.server_address[1]}/files/cut.bin"])})
    try:
        _cut_short(flavour, tracker.tracker)
    finally:
        tracker.stop()
        node.shutdown()
        node.server_close()
    assert _CutThenRanges.ranges == [None]


def _serving(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    node = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=node.serve_forever, daemon=True).start()
    return node


def test_a_seekable_body_cut_from_urls_naming_no_fid_is_not_resumed() -> None:
    """As in serve mode: the rest asked for with a Range joined two versions (the Django
    storage's open(), the command line's cp)."""
    _CutThenRanges.ranges = []
    node = _serving(_CutThenRanges)
    try:
        body = SeekableBody([f"http://127.0.0.1:{node.server_address[1]}/files/cut.bin"], length=1000000, timeout=5)
        with pytest.raises(StorageError, match="cut midway"):
            body.read()
    finally:
        node.shutdown()
        node.server_close()
    assert _CutThenRanges.ranges == [None]


class _Rewritten(BaseHTTPRequestHandler):
    """A file at a URL naming no fid, replaced by another version of its length after the first GET."""

    gets = 0

    def do_GET(self) -> None:  # noqa: N802
        type(self).gets += 1
        first = int((self.headers.get("Range") or "bytes=0-").removeprefix("bytes=").split("-")[0])
        self.send_response(206 if first else 200)
        if first:
            self.send_header("Content-Range", f"bytes {first}-99/100")
        self.send_header("Content-Length", str(100 - first))
        self.send_header("Last-Modified", f"Mon, 07 Dec 2026 10:00:0{min(self.gets, 2)} GMT")
        self.end_headers()
        self.wfile.write((b"a" if self.gets == 1 else b"b") * (100 - first))

    def log_message(self, *args: object) -> None:
        pass


def test_a_seekable_body_at_urls_naming_no_fid_is_not_read_again_from_another_version() -> None:
    _Rewritten.gets = 0
    node = _serving(_Rewritten)
    try:
        body = SeekableBody([f"http://127.0.0.1:{node.server_address[1]}/files/k.bin"], length=100, timeout=5)
        assert body.read(10) == b"a" * 10
        body.seek(50)  # opens it again there
        with pytest.raises(StorageError, match="another version"):
            body.read(10)
    finally:
        node.shutdown()
        node.server_close()


TEN_MB = 10_000_000  # what endless_node announces


@pytest.fixture
def waiting_node() -> Iterator[ScriptedNode]:
    """A node that announces 10 MB, sends the first 1000 bytes, then waits."""
    node = ScriptedNode(endless_node)
    yield node
    node.stop()


def _response(url: str) -> tuple[Callable[[], None], Callable[[], Any]]:
    """``read_file``'s response: how to close it, and its next read."""
    replica = open_replica([url], size=TEN_MB, timeout=5)
    assert replica.read(1000) == b"x" * 1000
    return replica.close, lambda: replica.read(100)


def _resumed(url: str) -> tuple[Callable[[], None], Callable[[], Any]]:
    """Serve mode's transfer, which goes on from a replica again when cut."""
    resumed = ResumedReplica(open_replica([url], size=TEN_MB, timeout=5), Resumption([url], None, TEN_MB), timeout=5)
    chunks = resumed.iter_chunks()
    assert next(chunks) == b"x" * 1000
    return resumed.close, lambda: next(chunks)


def _seekable(url: str) -> tuple[Callable[[], None], Callable[[], Any]]:
    """The Django storage's file, which opens a replica again when cut."""
    body = SeekableBody([url], length=TEN_MB, timeout=5)
    assert body.read(1000) == b"x" * 1000
    return body.close, lambda: body.read(100)


@pytest.mark.parametrize("opened", [_response, _resumed, _seekable], ids=["response", "resumed", "seekable"])
def test_a_body_closed_from_another_thread_ends_the_read_waiting_on_it_and_asks_no_replica_again(
        waiting_node: ScriptedNode, opened: Callable[[str], tuple[Callable[[], None], Callable[[], Any]]]) -> None:
    """The read waited out its timeout; then the resumed transfer and the seekable body took the
    close for a cut and asked the node again, a transfer nobody would close."""
    close, read_next = opened(waiting_node.url)
    threading.Timer(0.2, close).start()
    started = time.monotonic()
    with pytest.raises(StorageError, match="the response was closed"):
        read_next()
    assert time.monotonic() - started < 2
    assert waiting_node.connections == 1
    assert eventually(lambda: waiting_node.open == 0)


class _Whole(_HalfBody):
    def do_GET(self) -> None:  # noqa: N802
        self._headers()
        self.wfile.write(b"x" * 1000000)


def test_a_body_read_whole_goes_on_from_a_replica_listed_before_the_one_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node asked last (marked down, or being asked again by another request) is listed before
    the one cut: it was never asked, and get_file_data and the body cache failed (a 502)."""
    whole, cut = _serving(_Whole), _serving(_HalfBody)
    urls = [f"http://127.0.0.1:{node.server_address[1]}/dev1/0/000/000/0000000007.fid" for node in (whole, cut)]
    monkeypatch.setattr(down_nodes, "ordered", lambda urls: list(reversed(urls)))
    try:
        assert read_replica(urls, length=1000000, timeout=5) == b"x" * 1000000
    finally:
        for node in (whole, cut):
            node.shutdown()
            node.server_close()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_silent_replica_is_not_waited_for_twice(method: str) -> None:
    node = SilentServer()
    tracker = one_file_tracker(node.port, "k", 10)
    try:
        app = MogileFSMiddleware(wrapped_app, client=Client(DOMAIN, [tracker.tracker]), storage_timeout=0.3)
        assert call(app, method, "/mogilefs/k", {})[0] == 502
        # The trackers were asked again and named the same replica: it was not tried a second time.
        assert [line.split()[0] for line in tracker.requests].count(b"get_paths") == 2
        assert node.connections == 1
    finally:
        tracker.stop()
        node.stop()


class _TenBytes(BaseHTTPRequestHandler):
    """A storage node holding every file, ten bytes each (:data:`~wiretools.TEN`)."""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "10")
        self.end_headers()
        self.wfile.write(TEN)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_requests_no_replica_answered_are_logged_once_per_interval_not_per_request(
        getter: Getter, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node down fails every request for its files (502): the first is logged at once, in one
    line, the next ones only once the interval has passed, counting those left out."""
    monkeypatch.setattr(core, "OUTAGE_LOG_INTERVAL", 0.5)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tracker = one_file_tracker(port, "k", 10)
    get = getter(tracker.tracker)
    caplog.set_level(logging.INFO, logger="mogile_middleware")
    try:
        assert [get("/mogilefs/k")[0] for _ in range(5)] == [502] * 5
        time.sleep(0.6)
        assert get("/mogilefs/k")[0] == 502
    finally:
        tracker.stop()
    lines = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(lines) == 2, lines
    assert lines[0].startswith("no replica of 'k' answered: ") and "[Errno 111]" in lines[0]
    assert re.search(r"\(4 more requests in the \d+ s since the last line like this\)$", lines[1])
    # Each asked the trackers again first: at INFO, as often (it was a line per request).
    again = [record.getMessage() for record in caplog.records if "asking the trackers again" in record.getMessage()]
    assert len(again) == 2, again
    assert re.search(r"\(4 more requests in the \d+ s since the last line like this\)$", again[1]), again


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_replicas_gone_with_an_overwrite_elsewhere_are_asked_for_again_and_noted_at_info(
        getter: Getter, caplog: pytest.LogCaptureFixture) -> None:
    files: dict[str, tuple[int, int, list[str]]] = {}

    class Overwritten(_TenBytes):
        def do_GET(self) -> None:  # noqa: N802
            if self.path.endswith("09.fid"):  # the old version: deleted once another client overwrote the key
                files["k"] = (10, 10, [url.replace("09.fid", "10.fid") for url in files["k"][2]])
                self.send_error(404)
            else:
                super().do_GET()

    node = ThreadingHTTPServer(("127.0.0.1", 0), Overwritten)
    threading.Thread(target=node.serve_forever, daemon=True).start()
    files["k"] = (9, 10, [f"http://127.0.0.1:{node.server_address[1]}/dev1/0/000/000/0000000009.fid"])
    tracker = files_tracker(files)
    caplog.set_level(logging.INFO, logger="mogile_middleware")
    try:
        assert getter(tracker.tracker)("/mogilefs/k") == (200, TEN)
    finally:
        tracker.stop()
        node.shutdown()
        node.server_close()
    lines = [record for record in caplog.records if "replica" in record.getMessage()]
    assert [(record.levelname, record.getMessage()[:55]) for record in lines] == [
        ("INFO", "no replica of 'k' answered, asking the trackers again: ")]


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_nginx_asking_again_gets_the_file_from_the_replicas_the_trackers_name_now(getter: Getter) -> None:
    """Located without its length (nginx mode, no trusted proxy), the file's version was confirmed
    before it was served, and that copy, with its length, was taken for another request's newer
    paths: the old ones were tried again and the request was a 502 until they expired."""
    with socket.socket() as gone:
        gone.bind(("127.0.0.1", 0))
        old_url = f"http://127.0.0.1:{gone.getsockname()[1]}/dev1/0/000/000/0000000009.fid"
    node = ThreadingHTTPServer(("127.0.0.1", 0), _TenBytes)
    threading.Thread(target=node.serve_forever, daemon=True).start()
    files = {"k": (9, 10, [old_url])}
    tracker = files_tracker(files)
    try:
        get = getter(tracker.tracker, reproxy="nginx")
        assert get("/mogilefs/k")[0] == 200  # X-Accel-Redirect to the old replica, now cached
        files["k"] = (9, 10, [f"http://127.0.0.1:{node.server_address[1]}/dev2/0/000/000/0000000009.fid"])
        assert get("/mogilefs/k", headers={"X-Reproxy-Failed": "1"}) == (200, TEN)
    finally:
        tracker.stop()
        node.shutdown()
        node.server_close()


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_a_node_that_refuses_at_once_is_asked_again_at_once(getter: Getter) -> None:
    """A refusal costs nothing: a node restarting is asked by the next request, not passed by."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tracker = one_file_tracker(port, "k", 10)
    get = getter(tracker.tracker)
    node = None
    try:
        assert get("/mogilefs/k")[0] == 502  # refused
        node = ThreadingHTTPServer(("127.0.0.1", port), _TenBytes)  # back
        threading.Thread(target=node.serve_forever, daemon=True).start()
        assert get("/mogilefs/k") == (200, b"0123456789")
    finally:
        tracker.stop()
        if node is not None:
            node.shutdown()
            node.server_close()


#: ``getter(tracker)``: the ``get(path, byte_range=None)`` of a middleware over ``tracker``.
Getter = Callable[[str], Callable[..., tuple[int, bytes]]]


@pytest.fixture
def getter(flavour: str) -> Iterator[Getter]:
    """``getter(tracker)``: :func:`_getter` of the test's ``flavour``; the ASGI middleware's
    requests all on one event loop, as under a server."""
    loop = LoopThread() if flavour == "asgi" else None
    yield lambda tracker, **options: _getter(tracker, loop, **options)
    if loop is not None:
        loop.stop()


def _getter(tracker: str, loop: LoopThread | None, **options: Any) -> Callable[..., tuple[int, bytes]]:
    """GET a path of the WSGI middleware, or with ``loop`` of the ASGI one on it, over
    ``tracker`` and with ``options``, with a ``Range`` and ``headers`` if given: status and body."""
    if loop is None:
        app = MogileFSMiddleware(wrapped_app, client=Client(DOMAIN, [tracker]), storage_timeout=0.3, **options)

        def get_wsgi(path: str, byte_range: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
            status, _, body = call(app, "GET", path, {**({"Range": byte_range} if byte_range else {}), **(headers or {})})
            return status, body
        return get_wsgi
    asgi = ASGIMiddleware(Recorder(), domain=DOMAIN, trackers=[tracker], storage_timeout=0.3, **options)

    def get(path: str, byte_range: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        given = {**({"Range": byte_range} if byte_range else {}), **(headers or {})}
        scope = {**http_scope(path), "headers": [(name.lower().encode(), value.encode()) for name, value in given.items()]}
        sent: list[dict[str, Any]] = []
        incoming = [{"type": "http.request", "body": b""}]

        async def receive() -> dict[str, Any]:
            return incoming.pop() if incoming else await asyncio.sleep(3600)  # the client stays

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        loop.run(asgi(scope, receive, send))
        return sent[0]["status"], b"".join(message.get("body", b"") for message in sent[1:])
    return get


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
@pytest.mark.parametrize("interim", [b"HTTP/1.1 100 Continue\r\n\r\n",
                                     b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"],
                         ids=["100", "103"])
@pytest.mark.parametrize("apart", [False, True], ids=["with-the-answer", "before-it"])
def test_a_nodes_interim_answer_is_read_past_and_its_connection_serves_the_next_file(getter: Getter,
                                                                                     interim: bytes,
                                                                                     apart: bool) -> None:
    """RFC 9110 15.2: a 1xx before the answer is read past. (Taken as the answer, it left the
    real one unread on a connection kept for the next request, which got this file's bytes.)"""
    def answer(head: bytes) -> tuple[bytes, ...]:
        first = b"0000000001.fid" in head
        final = (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\n"
                 + (b"AAAAA" if first else b"BBBBB"))
        if not first:
            return (final,)
        return (interim, final) if apart else (interim + final,)

    node = KeptAliveNode(answer)
    tracker = files_tracker({"a": (1, 5, [node.url(1)]), "b": (2, 5, [node.url(2)])})
    try:
        get = getter(tracker.tracker)
        assert get("/mogilefs/a") == (200, b"AAAAA")
        assert get("/mogilefs/b") == (200, b"BBBBB")
        assert node.connections == 1
    finally:
        tracker.stop()
        node.stop()


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
@pytest.mark.parametrize(("byte_range", "wrong"), [
    pytest.param(None, b"HTTP/1.0 204 No Content\r\nContent-Length: 10\r\n\r\n", id="204-to-a-get"),
    pytest.param(None, b"HTTP/1.0 206 Partial Content\r\nContent-Range: bytes 0-9/20\r\nContent-Length: 10\r\n\r\n"
                 + TEN, id="206-to-a-get"),
    pytest.param(None, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", id="101-to-a-get"),
    pytest.param(None, b"HTTP/1.0 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 10\r\n\r\n" + TEN,
                 id="transfer-encoding"),
    pytest.param("bytes=2-3", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n01", id="200-to-a-range"),
    pytest.param("bytes=2-3", b"HTTP/1.0 206 Partial Content\r\nContent-Range: bytes 0-1/10\r\n"
                 b"Content-Length: 2\r\n\r\n01", id="206-of-another-range"),
    pytest.param("bytes=2-3", b"HTTP/1.0 206 Partial Content\r\nContent-Length: 2\r\n\r\n01",
                 id="206-without-content-range"),
    pytest.param("bytes=2-3", b"HTTP/1.0 206 Partial Content\r\nContent-Range: bytes 2-3/9\r\n"
                 b"Content-Length: 2\r\n\r\nxy", id="206-of-a-file-of-another-length"),
    pytest.param("bytes=0-8", b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\n012345678",
                 id="200-of-a-file-of-another-length"),
])
def test_a_replica_answering_other_than_asked_is_passed_over(getter: Getter, byte_range: str | None,
                                                             wrong: bytes) -> None:
    """Only a 200 answers a GET and only a 206 of that range a Range, each with one length:
    anything else was taken as the file (a 204's empty body under the file's length, another
    range's bytes under this one's Content-Range, a part of a replica of another length, damaged
    or replaced behind the tracker's back). (A length that is not one number the middleware
    refused already, as not the file's.)"""
    bad, good = KeptAliveNode(lambda head: wrong), KeptAliveNode(honest)
    tracker = files_tracker({"k": (9, 10, [bad.url(9), good.url(9)])})
    try:
        expected = (206, TEN[int(byte_range[6]):int(byte_range[-1]) + 1]) if byte_range else (200, TEN)
        assert getter(tracker.tracker)("/mogilefs/k", byte_range) == expected
        assert len(bad.requests) == 1 and len(good.requests) == 1
    finally:
        tracker.stop()
        bad.stop()
        good.stop()


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
@pytest.mark.parametrize("closes", [True, False], ids=["closed-after-its-head", "silent-after-its-head"])
def test_a_replica_failing_between_its_head_and_its_body_is_passed_over(getter: Getter, closes: bool) -> None:
    """The answer was decided on the head alone: the body's first read failed after it, a 500
    under gunicorn (a 200 cut short under uvicorn) though another replica held the file."""
    bad = KeptAliveNode(lambda head: b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n", closes=closes)
    good = KeptAliveNode(honest)
    tracker = files_tracker({"k": (9, 10, [bad.url(9), good.url(9)])})
    try:
        assert getter(tracker.tracker)("/mogilefs/k") == (200, TEN)
        assert len(bad.requests) == 1 and len(good.requests) == 1
    finally:
        tracker.stop()
        bad.stop()
        good.stop()


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_a_range_of_the_whole_file_may_be_answered_with_all_of_it(getter: Getter) -> None:
    """RFC 9110 lets a server ignore a Range: a 200 of the whole file is the range ``bytes=0-``
    (a browser's first request for a video) asks for."""
    node = KeptAliveNode(lambda head: b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 10\r\n\r\n"
                         + TEN)
    tracker = files_tracker({"k": (9, 10, [node.url(9)])})
    try:
        get = getter(tracker.tracker)
        assert get("/mogilefs/k", "bytes=0-") == (206, TEN)
        assert get("/mogilefs/k", "bytes=0-8")[0] == 502  # part of it: those are not the bytes asked for
    finally:
        tracker.stop()
        node.stop()


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_a_node_that_did_not_answer_is_passed_by_for_a_while(getter: Getter) -> None:
    """A hung node holding a file's first replica costs the first request the storage timeout;
    the next are served from the other replica without asking it, and a file it alone holds is a
    502 without the wait (mogilefsd goes on listing a hung node)."""
    silent, live = SilentServer(), ThreadingHTTPServer(("127.0.0.1", 0), _TenBytes)
    threading.Thread(target=live.serve_forever, daemon=True).start()
    hung_url = f"http://127.0.0.1:{silent.port}/dev1/0/000/000/0000000009.fid"
    live_url = f"http://127.0.0.1:{live.server_address[1]}/dev2/0/000/000/0000000009.fid"
    tracker = files_tracker({"two": (9, 10, [hung_url, live_url]), "one": (9, 10, [hung_url])})
    try:
        get = getter(tracker.tracker)
        assert get("/mogilefs/two") == (200, b"0123456789") and silent.connections == 1
        assert get("/mogilefs/two") == (200, b"0123456789")
        assert get("/mogilefs/one")[0] == 502
        assert silent.connections == 1
    finally:
        tracker.stop()
        silent.stop()
        live.shutdown()
        live.server_close()


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_a_node_that_stalls_midway_is_passed_by_for_a_while(getter: Getter) -> None:
    """Silent for the storage timeout after its head and half the body (a disk stalling on reads),
    it made every request wait that long: a read's timeout did not mark it down, as a node
    silent before its head is."""
    stalling = KeptAliveNode(lambda head: b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 10\r\n\r\n01234")
    live = KeptAliveNode(honest)
    tracker = files_tracker({"two": (9, 10, [stalling.url(9), live.url(9)])})
    try:
        get = getter(tracker.tracker)
        for _ in range(3):
            assert get("/mogilefs/two") == (200, b"0123456789")
        assert len(stalling.requests) == 1
    finally:
        tracker.stop()
        stalling.stop()
        live.stop()


def test_the_tracker_dying_between_open_and_close_leaves_no_key(devmogile: DevMogileFS) -> None:
    client = Client(DOMAIN, devmogile.trackers)
    with pytest.raises(UploadError):
        with client.new_file("orphan", cls="thumb") as upload:
            upload.write(b"data")
            devmogile.stop_tracker()
    devmogile.start_tracker()
    with pytest.raises(UnknownKeyError):
        Client(DOMAIN, devmogile.trackers).file_info("orphan")


def test_several_hundred_concurrent_uploads_read_back_intact(devmogile: DevMogileFS) -> None:
    client = Client(DOMAIN, devmogile.trackers)
    contents = {f"many/{n:03d}": os.urandom(100 + n * 37) for n in range(300)}

    def upload(item: tuple[str, bytes]) -> None:
        client.store_content(item[0], item[1], cls="avatar" if len(item[1]) % 2 else "thumb")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(upload, contents.items(), timeout=120))
    for key, data in contents.items():
        assert hashlib.md5(client.get_file_data(key)).digest() == hashlib.md5(data).digest(), key
    assert sorted(client.keys("many/")) == sorted(contents)
