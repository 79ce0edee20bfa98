"""The body cache (``body_cache_bytes``): small files answered from memory in serve mode, byte for
byte as when streamed, read raw through real gunicorn and uvicorn."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import DOMAIN, require_module
from integration._gunicorn import GunicornServer, run_gunicorn, run_uvicorn
from integration._wire_client import HTTPReply, read_http_reply
from integration.test_hostile import call
from integration.test_middleware import wrapped_app
from wiretools import ScriptedTracker

from mogile_middleware import AsyncClient, Client, metrics
from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.middleware import MogileFSMiddleware

require_module("gunicorn")

SMALL = bytes(range(256)) * 40  # 10,240 bytes: kept
LARGE = os.urandom(300 * 1024)  # over the default body_cache_file_bytes (256 KiB): streamed
KEPT = {"MOGILE_BODY_CACHE_BYTES": str(1024 * 1024)}
SERVERS: dict[str, Callable[..., AbstractContextManager[GunicornServer]]] = {
    "gunicorn": run_gunicorn, "uvicorn": run_uvicorn}


@pytest.fixture(params=sorted(SERVERS))
def run(request: pytest.FixtureRequest) -> Callable[..., AbstractContextManager[GunicornServer]]:
    return SERVERS[request.param]


@pytest.fixture
def env(devmogile: DevMogileFS) -> dict[str, str]:
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("small.bin", SMALL, cls="avatar")
    client.store_content("large.bin", LARGE, cls="avatar")
    return {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0]}


def ask(server: GunicornServer, key: str, method: str = "GET", headers: dict[str, str] | None = None) -> HTTPReply:
    lines = [f"{method} /mogilefs/{key} HTTP/1.1", "Host: media", "Connection: close",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        reply, _ = read_http_reply(sock, method)
    return reply


def seen(reply: HTTPReply) -> tuple[int, list[tuple[str, str]], bytes]:
    """What a client sees of ``reply``, but the headers that vary by server and time."""
    return reply.status, sorted(field for field in reply.fields if field[0].lower() not in ("date", "server")), \
        reply.body


def test_kept_answers_are_the_streamed_ones_byte_for_byte(env: dict[str, str], run: Callable[..., Any]) -> None:
    with run(env) as streaming, run({**env, **KEPT}) as keeping:
        etag = ask(streaming, "small.bin").headers["etag"]
        requests = [("GET", {}), ("HEAD", {}), ("GET", {"Range": "bytes=5-99"}), ("GET", {"Range": "bytes=-7"}),
                    ("GET", {"Range": "bytes=10240-"}), ("GET", {"If-None-Match": etag}),
                    ("GET", {"If-Range": '"fid-0"', "Range": "bytes=0-1"}), ("GET", {"If-Match": '"fid-0"'})]
        for method, headers in requests:
            expected = seen(ask(streaming, "small.bin", method, headers))
            for _ in range(2):  # read from a node and kept, then from memory
                reply = ask(keeping, "small.bin", method, headers)
                assert seen(reply) == expected, (method, headers)
                assert max(Counter(name.lower() for name, _ in reply.fields).values()) == 1
        assert ask(keeping, "small.bin").body == SMALL


def test_requests_at_once_for_a_file_not_yet_kept_get_the_streamed_answers(
        devmogile: DevMogileFS, env: dict[str, str], run: Callable[..., Any]) -> None:
    """One reads it whole to keep it while the others stream it: every answer, whichever way it
    was made, is the one streaming gives, header for header, over a real server."""
    content = os.urandom(200 * 1024)
    Client(DOMAIN, devmogile.trackers).store_content("burst.bin", content, cls="avatar")
    requests = [("GET", {}), ("GET", {"Range": "bytes=1000-99999"}), ("HEAD", {})] * 8
    with run(env) as streaming, run({**env, **KEPT}) as keeping:
        expected = {index: seen(ask(streaming, "burst.bin", method, headers))
                    for index, (method, headers) in enumerate(requests[:3])}
        answers: dict[int, HTTPReply] = {}

        def one(index: int) -> None:
            answers[index] = ask(keeping, "burst.bin", *requests[index])

        threads = [threading.Thread(target=one, args=(index,)) for index in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert len(answers) == len(requests)
    for index, reply in answers.items():
        assert seen(reply) == expected[index % 3], requests[index]
        assert max(Counter(name.lower() for name, _ in reply.fields).values()) == 1
    assert answers[0].body == content


def test_a_kept_file_needs_no_storage_node_and_a_large_one_is_streamed(
        devmogile: DevMogileFS, env: dict[str, str], run: Callable[..., Any]) -> None:
    with run({**env, **KEPT}) as server:
        assert ask(server, "small.bin").body == SMALL
        assert ask(server, "large.bin").body == LARGE
        for node in devmogile.nodes:
            node.stop()
        assert (ask(server, "small.bin").status, ask(server, "small.bin").body) == (200, SMALL)
        ranged = ask(server, "small.bin", headers={"Range": "bytes=100-199"})
        assert (ranged.status, ranged.body) == (206, SMALL[100:200])
        gone = ask(server, "large.bin")
        assert gone.status == 502 and "etag" not in gone.headers and gone.headers["content-type"].startswith("text/")


def test_an_overwrite_elsewhere_is_served_once_the_path_cache_renews(
        devmogile: DevMogileFS, env: dict[str, str], run: Callable[..., Any]) -> None:
    with run({**env, **KEPT, "MOGILE_PATH_CACHE_SECONDS": "0.5"}) as server:
        first = ask(server, "small.bin")
        Client(DOMAIN, devmogile.trackers).store_content("small.bin", b"version two", cls="avatar")
        deadline = time.monotonic() + 10
        while (reply := ask(server, "small.bin")).body != b"version two" and time.monotonic() < deadline:
            assert reply.body == SMALL  # the old version until the path cache renews, never a mix
            time.sleep(0.1)
        assert reply.body == b"version two" and reply.headers["etag"] != first.headers["etag"]


class _CutNode(BaseHTTPRequestHandler):
    """A storage node that announces the whole file, sends a part of it and hangs up."""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(SMALL)))
        self.end_headers()
        self.wfile.write(SMALL[:3000])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args: object) -> None:
        pass


class _WholeNode(_CutNode):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(SMALL)))
        self.end_headers()
        self.wfile.write(SMALL)


@contextmanager
def _node(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A storage node answering every GET with ``handler``; yields a replica URL on it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dev1/0/000/000/0000000009.fid"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def tracker() -> Iterator[str]:
    """A tracker naming two replicas of ``k``: one cut midway, then one that sends it all."""
    with _node(_CutNode) as cut, _node(_WholeNode) as whole:
        replies = {b"get_paths": f"OK paths=2&path1={cut}&path2={whole}\r\n".encode(),
                   b"file_info": f"OK fid=9&domain=testdom&class=avatar&key=k&length={len(SMALL)}"
                                 f"&devcount=2\r\n".encode(),
                   b"get_domains": b"OK domains=1&domain1=testdom&domain1classes=1&domain1class1name=avatar"
                                   b"&domain1class1mindevcount=2\r\n"}
        scripted = ScriptedTracker(lambda line: replies[line.split()[0]])
        try:
            yield scripted.tracker
        finally:
            scripted.stop()


class _Counted(metrics.Recorder):
    def __init__(self) -> None:
        self.lookups: list[bool] = []
        self.failovers = 0

    def body_cache(self, hit: bool) -> None:
        self.lookups.append(hit)

    def replica_failover(self) -> None:
        self.failovers += 1


def _asgi_get(app: Any, path: str) -> tuple[int, bytes]:
    status, _, body = _asgi_answer(app, path)
    return status, body


def _asgi_answer(app: Any, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """The status, headers and body of the ASGI ``app``'s answer to ``GET path``."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return await asyncio.sleep(3600)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [], "client": ("10.0.0.9", 5000), "root_path": ""}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(message.get("body", b"") for message in sent[1:])


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_a_transfer_cut_midway_is_read_from_the_next_replica(tracker: str, flavour: str) -> None:
    counted = _Counted()
    previous = metrics.use(counted)
    try:
        if flavour == "wsgi":
            app = MogileFSMiddleware(wrapped_app, domain=DOMAIN, trackers=[tracker], body_cache_bytes=1 << 20)
            got = [call(app, "GET", "/mogilefs/k", {}) for _ in range(2)]
            got = [(status, body) for status, _, body in got]
        else:
            asgi = ASGIMiddleware(wrapped_app, domain=DOMAIN, trackers=[tracker], body_cache_bytes=1 << 20)
            got = [_asgi_get(asgi, "/mogilefs/k") for _ in range(2)]
    finally:
        metrics.use(previous)
    assert got == [(200, SMALL), (200, SMALL)]
    assert counted.lookups == [False, True] and counted.failovers == 1


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_get_file_data_reads_a_transfer_cut_midway_from_the_next_replica(tracker: str, flavour: str) -> None:
    """Not the body cache's, but the same reader: a client's ``get_file_data`` does not fail on
    the first replica's cut transfer while the next one holds the file."""
    if flavour == "sync":
        client = Client(DOMAIN, [tracker])
        try:
            assert client.get_file_data("k") == SMALL
        finally:
            client.close()
        return

    async def get() -> bytes:
        client = AsyncClient(DOMAIN, [tracker])
        try:
            return await client.get_file_data("k")
        finally:
            await client.aclose()

    assert asyncio.run(asyncio.wait_for(get(), 10)) == SMALL


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_replicas_whose_urls_name_no_fid_are_named_by_their_version_and_never_kept(flavour: str) -> None:
    # Labelled with file_info's fid, such paths could be the version before it (an overwrite
    # between the two answers): the old bytes were served, and kept, under the new version's ETag.
    # Named by their URLs alone, a version of URLs that name the key kept the ETag of the last.
    got: list[str] = []
    fid = [9]

    class Counting(_WholeNode):
        def do_GET(self) -> None:  # noqa: N802
            got.append(self.path)
            super().do_GET()

    def reply(line: bytes) -> bytes:
        command = line.split()[0]
        if command == b"get_paths":
            return f"OK paths=1&path1={rewritten}\r\n".encode()
        if command == b"file_info":
            return f"OK fid={fid[0]}&domain=testdom&class=thumb&key=k&length={len(SMALL)}&devcount=1\r\n".encode()
        return b"OK domains=1&domain1=testdom&domain1classes=1&domain1class1name=thumb&domain1class1mindevcount=1\r\n"

    def etags() -> list[str]:
        """The ETags of two GETs of the key from a new middleware, each answered with its bytes."""
        options = {"domain": "testdom", "trackers": [scripted.tracker], "body_cache_bytes": 1 << 20}
        if flavour == "wsgi":
            from webtest import TestApp

            app = TestApp(MogileFSMiddleware(wrapped_app, **options))
            answers = [(reply.status_int, reply.body, reply.headers["ETag"]) for reply in
                       (app.get("/mogilefs/k"), app.get("/mogilefs/k"))]
        else:
            middleware = ASGIMiddleware(wrapped_app, **options)
            answers = [(status, body, headers[b"etag"].decode()) for status, headers, body in
                       (_asgi_answer(middleware, "/mogilefs/k") for _ in range(2))]
        assert [(status, body) for status, body, _ in answers] == [(200, SMALL)] * 2
        return [etag for _, _, etag in answers]

    with _node(Counting) as url:
        rewritten = url.replace(".fid", ".bin?v=1")
        scripted = ScriptedTracker(reply)
        try:
            first = etags()
            fid[0] = 10  # overwritten: the same URLs, another fid
            second = etags()
        finally:
            scripted.stop()
    assert first[0] == first[1] and first[0].startswith('"paths-') and second[0] != first[0], (first, second)
    assert len(got) == 4  # each from the node: a version not named by a fid is not kept


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_a_file_another_request_is_reading_to_keep_is_streamed_meanwhile(env: dict[str, str], flavour: str) -> None:
    """Each request for a file not yet kept read it whole: 300 at once for a new 256 KiB file held
    23 MiB in a worker whose cache was 1 MiB."""
    options = {"domain": DOMAIN, "trackers": [env["MOGILE_TRACKERS"]], "body_cache_bytes": 1 << 20}
    if flavour == "wsgi":
        app = MogileFSMiddleware(wrapped_app, **options)

        def get() -> tuple[int, dict[str, str], bytes]:
            status, headers, body = call(app, "GET", "/mogilefs/small.bin", {})
            return status, {name.title(): value for name, value in headers}, body
    else:
        app = ASGIMiddleware(wrapped_app, **options)

        def get() -> tuple[int, dict[str, str], bytes]:
            status, headers, body = _asgi_answer(app, "/mogilefs/small.bin")
            return status, {name.decode().title(): value.decode() for name, value in headers.items()}, body

    etag = Client(DOMAIN, [env["MOGILE_TRACKERS"]]).file_info("small.bin").fid
    assert app.bodies.claim(f"fid-{etag}")  # as a request reading it whole does
    assert [get()[::2] for _ in range(2)] == [(200, SMALL)] * 2
    assert app.bodies.get(f"fid-{etag}") is None  # streamed, not read whole and kept
    app.bodies.release(f"fid-{etag}")
    status, headers, body = get()
    assert (status, body, headers["Etag"]) == (200, SMALL, f'"fid-{etag}"')
    assert app.bodies.get(f"fid-{etag}") == SMALL
