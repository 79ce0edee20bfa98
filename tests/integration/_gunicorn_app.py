"""Applications for tests under a real server: MogileFSMiddleware over a tiny app, for gunicorn
(``make_app``) and for uvicorn (``make_asgi_app``).

Configured by environment variables: MOGILE_DOMAIN, MOGILE_TRACKERS, MOGILE_REPROXY, and optionally
MOGILE_MEMCACHED (servers), MOGILE_TRUSTED_PROXIES (comma separated), MOGILE_PERLBAL_CACHE_SECONDS,
MOGILE_REQUIRE_PROXY_HEADER ("1"), MOGILE_CACHE_CONTROL, MOGILE_CONTENT_DISPOSITION ("attachment" or "inline"),
MOGILE_PATH_CACHE_SECONDS, MOGILE_PERLBAL_FALLBACK_URL, MOGILE_IO_TIMEOUT, and the counters MOGILE_COUNT_FILE (a line per tracker
get_paths) and MOGILE_APP_HITS_FILE (a line per request the tiny app answers); each line is a PID.

``make_reproxying_app()`` is a stand-in for the middleware behind nginx, naming storage nodes the
test runs itself: MOGILE_REPLICA_URLS (blank separated).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from mogile_middleware.client import Client
from mogile_middleware.middleware import MogileFSMiddleware


def append_line(path: str) -> None:
    """Append this process's PID as one line: one ``write`` of an ``O_APPEND`` file never interleaves."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, f"{os.getpid()}\n".encode())
    finally:
        os.close(descriptor)


def hello(environ, start_response):
    if hits := os.environ.get("MOGILE_APP_HITS_FILE"):
        append_line(hits)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from the app\n"]


class CountingClient(Client):
    """A Client recording each ``get_paths`` in a file, so tests can count tracker lookups of all workers."""

    def __init__(self, count_file: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count_file = count_file

    def get_paths(self, *args: Any, **kwargs: Any) -> Any:
        append_line(self.count_file)
        return super().get_paths(*args, **kwargs)


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
    return {**options, "reproxy": env.get("MOGILE_REPROXY") or None}


def make_app() -> MogileFSMiddleware:
    env = os.environ
    options = middleware_options(env)
    if env.get("MOGILE_IO_TIMEOUT"):
        options["client"] = Client(env["MOGILE_DOMAIN"], env["MOGILE_TRACKERS"],
                                   io_timeout=float(env["MOGILE_IO_TIMEOUT"]))
    elif env.get("MOGILE_COUNT_FILE"):
        options["client"] = CountingClient(env["MOGILE_COUNT_FILE"], env["MOGILE_DOMAIN"], env["MOGILE_TRACKERS"])
    else:
        options.update(domain=env["MOGILE_DOMAIN"], trackers=env["MOGILE_TRACKERS"])
    return MogileFSMiddleware(hello, **options)


async def hello_asgi(scope, receive, send):
    """The ASGI application behind the middleware: the same answer as :func:`hello`; lifespan accepted."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if hits := os.environ.get("MOGILE_APP_HITS_FILE"):
        append_line(hits)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello from the app\n"})


def make_asgi_app() -> Any:
    """The ASGI middleware over :func:`hello_asgi`, configured as :func:`make_app` is (for uvicorn --factory)."""
    from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware

    env = os.environ
    return ASGIMiddleware(hello_asgi, domain=env["MOGILE_DOMAIN"], trackers=env["MOGILE_TRACKERS"],
                          **middleware_options(env))


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
