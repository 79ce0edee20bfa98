"""Applications for tests under a real server: MogileFSMiddleware over a tiny app, for gunicorn
(``make_app``) and for uvicorn (``make_asgi_app``).

Configured by environment variables: MOGILE_DOMAIN, MOGILE_TRACKERS, MOGILE_REPROXY, and optionally
MOGILE_MEMCACHED (servers), MOGILE_TRUSTED_PROXIES (comma separated), MOGILE_PERLBAL_CACHE_SECONDS,
MOGILE_REQUIRE_PROXY_HEADER ("1"), MOGILE_CACHE_CONTROL, MOGILE_CONTENT_DISPOSITION ("attachment" or "inline"),
MOGILE_PATH_CACHE_SECONDS, MOGILE_PERLBAL_FALLBACK_URL, MOGILE_IO_TIMEOUT, MOGILE_SIGNING_KEY (blank separated),
MOGILE_AUTHORIZE ("1": keys under ``private/`` refused), MOGILE_BODY_CACHE_BYTES, MOGILE_CLIENT_TIMEOUT,
MOGILE_INNER_PREFIX (a second middleware, under that prefix, inside the first), and the counters
MOGILE_COUNT_FILE (a line per tracker get_paths) and MOGILE_APP_HITS_FILE (a line per request the
tiny app answers); each line is a PID.
For uvicorn, whose access log has no byte count, MOGILE_ACCESS_LOG names a file that gets gunicorn's
``%(m)s %(U)s %(s)s %(B)s`` line for each request (see :class:`AccessLog`).

The tiny app answers ``/view/<key>`` with the key's file through :func:`serve_header`, as a view
that checked who asks would, when the request has ``X-Test-User: allowed`` (``?download=NAME``:
as a download of that name), renewing a session cookie; without it, the app's own 403. Under
uvicorn, ``?until=PATH`` keeps it at work after its answer until the file ``PATH`` exists (20 s at
most), having made ``PATH.working``.

``make_reproxying_app()`` is a stand-in for the middleware behind nginx, naming storage nodes the
test runs itself: MOGILE_REPLICA_URLS (blank separated).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from mogile_middleware.async_client import AsyncClient
from mogile_middleware.client import Client
from mogile_middleware.views import serve_header
from mogile_middleware.middleware import MogileFSMiddleware


def append_line(path: str, line: str | None = None) -> None:
    """Append ``line`` (by default this process's PID): one ``write`` of an ``O_APPEND`` file never interleaves."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, f"{os.getpid() if line is None else line}\n".encode())
    finally:
        os.close(descriptor)


def view_answer(path: str, user: str | None, query: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """The tiny app's answer to ``path``: ``/view/<key>`` serves the key to the allowed user;
    ``/forwarded`` passes on another server's answer, with a serve header made elsewhere."""
    if path == "/forwarded":
        return 200, [("Content-Type", "text/plain"), ("X-Mogile-Middleware-Serve", "key=private%2Fdoc.txt&proof=x"),
                     ("X-Mogile-Middleware-Serve", "key=plain.txt")], b"the upstream's page\n"
    if not path.startswith("/view/"):
        return 200, [("Content-Type", "text/plain")], b"hello from the app\n"
    if user != "allowed":
        return 403, [("Content-Type", "text/plain")], b"not yours\n"
    filename = parse_qs(query).get("download", [None])[0]
    return 200, [serve_header(path[len("/view/"):], filename), ("X-App-Header", "dropped"),
                 ("Set-Cookie", "session=renewed; HttpOnly")], b"ignored body"


def hello(environ, start_response):
    if hits := os.environ.get("MOGILE_APP_HITS_FILE"):
        append_line(hits)
    path = environ["PATH_INFO"].encode("latin-1").decode("utf-8")
    if path.startswith("/replaced/"):
        return replaced(path[len("/replaced/"):], start_response)
    status, headers, body = view_answer(path, environ.get("HTTP_X_TEST_USER"), environ.get("QUERY_STRING", ""))
    start_response(f"{status} {HTTPStatus(status).phrase}", headers)
    return [body]


def replaced(key: str, start_response: Any) -> list[bytes]:
    """``/replaced/<key>``: an answer started, then replaced by ``key``'s file with ``exc_info``
    (PEP 3333); ``/replaced/error/<key>``: the file asked for, then replaced by an error page."""
    error = key.startswith("error/")
    file_headers = [serve_header(key[len("error/"):] if error else key)]
    page_headers = [("Content-Type", "text/plain"), ("Content-Length", "19")]
    start_response("200 OK", file_headers if error else page_headers)
    try:
        raise ValueError("the view failed after its answer started")
    except ValueError:
        start_response("503 Service Unavailable", page_headers if error else file_headers, sys.exc_info())
    return [b"the view's own page"]


def refuse_private(request: Any, key: str) -> bool:
    """``authorize``: keys under ``private/`` are no one's."""
    return not key.startswith("private/")


class CountingClient(Client):
    """A Client recording each ``get_paths`` in a file, so tests can count tracker lookups of all workers."""

    def __init__(self, count_file: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count_file = count_file

    def get_paths(self, *args: Any, **kwargs: Any) -> Any:
        append_line(self.count_file)
        return super().get_paths(*args, **kwargs)


class AsyncCountingClient(AsyncClient):
    """:class:`CountingClient` for the ASGI middleware."""

    def __init__(self, count_file: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count_file = count_file

    async def get_paths(self, *args: Any, **kwargs: Any) -> Any:
        append_line(self.count_file)
        return await super().get_paths(*args, **kwargs)


def client_options(env: Mapping[str, str], client_class: type, counting_class: type) -> dict[str, Any]:
    """The middleware's client as the environment asks for it, or the domain and trackers to make one."""
    domain, trackers = env["MOGILE_DOMAIN"], env["MOGILE_TRACKERS"]
    if env.get("MOGILE_IO_TIMEOUT"):
        return {"client": client_class(domain, trackers, io_timeout=float(env["MOGILE_IO_TIMEOUT"]))}
    if env.get("MOGILE_COUNT_FILE"):
        return {"client": counting_class(env["MOGILE_COUNT_FILE"], domain, trackers)}
    return {"domain": domain, "trackers": trackers}


def middleware_options(env: Mapping[str, str]) -> dict[str, Any]:
    """The middleware's options that the environment gives, besides its client."""
    options: dict[str, Any] = {}
    if env.get("MOGILE_MEMCACHED"):
        from mogile_middleware.memcache import (
            MemcachedBackend,  # pymemcache is an optional extra
        )

        options["cache_backend"] = MemcachedBackend(env["MOGILE_MEMCACHED"])
    if env.get("MOGILE_TRUSTED_PROXIES"):
        options["trusted_proxies"] = env["MOGILE_TRUSTED_PROXIES"].replace(",", " ").split()
    if env.get("MOGILE_PERLBAL_CACHE_SECONDS"):
        options["perlbal_cache_seconds"] = int(env["MOGILE_PERLBAL_CACHE_SECONDS"])
    if env.get("MOGILE_REQUIRE_PROXY_HEADER"):
        options["require_proxy_header"] = env["MOGILE_REQUIRE_PROXY_HEADER"] == "1"
    if env.get("MOGILE_CACHE_CONTROL"):
        options["cache_control"] = env["MOGILE_CACHE_CONTROL"]
    if env.get("MOGILE_CONTENT_DISPOSITION"):
        options["content_disposition"] = env["MOGILE_CONTENT_DISPOSITION"]
    if env.get("MOGILE_PERLBAL_FALLBACK_URL"):
        options["perlbal_fallback_url"] = env["MOGILE_PERLBAL_FALLBACK_URL"]
    if env.get("MOGILE_PATH_CACHE_SECONDS"):
        options["path_cache_seconds"] = float(env["MOGILE_PATH_CACHE_SECONDS"])
    if env.get("MOGILE_SIGNING_KEY"):
        options["signing_key"] = env["MOGILE_SIGNING_KEY"].split()
    if env.get("MOGILE_BODY_CACHE_BYTES"):
        options["body_cache_bytes"] = int(env["MOGILE_BODY_CACHE_BYTES"])
    if env.get("MOGILE_AUTHORIZE") == "1":
        options["authorize"] = refuse_private
    if env.get("MOGILE_CLIENT_TIMEOUT"):
        options["client_timeout"] = float(env["MOGILE_CLIENT_TIMEOUT"])
    return {**options, "reproxy": env.get("MOGILE_REPROXY") or None}


def make_app() -> MogileFSMiddleware:
    env = os.environ
    app = hello
    if env.get("MOGILE_INNER_PREFIX"):  # a middleware of its own under that prefix, inside the other
        app = MogileFSMiddleware(hello, prefix=env["MOGILE_INNER_PREFIX"], **client_options(env, Client, CountingClient),
                                 **middleware_options(env))
    return MogileFSMiddleware(app, **client_options(env, Client, CountingClient), **middleware_options(env))


async def hello_asgi(scope, receive, send):
    """The ASGI application behind the middleware: the same answer as :func:`hello`; lifespan accepted."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if hits := os.environ.get("MOGILE_APP_HITS_FILE"):
        append_line(hits)
    user = next((value.decode() for name, value in scope["headers"] if name == b"x-test-user"), None)
    query = scope["query_string"].decode("latin-1")
    status, headers, body = view_answer(scope["path"], user, query)
    await send({"type": "http.response.start", "status": status,
                "headers": [(name.lower().encode(), value.encode()) for name, value in headers]})
    await send({"type": "http.response.body", "body": body})
    if until := parse_qs(query).get("until"):  # work after its answer (a background task) until that file is made
        append_line(until[0] + ".working")
        for _ in range(400):
            if os.path.exists(until[0]):
                break
            await asyncio.sleep(0.05)


class AccessLog:
    """An ASGI wrapper logging each HTTP request to ``path`` as gunicorn's access log with
    ``%(m)s %(U)s %(s)s %(B)s`` does: method, path, status, and the body bytes the application sent
    (0 when a front proxy fetches the file itself).

    The line is written before the response's last message goes to the server, so once a client
    has read an answer to its end, that answer's line is in the file (a response cut short is
    logged when the application returns).
    """

    def __init__(self, app: Any, path: str) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, sent, logged = "-", 0, False

        def log() -> None:
            nonlocal logged
            if not logged:
                logged = True
                append_line(self.path, f"{scope['method']} {scope['path']} {status} {sent}")

        async def counting_send(message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = str(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    log()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            log()


def make_asgi_app() -> Any:
    """The ASGI middleware over :func:`hello_asgi`, configured as :func:`make_app` is (for uvicorn --factory)."""
    from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware

    env = os.environ
    app = hello_asgi
    if env.get("MOGILE_INNER_PREFIX"):
        app = ASGIMiddleware(hello_asgi, prefix=env["MOGILE_INNER_PREFIX"],
                             **client_options(env, AsyncClient, AsyncCountingClient), **middleware_options(env))
    app = ASGIMiddleware(app, **client_options(env, AsyncClient, AsyncCountingClient), **middleware_options(env))
    return AccessLog(app, env["MOGILE_ACCESS_LOG"]) if env.get("MOGILE_ACCESS_LOG") else app


def make_rewriting_asgi_app() -> Any:
    """:func:`make_asgi_app` behind a middleware that rewrites ``path`` (never ``raw_path``), as
    routing middlewares do: ``/files/...`` to ``/mogilefs/...``, ``/mogilefs/private/...`` to ``/denied``."""
    inner = make_asgi_app()

    async def rewriting(scope, receive, send):
        path = scope.get("path", "")
        if path.startswith("/files/"):
            scope = {**scope, "path": "/mogilefs/" + path[len("/files/"):]}
        elif path.startswith("/mogilefs/private/"):
            scope = {**scope, "path": "/denied"}
        await inner(scope, receive, send)
    return rewriting


def make_mounted_asgi_app() -> Any:
    """:func:`make_asgi_app` mounted by Starlette at ``/médias``, a mount point beyond ASCII."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    return Starlette(routes=[Mount("/médias", app=make_asgi_app())])


#: The version the reproxying app names for every file.
STAND_IN_ETAG = '"fid-1"'
#: What the reproxying app answers at a path of its own, to tell its answers from a storage node's.
APP_PAGES = {"/secret/": b"an internal page of the application\n", "/reproxy-report": b"the application's report\n"}


def make_reproxying_app():
    """Every path under ``/mogilefs/`` is sent to the replicas in MOGILE_REPLICA_URLS, in order,
    as MogileFSMiddleware(reproxy="nginx") sends it; :data:`APP_PAGES` and the rest are answered
    here, unless nginx marks the request with X-Reproxy-Failed."""
    urls = os.environ["MOGILE_REPLICA_URLS"].split()

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        if "HTTP_X_REPROXY_FAILED" in environ:
            # nginx's word that every replica failed: with no file of its own, a 502 (and a path
            # reached this way, not as the client asked for it, shows as that).
            start_response("502 Bad Gateway", [("Content-Type", "text/plain"), ("Content-Length", "0")])
            return [b""]
        if not path.startswith("/mogilefs/"):
            page = APP_PAGES.get(path, b"hello from the app\n")
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(page)))])
            return [page]
        replicas = [("X-Reproxy-URL" if n == 1 else f"X-Reproxy-URL-{n}", url) for n, url in enumerate(urls, 1)]
        start_response("200 OK", [("Content-Type", "application/pdf"), ("ETag", STAND_IN_ETAG), ("Content-Length", "0"),
                                  ("X-Accel-Redirect", "/reproxy"), *replicas])
        return [b""]

    return app
