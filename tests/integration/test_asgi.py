"""The ASGI middleware: what it leaves to the wrapped app, and streaming under a real uvicorn."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import pytest
import uvloop
from starlette.applications import Starlette
from starlette.routing import Mount
from conftest import DOMAIN, require_module
from integration._gunicorn import run_uvicorn
from integration._slow_clients import node_connections, read_first_bytes, slow_downloads, storage_port, thread_count
from integration._wire_client import free_port, read_http_reply
from integration.test_hostile import call
from integration.test_middleware import wrapped_app
from wiretools import PatternFile, SilentServer, pattern_md5

from mogile_middleware import AsyncClient, Client
from mogile_middleware import MogileFSMiddleware as WSGIMiddleware
from mogile_middleware.asgi import MogileFSMiddleware, _inputs, _WarmAnswer, _WarmAnswers
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.views import serve_header

require_module("uvicorn")

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
    """The scope of a request for ``path`` (percent-encoded), as uvicorn makes it."""
    return {"type": "http", "method": method, "path": unquote(path), "raw_path": path.encode(), "query_string": b"",
            "headers": [], "client": ("10.0.0.9", 5000), "root_path": ""}


@pytest.mark.parametrize("runner", ["asyncio", "uvloop", "anyio"])
def test_a_loop_ended_as_runners_end_one_closes_its_tracker_and_storage_connections_with_it(
        devmogile: DevMogileFS, runner: str) -> None:
    """A loop per test or per request (pytest-asyncio, Starlette's TestClient outside ``with``, one
    ``asyncio.run`` after another) left its tracker connection to the collector, which warned of an
    unclosed transport and socket: a suite with ``filterwarnings = error`` failed on them. Its
    storage connections stayed open until another loop came: in a ``gunicorn --preload`` master
    that asked once at start, for its whole life, and in every worker forked from it."""
    middleware = MogileFSMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers)
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("kept.txt", b"served", cls="thumb")
    tracker_port, node_port = int(devmogile.trackers[0].rpartition(":")[2]), storage_port(client, "kept.txt")
    client.close()

    async def get(app: MogileFSMiddleware, path: str) -> int:
        sent: list[dict[str, Any]] = []
        await app(http_scope(path), get_receive(), _append_to(sent))
        return sent[0]["status"]

    async def both(app: MogileFSMiddleware, number: int) -> tuple[int, int]:
        return await get(app, f"/mogilefs/missing{number}"), await get(app, "/mogilefs/kept.txt")

    run = {"asyncio": asyncio.run, "uvloop": uvloop.run, "anyio": lambda coroutine: anyio.run(lambda: coroutine)}[runner]
    gc.collect()  # what earlier tests left is collected, and warned of, before
    gc.disable()  # what the collector would close is not closed by it here
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for number in range(5):  # a key not found: the tracker is asked each time
                assert run(both(middleware, number)) == (404, 200)
                assert (node_connections(tracker_port, os.getpid()), node_connections(node_port, os.getpid())) == (0, 0)
            del middleware
            gc.collect()
    finally:
        gc.enable()
    assert [str(warning.message)[:40] for warning in caught if warning.category is ResourceWarning] == []


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


class _Pending:
    """What a server's ``receive`` awaits while nothing has come: a suspension of the task."""

    def __await__(self) -> Any:
        yield "pending"


def without_asyncio(app: Any, scope: dict[str, Any],
                    incoming: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], BaseException | None]:
    """Run ``app`` as a loop that is not asyncio's (trio's) does, up to its first wait for a
    message that does not come: the messages it sent, and what it raised, if it did."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else await _Pending()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    running = app(scope, receive, send)
    try:
        assert running.send(None) == "pending"
    except StopIteration:
        pass
    except Exception as error:
        return sent, error
    finally:
        running.close()
    return sent, None


@pytest.mark.parametrize("framework", ["bare", "starlette"])
def test_a_loop_not_asyncios_fails_the_startup_and_each_files_request_naming_the_need(framework: str) -> None:
    """Under trio (``hypercorn -k trio``, anyio's trio backend) the server starts, and each file's
    request failed deep in asyncio ("no running event loop", a coroutine never awaited). The
    application's lifespan ends with the error: Starlette's test client waited for it for ever."""
    recorder = Recorder()
    app = recorder if framework == "bare" else Starlette(routes=[Mount("/", recorder)])
    middleware = MogileFSMiddleware(app, domain=DOMAIN, trackers=["127.0.0.1:1"])
    lifespan = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    sent, error = without_asyncio(middleware, lifespan, [{"type": "lifespan.startup"}])
    needed = "mogile_middleware.asgi needs asyncio's event loop (or uvloop), not trio's"
    assert sent == [{"type": "lifespan.startup.failed", "message": needed}]
    assert isinstance(error, RuntimeError) and str(error) == needed
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a coroutine never awaited
        sent, error = without_asyncio(middleware, http_scope("/mogilefs/a.txt"), [{"type": "http.request"}])
        assert sent == [] and isinstance(error, RuntimeError) and str(error) == needed
        gc.collect()
    sent, error = without_asyncio(middleware, http_scope("/elsewhere"), [{"type": "http.request"}])
    assert error is None and sent[0]["status"] == 201 and recorder.scopes[-1]["path"] == "/elsewhere"


def test_a_request_scope_without_headers_is_answered(wrapped: tuple[MogileFSMiddleware, Recorder]) -> None:
    """As a hand-made scope (a test client's, another middleware's) may be."""
    middleware, _ = wrapped
    scope = http_scope("/mogilefs/a.txt")
    del scope["headers"]
    assert run(middleware, scope, [{"type": "http.request"}])[0]["status"] == 503  # no tracker at 127.0.0.1:1


def test_the_apps_shutdown_closes_the_event_loops_tracker_and_storage_connections(devmogile: DevMogileFS) -> None:
    """They stayed open until the process ended: a ResourceWarning each under ``python -X dev``
    and at the end of every test client's lifespan."""
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("a.txt", b"served", cls="thumb")
    tracker_port, node_port = int(devmogile.trackers[0].rsplit(":", 1)[1]), storage_port(client, "a.txt")
    client.close()
    middleware = MogileFSMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers)

    def open_now() -> tuple[int, int]:
        return node_connections(tracker_port, os.getpid()), node_connections(node_port, os.getpid())

    async def lifespan() -> list[tuple[int, int]]:
        incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        outgoing: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        running = asyncio.create_task(middleware(scope, incoming.get, outgoing.put))
        await incoming.put({"type": "lifespan.startup"})
        assert (await outgoing.get())["type"] == "lifespan.startup.complete"
        sent: list[dict[str, Any]] = []
        await middleware(http_scope("/mogilefs/a.txt"), get_receive(), _append_to(sent))
        assert b"".join(message.get("body", b"") for message in sent) == b"served"
        counts = [open_now()]
        await incoming.put({"type": "lifespan.shutdown"})
        assert (await outgoing.get())["type"] == "lifespan.shutdown.complete"
        await running
        await asyncio.sleep(0.1)  # the transports' closing callbacks
        return [*counts, open_now()]

    assert asyncio.run(asyncio.wait_for(lifespan(), 10)) == [(1, 1), (0, 0)]


def test_other_paths_reach_the_app_without_its_reproxy_headers(wrapped: tuple[MogileFSMiddleware, Recorder]) -> None:
    middleware, recorder = wrapped
    start, body = run(middleware, http_scope("/app/page"), [])
    assert start["status"] == 201 and body["body"] == b"app"
    assert dict(start["headers"]) == {b"content-type": b"text/x-app", b"x-accel-buffering": b"no"}
    allowing = MogileFSMiddleware(recorder, domain=DOMAIN, trackers=["127.0.0.1:1"], allow_app_reproxy=True)
    assert b"x-reproxy-url" in dict(run(allowing, http_scope("/app/page"), [])[0]["headers"])


def test_a_rewrite_in_front_is_followed_through_uvicorn(devmogile: DevMogileFS) -> None:
    """Read off a real server's socket: the rewritten path's answer, the application's for a path
    rewritten away from a file, each header once, also for a request repeated on the connection."""
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("hello.txt", b"hello", cls="thumb")
    client.store_content("private/x.txt", b"secret", cls="thumb")
    with run_uvicorn({"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0]},
                     app="_gunicorn_app:make_rewriting_asgi_app") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            for target in (b"/files/hello.txt", b"/files/hello.txt", b"/mogilefs/private/x.txt"):
                sock.sendall(b"GET %s HTTP/1.1\r\nHost: media\r\n\r\n" % target)
                reply, rest = read_http_reply(sock, "GET")
                names = [name for name, _ in reply.fields]
                assert rest == b"" and len(names) == len(set(names)), reply.fields
                if target.startswith(b"/files/"):
                    assert (reply.status, reply.body, reply.headers["etag"]) == (200, b"hello", '"fid-1"')
                else:  # the application's own page, not the file
                    assert reply.status == 200 and b"hello from the app" in reply.body and "etag" not in reply.headers


def test_a_mount_point_beyond_ascii_through_uvicorn(devmogile: DevMogileFS) -> None:
    """Starlette's Mount("/médias") under uvicorn: the file answered off the socket, each header once.
    (uvicorn's own --root-path takes ASCII only: it encodes it so.)"""
    require_module("starlette")
    Client(DOMAIN, devmogile.trackers).store_content("hello.txt", b"hello", cls="thumb")
    with run_uvicorn({"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0]},
                     app="_gunicorn_app:make_mounted_asgi_app") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /m%C3%A9dias/mogilefs/hello.txt HTTP/1.1\r\nHost: media\r\n\r\n")
            reply, rest = read_http_reply(sock, "GET")
    names = [name for name, _ in reply.fields]
    assert rest == b"" and len(names) == len(set(names)), reply.fields
    assert (reply.status, reply.body, reply.headers["etag"]) == (200, b"hello", '"fid-1"')


@pytest.mark.parametrize(("app", "target"), [
    pytest.param("_gunicorn_app:make_asgi_app", "/mogilefs/hello.txt", id="the-server's-root-path"),
    pytest.param("_gunicorn_app:make_mounted_asgi_app", "/m%C3%A9dias/mogilefs/hello.txt", id="and-a-mount-point"),
])
def test_perlbals_fallback_request_reaches_the_file_under_uvicorns_root_path(devmogile: DevMogileFS, app: str,
                                                                             target: str) -> None:
    """uvicorn --root-path /app (behind a front that takes /app off) adds /app to every path it
    receives: the fallback URL named it too, and Perlbal's request reached /app/app/..., not the file."""
    require_module("starlette")
    Client(DOMAIN, devmogile.trackers).store_content("hello.txt", b"hello", cls="thumb")
    port = free_port()
    env = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0], "MOGILE_REPROXY": "perlbal",
           "MOGILE_TRUSTED_PROXIES": "127.0.0.1", "MOGILE_PERLBAL_FALLBACK_URL": f"http://127.0.0.1:{port}"}
    with run_uvicorn(env, app=app, extra_args=["--root-path", "/app"], port=port):
        def get(request_target: str, *headers: str) -> Any:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall("\r\n".join([f"GET {request_target} HTTP/1.1", "Host: media", *headers, "", ""]).encode())
                return read_http_reply(sock, "GET")[0]

        reproxied = get(target, "X-Proxy-Capabilities: reproxy-file")
        fallback = urlsplit(reproxied.headers["x-reproxy-url"].split()[-1])
        assert (fallback.netloc, fallback.path) == (f"127.0.0.1:{port}", target)
        served = get(f"{fallback.path}?{fallback.query}")  # as Perlbal asks it, without the capability
        assert (served.status, served.body) == (200, b"hello")


def test_a_fastapi_app_under_uvicorn_keeps_its_routes_lifespan_and_private_endpoint(devmogile: DevMogileFS) -> None:
    """FastAPI's add_middleware, on the socket: files under the prefix, the app's JSON route with
    its lifespan's state, and its endpoint answering with a private file behind a dependency."""
    require_module("fastapi")
    from integration._fastapi_app import TOKEN

    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("hello.txt", b"hello", cls="thumb")
    client.store_content("private/doc.txt", b"the private doc", cls="thumb")
    with run_uvicorn({"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0]},
                     app="_fastapi_app:make_app") as server:
        def get(target: str, *headers: str) -> Any:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall("\r\n".join([f"GET {target} HTTP/1.1", "Host: media", *headers, "", ""]).encode())
                reply, rest = read_http_reply(sock, "GET")
            names = [name for name, _ in reply.fields]
            assert rest == b"" and len(names) == len(set(names)), reply.fields
            return reply

        served = get("/mogilefs/hello.txt")
        assert (served.status, served.body, served.headers["etag"]) == (200, b"hello", '"fid-1"')
        assert get("/hello").body == b'{"greeting":"hello from FastAPI"}'
        refused = get("/private/doc.txt")
        assert (refused.status, refused.body) == (403, b'{"detail":"not yours"}')
        private = get("/private/doc.txt", f"Authorization: Bearer {TOKEN}")
        assert (private.status, private.body) == (200, b"the private doc")
        assert private.headers["content-disposition"] == 'attachment; filename="doc.txt"'
        assert "x-mogile-middleware-serve" not in private.headers
        ranged = get("/private/doc.txt", f"Authorization: Bearer {TOKEN}", "Range: bytes=4-10")
        assert (ranged.status, ranged.body) == (206, b"private")
        assert get("/private/missing.txt", f"Authorization: Bearer {TOKEN}").status == 404
        assert get("/mogilefs/private/doc.txt").status == 404  # no endpoint checks the token there


def test_a_mount_point_beyond_ascii_is_below_the_prefix(devmogile: DevMogileFS) -> None:
    # Starlette's Mount("/médias", ...) gives root_path as text, the path's bytes come raw: the
    # mount point was never taken off, and every file went to the application.
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", b"mounted", cls="thumb")
    scope = {**http_scope("/médias/mogilefs/a.txt"), "raw_path": b"/m%C3%A9dias/mogilefs/a.txt", "root_path": "/médias",
             "app_root_path": ""}
    served = run(MogileFSMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers), scope, [])
    assert (served[0]["status"], b"".join(message.get("body", b"") for message in served)) == (200, b"mounted")
    perlbal = MogileFSMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers, reproxy="perlbal",
                                 trusted_proxies=["10.0.0.9"], perlbal_fallback_url="http://10.0.0.7:8000")
    reproxied = run(perlbal, scope, [])[0]
    # Perlbal's fallback asks for the same URL: the mount point's UTF-8, percent-encoded.
    assert b" http://10.0.0.7:8000/m%C3%A9dias/mogilefs/a.txt?" in dict(reproxied["headers"])[b"x-reproxy-url"]
    # The same request under a server root path /app, which uvicorn adds again: an answer of its own.
    under_root = {**scope, "path": "/app/médias/mogilefs/a.txt", "raw_path": b"/app/m%C3%A9dias/mogilefs/a.txt",
                  "root_path": "/app/médias", "app_root_path": "/app"}
    elsewhere = {**under_root, "app_root_path": "/app/médias"}  # the middleware wrapping the application
    reproxied_under_root, reproxied_elsewhere = run(perlbal, under_root, [])[0], run(perlbal, elsewhere, [])[0]
    assert dict(reproxied_under_root["headers"])[b"x-reproxy-url"].endswith(
        b" http://10.0.0.7:8000/m%C3%A9dias/mogilefs/a.txt?mogilefs-fallback")
    assert dict(reproxied_elsewhere["headers"])[b"x-reproxy-url"].endswith(
        b" http://10.0.0.7:8000/mogilefs/a.txt?mogilefs-fallback")


@pytest.mark.parametrize(("raw", "path", "root"), [
    pytest.param(b"/mogilefs/a%23b.txt#frag", "/mogilefs/a#b.txt#frag", "", id="fragment-kept-by-h11"),
    pytest.param(b"/m/mogilefs/a%23b.txt", "/mogilefs/a#b.txt", "/m", id="mount-point-off-the-path"),
    pytest.param(b"/mogilefs/a%23b.txt", "/mogilefs/a#b.txt", "", id="as-uvicorn-gives-it"),
    pytest.param(b"/mogilefs/a%23b.txt", "/mogilefs/a#b.txt", "/m", id="a-root-path-not-followed-by-a-slash"),
    pytest.param(b"/mogilefs/a%23b.txt", "/mogilefs/a#b.txt", "/", id="a-root-path-of-a-slash"),
    pytest.param(b"/files/mogilefs/a%23b.txt", "/files/mogilefs/a#b.txt", "/app/files",
                 id="a-mount-point-without-the-servers-root-path"),
])
def test_the_raw_path_is_read_where_the_server_or_a_router_gave_the_same_path(devmogile: DevMogileFS, raw: bytes,
                                                                               path: str, root: str) -> None:
    # h11 and daphne keep a fragment in the path, Starlette before 0.33 takes the mount point off
    # it: neither is a rewrite. Read as one, the first lost its encoded '#', the second its prefix.
    # A root path /m or / that a front took off (hypercorn, daphne --root-path) is not the start of
    # /mogilefs/, as Starlette routes it: read so, the file was asked as "ogilefs/a#b.txt". Under
    # Starlette's Mount("/files") (app_root_path: the server's root path), a path without the
    # server's /app (as hypercorn and daphne give Perlbal's fallback request) is below /files.
    Client(DOMAIN, devmogile.trackers).store_content("a#b.txt", b"hash", cls="thumb")
    middleware = MogileFSMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers)
    mounted = {"app_root_path": "/app"} if root == "/app/files" else {}
    sent = run(middleware, {**http_scope("/"), "raw_path": raw, "path": path, "root_path": root, **mounted}, [])
    assert (sent[0]["status"], b"".join(message.get("body", b"") for message in sent)) == (200, b"hash")


def test_without_a_raw_path_a_hash_in_the_path_is_the_keys(devmogile: DevMogileFS) -> None:
    # raw_path is optional in ASGI: path is then decoded, its "#" a %23 (as url_for writes a
    # key's), part of the key as in WSGI's PATH_INFO. Taken for a fragment, another key's file
    # was served, and a signed link's query was dropped (a 403).
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("report", b"another file", cls="thumb")
    client.store_content("report#2.pdf", b"the report", cls="thumb")
    for options in ({}, {"signing_key": "s3cret"}):
        middleware = MogileFSMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers, **options)
        path, _, query = middleware.url_for("report#2.pdf").partition("?")
        assert path == "/mogilefs/report%232.pdf"
        scope = {**http_scope(path), "query_string": query.encode()}
        del scope["raw_path"]
        sent = run(middleware, scope, [])
        assert (sent[0]["status"], b"".join(message.get("body", b"") for message in sent)) == (200, b"the report")


def test_a_path_rewritten_by_a_middleware_in_front_is_the_one_answered(devmogile: DevMogileFS) -> None:
    # A middleware in front changes scope["path"] (as Starlette's routing and Django read it),
    # never the raw path, which the server received: the rewrite was ignored, a rule that sends
    # a path elsewhere served the file all the same, also from an answer kept for the raw path.
    Client(DOMAIN, devmogile.trackers).store_content("hello.txt", b"hello", cls="thumb")
    recorder = Recorder()
    middleware = MogileFSMiddleware(recorder, domain=DOMAIN, trackers=devmogile.trackers, reproxy="perlbal",
                                    trusted_proxies=["10.0.0.9"])

    def rewritten(raw: str, path: str) -> dict[str, Any]:
        return {**http_scope(raw), "path": path}

    moved = run(middleware, rewritten("/files/hello.txt", "/mogilefs/hello.txt"), [])[0]
    assert moved["status"] == 200 and b"x-reproxy-url" in dict(moved["headers"])
    kept = run(middleware, http_scope("/mogilefs/hello.txt"), [])[0]  # its answer kept for the raw path
    assert kept["status"] == 200 and b"x-reproxy-url" in dict(kept["headers"])
    denied = run(middleware, rewritten("/mogilefs/hello.txt", "/denied"), [])[0]
    assert denied["status"] == 201 and recorder.scopes[-1]["path"] == "/denied"
    # A raw path not UTF-8 was taken as never rewritten, whatever the path: a server gives it with
    # replacement characters, and a rewrite only otherwise.
    assert run(middleware, rewritten("/files/hello.txt%FF", "/mogilefs/hello.txt"), [])[0]["status"] == 200
    assert run(middleware, rewritten("/mogilefs/hello.txt%FF", "/denied"), [])[0]["status"] == 201
    as_given = run(middleware, rewritten("/mogilefs/hello.txt%FF", "/mogilefs/hello.txt\ufffd"), [])
    assert (as_given[0]["status"], as_given[1]["body"]) == (400, b"400 Bad Request\nThe file name is not valid UTF-8.\n")


def test_a_method_other_than_get_or_head_is_405_without_the_app(wrapped: tuple[MogileFSMiddleware,
                                                                                 Recorder]) -> None:
    middleware, recorder = wrapped
    start, body = run(middleware, http_scope("/mogilefs/a.txt", "POST"), [])
    assert start["status"] == 405 and dict(start["headers"])[b"allow"] == b"GET, HEAD"
    assert not recorder.scopes


#: An application's handshake headers: one of its own, and the reproxy headers only the middleware may send.
HANDSHAKE_HEADERS = [(b"sec-websocket-protocol", b"chat"), (b"x-accel-redirect", b"/internal"),
                     (b"x-reproxy-url", b"http://10.0.0.5/secret")]
#: A serve header, whose proof no client may see, whatever the options.
SERVE = tuple(part.encode("latin-1") for part in serve_header("a.txt"))


async def websocket_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accepts a websocket with :data:`HANDSHAKE_HEADERS`, or under ``/deny`` refuses it with an HTTP answer."""
    await receive()
    if scope["path"] == "/deny":
        await send({"type": "websocket.http.response.start", "status": 403, "headers": [*HANDSHAKE_HEADERS, SERVE]})
        await send({"type": "websocket.http.response.body", "body": b"no"})
    else:
        await send({"type": "websocket.accept", "headers": [*HANDSHAKE_HEADERS, SERVE]})


@pytest.mark.parametrize("path", ["/chat", "/deny"])
def test_an_apps_websocket_handshake_goes_out_without_reproxy_headers(path: str) -> None:
    """Nor a serve header, with allow_app_reproxy too: it told the client the process's proof,
    which a proxying view passing on another server's headers would then obey."""
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


async def serving_view(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An application's view answering with the file named by its path's last part."""
    name, value = serve_header(scope["path"].rsplit("/", 1)[1])
    await send({"type": "http.response.start", "status": 200, "headers": [(name.lower().encode(), value.encode())]})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("asked", ["under the prefix", "by a view", "with respond_with"])
def test_a_client_gone_while_its_file_is_looked_up_ends_the_request_and_the_lookup(asked: str) -> None:
    """A tracker that does not answer, a client that leaves after 50 ms: the request ends then,
    answered 499 (which nobody reads), and its lookup is given up, so that it holds none of the
    loop's tracker requests in flight from the clients still there (here one at most: the next
    request asks). The same for a file an application's view asks for."""
    silent = SilentServer()
    middleware = MogileFSMiddleware(serving_view, domain=DOMAIN, trackers=[silent.tracker], io_timeout=5)
    middleware.client.pool.max_connections = 1
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def request(key: str) -> None:
        if asked == "with respond_with":
            await middleware.respond_with(http_scope("/files/" + key), receive, send, key)
        else:
            await middleware(http_scope(("/mogilefs/" if asked == "under the prefix" else "/files/") + key), receive, send)

    async def requests() -> float:
        started = time.monotonic()
        await request("any.txt")
        took = time.monotonic() - started
        await request("other.txt")
        return took

    try:
        took = asyncio.run(requests())
    finally:
        silent.stop()
    gone = [{"type": "http.response.start", "status": 499, "headers": []}, {"type": "http.response.body", "body": b""}]
    assert took < 1 and sent == gone * 2 and silent.connections == 2


def test_a_server_raising_at_the_answer_to_a_client_gone_is_no_error() -> None:
    """ASGI 2.4: a server may raise an OSError when sent anything for a client gone (uvloop's
    transports a RuntimeError); the request still ends quietly."""
    silent = SilentServer()
    middleware = MogileFSMiddleware(Recorder(), domain=DOMAIN, trackers=[silent.tracker], io_timeout=5)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    try:
        for error in (OSError("the client has gone"), RuntimeError("unable to perform operation on closed transport")):
            async def send(message: dict[str, Any]) -> None:
                raise error
            asyncio.run(middleware(http_scope("/mogilefs/any.txt"), receive, send))
    finally:
        silent.stop()


def test_a_client_gone_while_its_file_is_looked_up_is_no_error_in_starlettes_base_http_middleware() -> None:
    """Starlette's ``BaseHTTPMiddleware`` in front raised "No response returned" for a request
    answered with nothing, which uvicorn logged as an exception in the application each time."""
    from starlette.applications import Starlette
    from starlette.middleware.base import BaseHTTPMiddleware

    silent = SilentServer()
    statuses: list[int] = []

    async def dispatch(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        statuses.append(response.status_code)
        return response

    app = Starlette()
    app.add_middleware(MogileFSMiddleware, domain=DOMAIN, trackers=[silent.tracker], io_timeout=5)
    app.add_middleware(BaseHTTPMiddleware, dispatch=dispatch)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass  # as uvicorn drops what is sent to a client gone

    try:
        asyncio.run(app(http_scope("/mogilefs/any.txt"), receive, send))
    finally:
        silent.stop()
    assert statuses == [499]


def test_a_request_task_cancelled_as_its_replica_opens_leaves_no_storage_connection_open(
        devmogile: DevMogileFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request's task cancelled from outside (a timeout middleware, a cancel scope, the server)
    in the turn of the loop its replica opened: the storage connection is closed, not kept open
    for nobody until the process ends."""
    from mogile_middleware import asgi

    client = Client(DOMAIN, devmogile.trackers)
    client.store_file("cancelled.bin", PatternFile(4 * MIB), cls="thumb")
    node_port = storage_port(client, "cancelled.bin")
    middleware = MogileFSMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers)
    requests: list[asyncio.Future[None]] = []
    opened = asgi.open_replica

    async def open_then_cancelled(*args: Any, **kwargs: Any) -> Any:
        replica = await opened(*args, **kwargs)
        requests[-1].cancel()
        return replica

    monkeypatch.setattr(asgi, "open_replica", open_then_cancelled)

    async def receive() -> dict[str, Any]:
        return await asyncio.sleep(3600)  # the client stays

    async def send(message: dict[str, Any]) -> None:
        pass

    async def cancelled_requests() -> int:
        for _ in range(3):
            requests.append(asyncio.ensure_future(middleware(http_scope("/mogilefs/cancelled.bin"), receive, send)))
            with pytest.raises(asyncio.CancelledError):
                await requests[-1]
        await asyncio.sleep(0.2)
        return node_connections(node_port, os.getpid())

    assert asyncio.run(cancelled_requests()) == 0


def served_body(devmogile: DevMogileFS, asked: str, receive: Any,
                in_front: Callable[[Any, float], Any] | None = None, view: Any = serving_view) -> tuple[bytes, bytes]:
    """The body of a file of 4 MiB that a client reading a piece every 50 ms gets, whose server's
    ``receive`` is ``receive``, or behind ``in_front`` (:func:`body_limit`) refusing after 0.2 s;
    and the file's whole."""
    content = bytes(range(256)) * (16 * 1024)
    Client(DOMAIN, devmogile.trackers).store_content("watched.bin", content, cls="thumb")
    middleware: Any = MogileFSMiddleware(view, domain=DOMAIN, trackers=devmogile.trackers)
    if in_front:
        middleware = in_front(middleware, 0.2)
    body = bytearray()

    async def send(message: dict[str, Any]) -> None:
        body.extend(message.get("body", b""))
        await asyncio.sleep(0.05)

    path = ("/mogilefs/" if asked == "under the prefix" else "/files/") + "watched.bin"
    asyncio.run(asyncio.wait_for(middleware(http_scope(path), receive, send), 10))
    return bytes(body), content


@pytest.mark.parametrize("asked", ["under the prefix", "by a view"])
def test_a_receive_cancelled_while_it_waits_does_not_cut_the_download(devmogile: DevMogileFS, asked: str) -> None:
    """Under granian (2.8) a ``receive`` cancelled while it waits makes the next one tell of a
    disconnect for a client still there: the watch of the lookup, cancelled once the replica was
    open, then a second one for the body, cut downloads short, with nothing logged. One watch
    serves the request from its lookup to its last byte."""
    cancelled = False
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal cancelled, requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if cancelled:
            return {"type": "http.disconnect"}
        try:
            return await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled = True
            raise

    body, content = served_body(devmogile, asked, receive)
    assert body == content


@pytest.mark.parametrize("asked", ["under the prefix", "by a view"])
def test_a_disconnect_told_once_as_the_file_opens_ends_its_transfer(devmogile: DevMogileFS, asked: str) -> None:
    """hypercorn and daphne tell of a disconnect once: one the watch of the lookup took, or was
    waiting for as the replica opened, was lost, and the whole file was read for nobody."""
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        if calls == 2:
            await asyncio.sleep(0.2)  # the client leaves as its file begins
            return {"type": "http.disconnect"}
        return await asyncio.sleep(3600)

    body, content = served_body(devmogile, asked, receive)
    assert len(body) < len(content) // 2


@pytest.mark.parametrize("asked", ["under the prefix", "by a view"])
def test_a_disconnect_told_once_in_the_turn_the_replica_opens_sends_nothing(
        devmogile: DevMogileFS, monkeypatch: pytest.MonkeyPatch, asked: str) -> None:
    """The watch and the lookup both done when the request looks again: the client has gone, and
    its replica is closed, where the file was sent for nobody."""
    from mogile_middleware import asgi

    left: list[asyncio.Future[None]] = []
    opened = asgi.open_replica

    async def open_as_the_client_leaves(*args: Any, **kwargs: Any) -> Any:
        replica = await opened(*args, **kwargs)
        left[0].set_result(None)
        return replica

    monkeypatch.setattr(asgi, "open_replica", open_as_the_client_leaves)
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            left.append(asyncio.get_running_loop().create_future())
            return {"type": "http.request", "body": b"", "more_body": False}
        if calls == 2:
            await left[0]
            return {"type": "http.disconnect"}
        return await asyncio.sleep(3600)

    body, _ = served_body(devmogile, asked, receive)
    assert body == b"" and node_connections(storage_port(Client(DOMAIN, devmogile.trackers), "watched.bin"),
                                            os.getpid()) == 0


async def listening_view(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A view answering with a file as Django 5's handler runs one: a task of its own listens for
    the client's disconnect meanwhile, and for a while after the answer ends."""
    await receive()  # the request's body
    listening = asyncio.ensure_future(receive())
    await serving_view(scope, receive, send)
    await asyncio.sleep(0.5)
    listening.cancel()


def test_a_disconnect_told_once_to_the_application_ends_its_views_transfer(devmogile: DevMogileFS) -> None:
    """hypercorn and daphne tell the first to ask, once: the application's listener took it, and
    the whole file was read from the node for nobody."""
    waiting: list[asyncio.Future[dict[str, Any]]] = []

    async def receive() -> dict[str, Any]:
        if not waiting:
            asyncio.get_running_loop().call_later(0.2, leave)  # as the file begins
            waiting.append(asyncio.get_running_loop().create_future())
            return {"type": "http.request", "body": b"", "more_body": False}
        waiting.append(asyncio.get_running_loop().create_future())
        return await waiting[-1]

    def leave() -> None:
        first = next(waiter for waiter in waiting[1:] if not waiter.done())
        first.set_result({"type": "http.disconnect"})

    body, content = served_body(devmogile, "by a view", receive, view=listening_view)
    assert len(body) < len(content) // 2


def test_an_applications_own_reader_gets_the_request_and_the_disconnect_beside_its_views_transfer(
        devmogile: DevMogileFS) -> None:
    """The watch of the file a view answered with read the server's ``receive`` beside the
    application's own reader (here a task reading to the client's end, from before the answer to
    after it): it took parts of the request's body, and under hypercorn and daphne, which tell a
    disconnect once, the disconnect too, for which the application's task then waited for ever."""
    parts = [b"a", b"b", b"c"]
    waiting: list[asyncio.Future[dict[str, Any]]] = []

    async def receive() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if parts:
            if len(parts) == 3:
                loop.call_later(0.4, leave)
            await asyncio.sleep(0.1)
            part = parts.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(parts)}
        waiting.append(loop.create_future())
        return await waiting[-1]

    def leave() -> None:  # told to the first waiting, once
        next(waiter for waiter in waiting if not waiter.done()).set_result({"type": "http.disconnect"})

    got: list[str] = []

    async def view(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def read_to_the_end() -> None:
            while True:
                message = await receive()
                got.append(message["type"] + " " + message.get("body", b"").decode())
                if message["type"] == "http.disconnect":
                    return
        reading = asyncio.ensure_future(read_to_the_end())
        await asyncio.sleep(0.15)  # a part of the body read
        await serving_view(scope, receive, send)
        await asyncio.wait_for(reading, 2)

    body, content = served_body(devmogile, "by a view", receive, view=view)
    assert got == ["http.request a", "http.request b", "http.request c", "http.disconnect "]
    assert len(body) < len(content) // 2


def a_body_then_leaving(parts: int, leave_after: float, gap: float = 0) -> Any:
    """A server's ``receive`` (as uvicorn's) with a body of ``parts`` pieces, each ``gap`` seconds
    after the one before, then a disconnect for every call once the client leaves, ``leave_after``
    seconds after the first call."""
    left: list[asyncio.Future[None]] = []
    pieces = [f"part {number}".encode() for number in range(parts)]

    async def receive() -> dict[str, Any]:
        if not left:
            left.append(asyncio.get_running_loop().create_future())
            asyncio.get_running_loop().call_later(leave_after, left[0].set_result, None)
        if pieces:
            await asyncio.sleep(gap)
            if left[0].done():
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": pieces.pop(0), "more_body": bool(pieces)}
        await left[0]
        return {"type": "http.disconnect"}
    return receive


def test_a_client_leaving_a_post_whose_view_runs_on_ends_its_file(devmogile: DevMogileFS) -> None:
    """A view answering a POST with a file without reading its body, then working on (a
    background task): the watch stopped at the body's first pieces, kept for the application,
    so saw no disconnect until the application returned, and the whole file was read for nobody."""
    async def view(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await serving_view(scope, receive, send)
        await asyncio.sleep(4)

    body, content = served_body(devmogile, "by a view", a_body_then_leaving(5, 0.3), view=view)
    assert len(body) < len(content) // 2


@pytest.mark.parametrize("then", ["returns", "works on"])
def test_a_client_leaving_a_view_that_read_once_after_its_answer_ends_its_file(devmogile: DevMogileFS,
                                                                               then: str) -> None:
    """One read after the answer made the watch wait, for good, for the application to take the
    body's pieces it kept: it saw no disconnect, and the whole file was read for nobody."""
    async def view(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await serving_view(scope, receive, send)
        await asyncio.sleep(0.1)  # the watch has begun
        await receive()
        if then == "works on":
            await asyncio.sleep(4)

    body, content = served_body(devmogile, "by a view", a_body_then_leaving(20, 0.4, gap=0.05), view=view)
    assert len(body) < len(content) // 2


def test_a_view_reading_the_body_after_its_answer_gets_it_whole_or_a_disconnect(devmogile: DevMogileFS) -> None:
    """The watch of the file reads past the body the application leaves: what it cannot keep for
    the application is lost, and the application is told of a disconnect, not given the rest of
    the body as if it were whole (an upload stored short)."""
    got: list[dict[str, Any]] = []

    async def view(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await serving_view(scope, receive, send)
        await asyncio.sleep(0.2)  # the watch has read on
        while not got or got[-1]["type"] != "http.disconnect":
            got.append(await receive())

    served_body(devmogile, "by a view", a_body_then_leaving(5, 0.5), view=view)
    bodies = [message["body"] for message in got[:-1]]
    assert bodies == [f"part {number}".encode() for number in range(len(bodies))] and got[-1]["type"] == "http.disconnect"


def test_a_view_reading_the_body_after_its_answer_under_granian_gets_no_false_disconnect(
        devmogile: DevMogileFS) -> None:
    """Under granian a ``receive`` cancelled while it waits makes the next one tell of a disconnect
    for a client still there: the watch's, cancelled as the file ended, made the application's
    next read say the client had gone, its body cut short. The watch reads on while the
    application runs."""
    pieces = [b"late 0", b"late 1", b"late 2"]
    cancelled = False

    async def receive() -> dict[str, Any]:
        nonlocal cancelled
        if cancelled:
            return {"type": "http.disconnect"}
        try:
            await asyncio.sleep(0.6)  # the pieces come slowly, after the small file was sent
        except asyncio.CancelledError:
            cancelled = True
            raise
        if pieces:
            return {"type": "http.request", "body": pieces.pop(0), "more_body": bool(pieces)}
        return await asyncio.sleep(3600)

    got: list[bytes] = []

    async def view(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await serving_view(scope, receive, send)
        await asyncio.sleep(0.3)  # the file sent meanwhile, the watch's read in flight
        while True:
            message = await receive()
            got.append(message.get("body", b"disconnect"))
            if not message.get("more_body", False):
                return

    Client(DOMAIN, devmogile.trackers).store_content("small.txt", b"small", cls="thumb")
    middleware = MogileFSMiddleware(view, domain=DOMAIN, trackers=devmogile.trackers)
    sent: list[dict[str, Any]] = []
    asyncio.run(asyncio.wait_for(middleware(http_scope("/files/small.txt"), receive, _append_to(sent)), 10))
    assert b"".join(message.get("body", b"") for message in sent[1:]) == b"small"
    assert got == [b"late 0", b"late 1", b"late 2"]


class _BodyTooLarge(Exception):
    """What a body limit in front raises from ``receive`` (Starlette's ``RequestBodyLimitMiddleware``)."""


def body_limit(app: Any, refuse_after: float) -> Any:
    """``app`` behind a body limit as Starlette's: its ``receive`` raises :class:`_BodyTooLarge`
    ``refuse_after`` seconds past the request's first body message, and the limit answers 413
    when that reaches it before the answer started."""
    async def limited(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls = 0
        started = False

        async def receive_with_limit() -> dict[str, Any]:
            nonlocal calls
            calls += 1
            if calls == 1 and refuse_after:
                return {"type": "http.request", "body": b"x" * 1000, "more_body": True}
            await asyncio.sleep(refuse_after)
            raise _BodyTooLarge

        async def send_started(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive_with_limit, send_started)
        except _BodyTooLarge:
            if started:
                raise
            await send({"type": "http.response.start", "status": 413, "headers": []})
            await send({"type": "http.response.body", "body": b"Content Too Large"})
    return limited


@pytest.mark.parametrize("asked", ["under the prefix", "by a view"])
def test_a_body_refused_by_a_limit_in_front_as_the_file_is_looked_up_gets_the_limits_answer(asked: str) -> None:
    """What ``receive`` raises is not a client going away: it reaches the middleware in front,
    whose answer goes out (a 413), where nothing was sent and uvicorn answered 500."""
    silent = SilentServer()  # a lookup that never ends: only the limit can answer
    middleware = MogileFSMiddleware(serving_view, domain=DOMAIN, trackers=[silent.tracker], io_timeout=5)
    try:
        sent = run(body_limit(middleware, 0), http_scope(("/mogilefs/" if asked == "under the prefix" else "/files/")
                                                         + "any.txt"), [])
    finally:
        silent.stop()
    assert [message.get("status") for message in sent] == [413, None]


@pytest.mark.parametrize("asked", ["under the prefix", "by a view"])
def test_a_body_refused_by_a_limit_in_front_midway_through_the_file_ends_it_with_the_error(
        devmogile: DevMogileFS, asked: str) -> None:
    """Once the answer started the limit raises again, for the server to close the connection
    short: the transfer stops, and the error is not taken for a client gone (the body was cut with nothing said)."""
    with pytest.raises(_BodyTooLarge):
        served_body(devmogile, asked, None, body_limit)


@pytest.mark.parametrize("asked", ["under the prefix", "by a view"])
@pytest.mark.parametrize("mode", [{}, {"reproxy": "perlbal"}], ids=["serve", "reproxy"])
def test_a_receive_answering_at_once_past_the_body_is_not_asked_in_a_loop(devmogile: DevMogileFS,
                                                                          mode: dict[str, str], asked: str) -> None:
    """ASGI has ``receive`` wait for the disconnect past the body; one that answers at once, over
    and over, kept the event loop from running the request at all."""
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", b"the file", cls="thumb")
    view = asked == "by a view"
    middleware = MogileFSMiddleware(serving_view if view else Recorder(), domain=DOMAIN, trackers=devmogile.trackers,
                                    **mode)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    path = "/files/a.txt" if view else "/mogilefs/a.txt"
    thread = threading.Thread(target=asyncio.run, args=(middleware(http_scope(path), receive, send),), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and sent[0]["status"] == 200


@pytest.mark.parametrize("gone", [
    pytest.param(ConnectionResetError("the client has gone"), id="oserror"),
    # uvicorn's httptools protocol on uvloop, a pipelined request behind: the transport is closed.
    pytest.param(RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed"),
                 id="uvloop-closed-transport"),
])
@pytest.mark.parametrize("sent_before", [0, 2], ids=["the-start", "a-piece"])
def test_a_client_gone_as_a_piece_is_sent_ends_the_transfer_quietly(devmogile: DevMogileFS,
                                                                   caplog: pytest.LogCaptureFixture,
                                                                   gone: Exception, sent_before: int) -> None:
    """A server's ``send`` raises an OSError once the client has gone (ASGI 2.4), or uvloop's
    RuntimeError: no error is logged or raised, as when the server says so with ``http.disconnect``.
    Raised by the answer's start, it reached uvicorn, which logged a traceback per request."""
    Client(DOMAIN, devmogile.trackers).store_content("long.bin", bytes(MIB), cls="thumb")
    middleware = MogileFSMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        if len(sent) == sent_before:
            raise gone
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {}

    asyncio.run(asyncio.wait_for(middleware(http_scope("/mogilefs/long.bin"), receive, send), 10))
    assert len(sent) == sent_before
    if sent:
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


def test_a_client_that_stops_taking_the_body_frees_its_storage_connection(devmogile: DevMogileFS) -> None:
    """A client that keeps its connection open but reads nothing more: after ``client_timeout``
    without a piece taken, the transfer ends and its storage connection closes; a slow reader that
    takes a piece now and then is served to the end."""
    client = Client(DOMAIN, devmogile.trackers)
    client.store_file("movie.mp4", PatternFile(32 * MIB), cls="thumb")  # more than the kernel's buffers hold
    node_port = storage_port(client, "movie.mp4")
    with run_uvicorn({"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0],
                      "MOGILE_CLIENT_TIMEOUT": "1.5"}) as server:
        with slow_downloads(server.port, "/mogilefs/movie.mp4", 3) as stalled:
            for sock in stalled:
                read_first_bytes(sock)  # then nothing more, the connection kept open
            assert node_connections(node_port, server.pid) == 3
            deadline = time.monotonic() + 10
            while node_connections(node_port, server.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert node_connections(node_port, server.pid) == 0, "stalled clients hold their storage connections"
            assert time.monotonic() - deadline + 10 >= 1.5  # not before client_timeout
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"GET /mogilefs/movie.mp4 HTTP/1.1\r\nHost: media\r\nConnection: close\r\n\r\n")
            reply, rest = read_http_reply(sock, "HEAD")
            digest, received = hashlib.md5(rest), len(rest)
            pauses = 0
            while chunk := sock.recv(MIB):
                digest.update(chunk)
                received += len(chunk)
                if received > (pauses + 1) * 8 * MIB:  # a pause under client_timeout, now and then
                    pauses += 1
                    time.sleep(0.5)
        assert reply.status == 200 and pauses == 3
        assert received == 32 * MIB and digest.hexdigest() == pattern_md5(32 * MIB)


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


PROXY = "10.0.0.9"
#: Requests for one file that the decisions tell apart (``reproxy``: the mode they are for).
VARIANTS = {
    "perlbal": {
        "plain": {},
        "untrusted": {"client": "10.0.0.8"},
        "post": {"method": "POST"},
        "proxied": {"headers": [(b"x-proxy-capabilities", b"reproxy-file"), (b"x-forwarded-for", b"192.0.2.1")]},
        "another client": {"headers": [(b"x-proxy-capabilities", b"reproxy-file"), (b"x-forwarded-for", b"192.0.2.2")]},
        "head": {"method": "HEAD", "headers": [(b"x-proxy-capabilities", b"reproxy-file")]},
        "range": {"headers": [(b"range", b"bytes=0-4")]},
        "head, range": {"method": "HEAD", "headers": [(b"range", b"bytes=0-4")]},
        "suffix range": {"headers": [(b"range", b"bytes=-5")]},
        "suffix range, name not lowercased": {"headers": [(b"Range", b"bytes=-5")]},
        "stale if-range": {"headers": [(b"range", b"bytes=0-4"), (b"if-range", b'"fid-0"')]},
        "if-none-match": {"headers": [(b"if-none-match", b"*")]},
        "if-match": {"headers": [(b"if-match", b'"fid-0"')]},
        "query": {"query": b"v=2"},
        "fallback": {"query": b"mogilefs-fallback"},
        "marked by a client": {"query": b"mogilefs-fallback", "headers": [(b"x-forwarded-for", b"192.0.2.1")]},
        "mounted": {"path": "/site/mogilefs/a.txt", "root": "/site"},
        "not mounted": {"path": "/site/mogilefs/a.txt"},
    },
    "nginx": {
        "proxied": {"headers": [(b"x-sendfile-type", b"X-Accel-Redirect")]},
        "fallback": {"headers": [(b"x-sendfile-type", b"X-Accel-Redirect"), (b"x-reproxy-failed", b"1")]},
        "other proxy header": {"headers": [(b"x-sendfile-type", b"X-Sendfile")]},
        "no proxy header": {},
    },
}
#: (status, reproxied) of the answers to :data:`VARIANTS`.
KINDS = {"perlbal": {(200, True), (200, False), (201, False), (206, False), (304, False), (405, False), (412, False)},
         "nginx": {(200, True), (200, False)}}
OPTIONS = {"perlbal": {"perlbal_fallback_url": "http://10.0.0.7:8000"}, "nginx": {"require_proxy_header": True}}


def variant_scope(method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None, client: str = PROXY,
                  query: bytes = b"", path: str = "/mogilefs/a.txt", root: str = "") -> dict[str, Any]:
    return {**http_scope(path, method), "headers": headers or [], "client": (client, 5000), "query_string": query,
            "root_path": root}


@pytest.mark.parametrize("reproxy", sorted(VARIANTS))
def test_the_answer_to_a_request_does_not_depend_on_the_requests_before_it(devmogile: DevMogileFS,
                                                                         reproxy: str) -> None:
    """Answers of a warm path are kept for the same request: never given to one that differs
    in what the decisions read (client, method, query, a header's value, or its presence)."""
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", b"0123456789" * 3, cls="thumb")
    variants = VARIANTS[reproxy]

    def middleware() -> MogileFSMiddleware:
        return MogileFSMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers, reproxy=reproxy,
                                  trusted_proxies=[PROXY], **OPTIONS[reproxy])

    async def answers(app: MogileFSMiddleware, names: list[str]) -> list[tuple[Any, ...]]:
        got = []
        for name in names:
            sent: list[dict[str, Any]] = []
            await app(variant_scope(**variants[name]), get_receive(), _append_to(sent))
            got.append((name, sent[0]["status"], sent[0]["headers"], b"".join(m.get("body", b"") for m in sent[1:])))
        await app.client.aclose()
        return got

    async def compared() -> None:
        # Each asked alone of a middleware of its own: decided with nothing kept.
        alone = [(await answers(middleware(), [name]))[0] for name in variants]
        names = list(variants)
        order = names + names[::-1] + names  # every one after every other, and again after itself
        assert await answers(middleware(), order) == [alone[names.index(name)] for name in order]
        # Not a vacuous comparison: the variants get answers of every kind.
        assert {(status, reproxied(headers)) for _, status, headers, _ in alone} == KINDS[reproxy]

    asyncio.run(asyncio.wait_for(compared(), 30))


def reproxied(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name in (b"x-reproxy-url", b"x-accel-redirect") for name, _ in headers)


def get_receive() -> Any:
    """A ``receive`` for a GET: its empty body, then nothing (the client stays)."""
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else await asyncio.sleep(3600)
    return receive


def _append_to(sent: list[dict[str, Any]]) -> Any:
    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
    return send


def test_a_repeated_proxy_request_gets_the_same_header_fields_each_once_through_uvicorn(devmogile: DevMogileFS) -> None:
    """The answer kept for a repeated request goes out as the first did, field for field, on one
    kept-alive connection of a real server (a list sent twice, or shared, would show here)."""
    Client(DOMAIN, devmogile.trackers).store_content("kept.txt", b"kept", cls="thumb")
    request = (b"GET /mogilefs/kept.txt HTTP/1.1\r\nHost: media\r\nX-Proxy-Capabilities: reproxy-file\r\n"
               b"X-Forwarded-For: 192.0.2.%d\r\n\r\n")
    with run_uvicorn({"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0], "MOGILE_REPROXY": "perlbal",
                      "MOGILE_TRUSTED_PROXIES": "127.0.0.1"}) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            replies = []
            for client in range(1, 5):
                sock.sendall(request % client)
                reply, rest = read_http_reply(sock, "GET")
                assert rest == b""
                replies.append(reply)
    first = replies[0]
    assert first.status == 200 and "x-reproxy-url" in first.headers
    names = [name for name, _ in first.fields if name != "date"]
    assert len(names) == len(set(names)), first.fields
    for reply in replies[1:]:
        assert [field for field in reply.fields if field[0] != "date"] == [
            field for field in first.fields if field[0] != "date"]


@pytest.mark.parametrize(("options", "header"), [
    ({"MOGILE_REPROXY": "perlbal", "MOGILE_TRUSTED_PROXIES": "127.0.0.1"}, b"X-Forwarded-For: 192.0.2.1"),
    ({}, b'If-None-Match: "other"')], ids=["reproxy, warm", "serve"])
def test_a_header_repeated_100000_times_is_read_in_one_pass(devmogile: DevMogileFS, options: dict[str, str],
                                                            header: bytes) -> None:
    """uvicorn's httptools parser takes a request head of any size: a client repeating a header
    the decisions read is answered at once, not after minutes of the worker's event loop
    joining the values one by one."""
    Client(DOMAIN, devmogile.trackers).store_content("many.txt", b"many", cls="thumb")
    request = b"GET /mogilefs/many.txt HTTP/1.1\r\nHost: media\r\nX-Proxy-Capabilities: reproxy-file\r\n"
    with run_uvicorn({"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0], **options}) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            for repeats in (1, 100_000):  # the first makes the path warm (its answer kept)
                sock.sendall(request + (header + b"\r\n") * repeats + b"\r\n")
                reply, rest = read_http_reply(sock, "GET")
                assert reply.status == 200 and rest == b""
                assert ("x-reproxy-url" in reply.headers) == bool(options)


def test_a_kept_answer_lasts_as_long_as_the_path_cache_holds_its_location(devmogile: DevMogileFS) -> None:
    writer = Client(DOMAIN, devmogile.trackers)
    writer.store_content("a.txt", b"one", cls="thumb")

    async def scenario() -> None:
        app = MogileFSMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers, reproxy="perlbal",
                                 trusted_proxies=[PROXY], path_cache_seconds=0.5)

        async def etag() -> bytes:
            sent: list[dict[str, Any]] = []
            await app(variant_scope(), get_receive(), _append_to(sent))
            return dict(sent[0]["headers"])[b"etag"]

        first = {await etag() for _ in range(3)}  # looked up, decided from the cache, then as kept
        writer.store_content("a.txt", b"two", cls="thumb")  # another process's write
        assert {await etag()} == first  # the path cache holds the old location for its time
        await asyncio.sleep(0.6)
        second = {await etag() for _ in range(3)}  # looked up anew, then kept again
        await app.client.store_content("a.txt", b"three", cls="thumb")  # a write of its own: forgotten at once
        third = await etag()
        await app.client.aclose()
        assert len(first | second | {third}) == 3

    asyncio.run(asyncio.wait_for(scenario(), 10))


@pytest.mark.parametrize("code", ["authorize", "key_for_path", "signing_key"])
def test_the_applications_own_decisions_are_asked_for_every_request(devmogile: DevMogileFS, code: str) -> None:
    writer = Client(DOMAIN, devmogile.trackers)
    for key in ("a.txt", "b.txt"):
        writer.store_content(key, key.encode(), cls="thumb")
    allowed = {"a.txt": True}
    mapped = {"a.txt": "a.txt"}
    options: dict[str, Any] = {
        "authorize": {"authorize": lambda scope, key: allowed[key]},
        "key_for_path": {"key_for_path": lambda path: mapped[path]},
        "signing_key": {"signing_key": b"k" * 32},
    }[code]

    async def scenario() -> list[int | bytes]:
        app = MogileFSMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers, reproxy="perlbal",
                                 trusted_proxies=[PROXY], **options)
        path, _, query = app.url_for("a.txt", expires_in=1, **({"path": "a.txt"} if code == "key_for_path" else {})
                                     ).partition("?")
        answers: list[int | bytes] = []
        for turn in range(4):
            if turn == 3:  # the application changes its mind, or the signature expires
                allowed["a.txt"] = False
                mapped["a.txt"] = "b.txt"
                await asyncio.sleep(2.1 if code == "signing_key" else 0)  # expiry: whole seconds, rounded up
            sent: list[dict[str, Any]] = []
            await app(variant_scope(path=path, query=query.encode()), get_receive(), _append_to(sent))
            answers.append(dict(sent[0]["headers"]).get(b"x-reproxy-url", sent[0]["status"]))
        await app.client.aclose()
        return answers

    answers = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert answers[0] == answers[1] == answers[2] != answers[3]
    assert answers[3] in (403, 404) or b"/" in answers[3]  # refused, or another file's replicas


def test_answers_kept_are_bounded_in_paths_and_in_requests_of_a_path() -> None:
    """A client asking for many files, or for one with ever other headers, grows no memory."""
    warm = _WarmAnswer(lambda: True, "serve", "200 OK", 200, [], b"")
    kept = _WarmAnswers(max_paths=100, max_variants=4)
    paths = [b"/mogilefs/%d" % n for n in range(1000)]
    for path in paths:
        kept.keep(path, ("GET",), warm)
    assert 90 <= sum(kept.variants(path) is not None for path in paths) <= 100
    assert kept.variants(paths[-1]) == {("GET",): warm} and kept.variants(paths[0]) is None
    for n in range(1000):
        kept.keep(paths[-1], ("GET", b"%d" % n), warm)
    assert 1 <= len(kept.variants(paths[-1]) or {}) <= 4 and ("GET", b"999") in (kept.variants(paths[-1]) or {})
    kept.keep(b"/mogilefs/long", ("GET", b"if-none-match", b'"%s"' % (b"x" * 1000)), warm)
    assert kept.variants(b"/mogilefs/long") is None
    # A request's path counts once, though its inputs hold the server's path beside the raw one.
    path = "/mogilefs/" + "p" * 190
    scope = http_scope(path)
    kept.keep(scope["raw_path"], _inputs(scope), warm)
    assert kept.variants(scope["raw_path"]) == {_inputs(scope): warm}
    longer = {**scope, "headers": [(b"range", b"bytes=0-" + b"9" * 60)]}
    kept.keep(scope["raw_path"], _inputs(longer), warm)
    assert _inputs(longer) not in (kept.variants(scope["raw_path"]) or {})
    # A header repeated with no value has no length, but holds memory (32 MiB at the bounds, not 17).
    for empties, is_kept in ((2, True), (40, False)):
        repeated = {**http_scope("/mogilefs/empty-%d" % empties), "headers": [(b"range", b"")] * empties}
        kept.keep(repeated["raw_path"], _inputs(repeated), warm)
        assert (kept.variants(repeated["raw_path"]) is not None) is is_kept
    # What a proxy sends for a browser's revalidation of a range, of a path of 90 characters: kept.
    proxied = {**http_scope("/mogilefs/" + "p" * 80), "headers": [
        (b"x-proxy-capabilities", b"reproxy-file"), (b"x-forwarded-for", b"203.0.113.9"),
        (b"if-none-match", b'"fid-1234567"'), (b"range", b"bytes=0-1023")]}
    kept.keep(proxied["raw_path"], _inputs(proxied), warm)
    assert kept.variants(proxied["raw_path"]) == {_inputs(proxied): warm}


def test_the_readmes_starlette_stack_answers_cross_origin_ranges_for_its_host_only(devmogile: DevMogileFS) -> None:
    """The README's order: GZip inside the middleware, CORS and TrustedHost outside it."""
    require_module("starlette")
    from starlette.applications import Starlette
    from starlette.middleware.cors import CORSMiddleware
    from starlette.middleware.gzip import GZipMiddleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    Client(DOMAIN, devmogile.trackers).store_content("clip.txt", b"0123456789" * 100, cls="thumb")
    app = Starlette()
    app.add_middleware(GZipMiddleware, minimum_size=0)
    app.add_middleware(MogileFSMiddleware, domain=DOMAIN, trackers=devmogile.trackers)
    app.add_middleware(CORSMiddleware, allow_origins=["https://example.com"], allow_headers=["range"],
                       expose_headers=["content-range"])
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["example.com"])

    def answer(method: str, host: bytes, *headers: tuple[bytes, bytes]) -> tuple[int, dict[bytes, bytes], bytes]:
        scope = {**http_scope("/mogilefs/clip.txt", method), "scheme": "https", "server": ("example.com", 443),
                 "headers": [(b"host", host), (b"origin", b"https://example.com"), *headers]}
        start, *rest = run(app, scope, [{"type": "http.request", "body": b""}])
        return start["status"], dict(start["headers"]), b"".join(message.get("body", b"") for message in rest)

    status, headers, _ = answer("OPTIONS", b"example.com", (b"access-control-request-method", b"GET"),
                                (b"access-control-request-headers", b"range"))
    assert status == 200 and b"range" in headers[b"access-control-allow-headers"].lower()
    status, headers, body = answer("GET", b"example.com", (b"range", b"bytes=0-3"), (b"accept-encoding", b"gzip"))
    assert (status, body, headers[b"content-range"]) == (206, b"0123", b"bytes 0-3/1000")
    assert headers[b"access-control-allow-origin"] == b"https://example.com"
    assert headers[b"access-control-expose-headers"].lower() == b"content-range"
    assert b"content-encoding" not in headers
    assert answer("GET", b"elsewhere.example")[0] == 400
