"""The ASGI middleware: what it leaves to the wrapped app, and streaming under a real uvicorn."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DOMAIN
from integration._gunicorn import run_uvicorn
from integration._slow_clients import node_connections, read_first_bytes, slow_downloads, storage_port, thread_count
from integration._wire_client import read_http_reply
from integration.test_hostile import call
from integration.test_middleware import wrapped_app
from wiretools import PatternFile, pattern_md5

from mogile_middleware import AsyncClient, Client
from mogile_middleware import MogileFSMiddleware as WSGIMiddleware
from mogile_middleware.asgi import MogileFSMiddleware
from mogile_middleware.devserver import DevMogileFS

pytest.importorskip("uvicorn", reason="uvicorn is installed by the test command ('.[dev]')")

MIB = 1024 * 1024


class Recorder:
    """An ASGI app that records what reached it and answers with a reproxy header of its own."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                self.received.append(message)
                await send({"type": "lifespan.startup.complete"})
            self.received.append(message)
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] == "websocket":
            self.received.append(await receive())
            await send({"type": "websocket.accept"})
            return
        await send({"type": "http.response.start", "status": 201, "headers": [
            (b"content-type", b"text/x-app"), (b"x-reproxy-url", b"http://10.0.0.5/secret"),
            (b"x-accel-redirect", b"/internal"), (b"x-accel-buffering", b"no")]})
        await send({"type": "http.response.body", "body": b"app"})


def run(app: Any, scope: dict[str, Any], incoming: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Call ``app`` with ``scope``, feeding it ``incoming``; the messages it sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else await asyncio.sleep(3600)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return sent


def http_scope(path: str, method: str = "GET") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": [], "client": ("10.0.0.9", 5000), "root_path": ""}


@pytest.fixture
def wrapped() -> tuple[MogileFSMiddleware, Recorder]:
    recorder = Recorder()
    return MogileFSMiddleware(recorder, domain=DOMAIN, trackers=["127.0.0.1:1"]), recorder


def test_lifespan_and_websockets_reach_the_app_untouched(wrapped: tuple[MogileFSMiddleware, Recorder]) -> None:
    middleware, recorder = wrapped
    lifespan = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    sent = run(middleware, lifespan, [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    assert [message["type"] for message in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    websocket = {"type": "websocket", "path": "/mogilefs/chat", "raw_path": b"/mogilefs/chat", "headers": []}
    assert run(middleware, websocket, [{"type": "websocket.connect"}]) == [{"type": "websocket.accept"}]
    assert recorder.scopes[0] is lifespan and recorder.scopes[1] is websocket


def test_other_paths_reach_the_app_without_its_reproxy_headers(wrapped: tuple[MogileFSMiddleware, Recorder]) -> None:
    middleware, recorder = wrapped
    start, body = run(middleware, http_scope("/app/page"), [])
    assert start["status"] == 201 and body["body"] == b"app"
    assert dict(start["headers"]) == {b"content-type": b"text/x-app", b"x-accel-buffering": b"no"}
    allowing = MogileFSMiddleware(recorder, domain=DOMAIN, trackers=["127.0.0.1:1"], allow_app_reproxy=True)
    assert b"x-reproxy-url" in dict(run(allowing, http_scope("/app/page"), [])[0]["headers"])


def test_a_method_other_than_get_or_head_is_405_without_the_app(wrapped: tuple[MogileFSMiddleware,
                                                                                 Recorder]) -> None:
    middleware, recorder = wrapped
    start, body = run(middleware, http_scope("/mogilefs/a.txt", "POST"), [])
    assert start["status"] == 405 and dict(start["headers"])[b"allow"] == b"GET, HEAD"
    assert not recorder.scopes


#: An application's handshake headers: one of its own, and the reproxy headers only the middleware may send.
HANDSHAKE_HEADERS = [(b"sec-websocket-protocol", b"chat"), (b"x-accel-redirect", b"/internal"),
                     (b"x-reproxy-url", b"http://10.0.0.5/secret")]


async def websocket_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accepts a websocket with :data:`HANDSHAKE_HEADERS`, or under ``/deny`` refuses it with an HTTP answer."""
    await receive()
    if scope["path"] == "/deny":
        await send({"type": "websocket.http.response.start", "status": 403, "headers": HANDSHAKE_HEADERS})
        await send({"type": "websocket.http.response.body", "body": b"no"})
    else:
        await send({"type": "websocket.accept", "headers": HANDSHAKE_HEADERS})


@pytest.mark.parametrize("path", ["/chat", "/deny"])
def test_an_apps_websocket_handshake_goes_out_without_reproxy_headers(path: str) -> None:
    websocket = {"type": "websocket", "path": path, "raw_path": path.encode(), "headers": []}
    middleware = MogileFSMiddleware(websocket_app, domain=DOMAIN, trackers=["127.0.0.1:1"])
    handshake = run(middleware, websocket, [{"type": "websocket.connect"}])[0]
    assert handshake["headers"] == [(b"sec-websocket-protocol", b"chat")]
    allowing = MogileFSMiddleware(websocket_app, domain=DOMAIN, trackers=["127.0.0.1:1"], allow_app_reproxy=True)
    assert run(allowing, websocket, [{"type": "websocket.connect"}])[0]["headers"] == HANDSHAKE_HEADERS


@pytest.mark.parametrize("reproxy_header", [False, True])
def test_an_apps_headers_given_as_any_iterable_reach_the_client(reproxy_header: bool) -> None:
    headers = [(b"content-type", b"text/x-app"), (b"set-cookie", b"session=1")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        given = [*headers, *([(b"x-reproxy-url", b"http://10.0.0.5/")] if reproxy_header else [])]
        await send({"type": "http.response.start", "status": 200, "headers": (pair for pair in given)})
        await send({"type": "http.response.body", "body": b"app"})

    start, _ = run(MogileFSMiddleware(app, domain=DOMAIN, trackers=["127.0.0.1:1"]), http_scope("/page"), [])
    assert list(start["headers"]) == headers


@pytest.mark.parametrize("path", ["/mogilefs/", "/mogilefs/a%00b", "/mogilefs/a.txt"])
def test_a_head_error_answer_has_the_gets_headers_and_no_body(path: str) -> None:
    """404 (no key), 400 (a control character), 503 (no tracker): no body after a HEAD's head, in
    either middleware (a server would drop it, gunicorn with a warning in its log each time)."""
    options = {"domain": DOMAIN, "trackers": ["127.0.0.1:1"]}
    wsgi = WSGIMiddleware(wrapped_app, **options)
    status, headers, body = call(wsgi, "HEAD", path.replace("%00", "\0"), {})
    assert status >= 400 and body == b""
    assert headers == call(wsgi, "GET", path.replace("%00", "\0"), {})[1]
    asgi = MogileFSMiddleware(Recorder(), **options)
    start, end = run(asgi, http_scope(path, "HEAD"), [])
    assert start["status"] == status and end["body"] == b""
    assert start["headers"] == run(asgi, http_scope(path), [])[0]["headers"]


def test_a_client_gone_as_a_piece_is_sent_ends_the_transfer_quietly(devmogile: DevMogileFS,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A server's ``send`` raises an OSError once the client has gone (ASGI 2.4): no error is logged
    or raised, as when the server says so with ``http.disconnect``."""
    Client(DOMAIN, devmogile.trackers).store_content("long.bin", bytes(MIB), cls="thumb")
    middleware = MogileFSMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        if len(sent) == 2:
            raise ConnectionResetError("the client has gone")
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {}

    asyncio.run(asyncio.wait_for(middleware(http_scope("/mogilefs/long.bin"), receive, send), 10))
    assert sent[0]["status"] == 200 and len(sent[1]["body"]) < MIB
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_slow_clients_share_one_worker_and_a_client_that_leaves_frees_its_node(devmogile: DevMogileFS) -> None:
    """40 clients reading slowly from one uvicorn worker: all get their first 64 KiB at once, the
    process keeps few threads, and closing them closes their storage connections."""
    client = Client(DOMAIN, devmogile.trackers)
    client.store_file("movie.mp4", PatternFile(32 * MIB), cls="thumb")  # more than the kernel's buffers hold
    node_port = storage_port(client, "movie.mp4")
    with run_uvicorn({"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0]}) as server:
        started = time.monotonic()
        with slow_downloads(server.port, "/mogilefs/movie.mp4", 40) as sockets:
            for sock in sockets:  # every client gets its first 64 KiB while the others stay open
                read_first_bytes(sock)
            assert time.monotonic() - started < 10
            assert thread_count(server.pid) < 10
            assert node_connections(node_port, server.pid) >= 30  # an unfinished download holds its node connection
        deadline = time.monotonic() + 10
        while node_connections(node_port, server.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node_connections(node_port, server.pid) == 0, "clients left, their storage connections stayed"


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_a_256_mib_file_streams_with_flat_memory(devmogile: DevMogileFS) -> None:
    size = 256 * MIB
    client = Client(DOMAIN, devmogile.trackers, storage_timeout=60)
    client.store_file("big.bin", PatternFile(size), cls="thumb")
    with run_uvicorn({"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0]}) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(b"GET /mogilefs/big.bin HTTP/1.1\r\nHost: media\r\nConnection: close\r\n\r\n")
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")
            before = rss_kib(server.pid, "VmRSS")
            reply, rest = read_http_reply(sock, "HEAD")  # the head only: the body is streamed below
            assert reply.status == 200 and int(reply.headers["content-length"]) == size
            digest, received = hashlib.md5(rest), len(rest)
            while chunk := sock.recv(MIB):
                digest.update(chunk)
                received += len(chunk)
        growth_mib = (rss_kib(server.pid, "VmHWM") - before) / 1024
    assert received == size and digest.hexdigest() == pattern_md5(size)
    assert growth_mib < 32, f"uvicorn grew by {growth_mib:.1f} MiB"


def test_a_client_of_the_other_kind_is_refused_when_the_middleware_is_made() -> None:
    with pytest.raises(TypeError, match="class AsyncClient .* not Client"):
        MogileFSMiddleware(Recorder(), client=Client(DOMAIN, ["127.0.0.1:1"]))
    with pytest.raises(TypeError, match="class Client .* not AsyncClient"):
        WSGIMiddleware(wrapped_app, client=AsyncClient(DOMAIN, ["127.0.0.1:1"]))
