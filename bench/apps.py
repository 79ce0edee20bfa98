"""The WSGI applications under test, built from environment variables when run under gunicorn.

``BENCH_APP=middleware``: :class:`MogileFSMiddleware` over a tiny app, for ``BENCH_DOMAIN`` on
``BENCH_TRACKERS``, with ``BENCH_OPTIONS`` (JSON keyword arguments). ``BENCH_APP=constant``:
the baseline, answering every request with the headers in ``BENCH_HEADERS`` (JSON pairs) and
``BENCH_BODY_SIZE`` bytes of :func:`pattern`.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from mogile_middleware import MogileFSMiddleware

Headers = list[tuple[str, str]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: The period of :func:`pattern`: a prime, so that no power-of-two chunk repeats it exactly.
PERIOD = 251


def pattern(size: int) -> bytes:
    """``size`` bytes of a fixed pattern: the content of every test file."""
    return (bytes(range(PERIOD)) * (size // PERIOD + 1))[:size]


def constant_app(headers: Headers, body: bytes = b"") -> WSGIApp:
    """An app giving every request the same 200 answer: what the middleware's answer costs at least."""
    chunks = [body] if body else []  # an empty answer is an empty list, as the middleware's is

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", list(headers))
        return chunks

    return app


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """The wrapped application, for requests outside the prefix."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello\n"]


def middleware_env(domain: str, tracker: str, options: dict[str, Any]) -> dict[str, str]:
    """The environment for :func:`make_app` to build the middleware with ``options``."""
    return {"BENCH_APP": "middleware", "BENCH_DOMAIN": domain, "BENCH_TRACKERS": tracker,
            "BENCH_OPTIONS": json.dumps(options)}


def constant_env(headers: Headers, body_size: int = 0) -> dict[str, str]:
    """The environment for :func:`make_app` to build the constant app."""
    return {"BENCH_APP": "constant", "BENCH_HEADERS": json.dumps(headers), "BENCH_BODY_SIZE": str(body_size)}


def make_app() -> WSGIApp:
    """The application that the environment describes (see the module doc)."""
    if os.environ["BENCH_APP"] == "constant":
        headers = [(name, value) for name, value in json.loads(os.environ["BENCH_HEADERS"])]
        return constant_app(headers, pattern(int(os.environ.get("BENCH_BODY_SIZE", "0"))))
    return MogileFSMiddleware(hello, domain=os.environ["BENCH_DOMAIN"], trackers=os.environ["BENCH_TRACKERS"],
                              **json.loads(os.environ.get("BENCH_OPTIONS", "{}")))


def proxied_environ(path: str) -> dict[str, Any]:
    """The environ gunicorn builds for ``GET path`` forwarded by Perlbal, for calling apps directly."""
    return {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.0",
        "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000", "HTTP_HOST": "127.0.0.1:8080",
        "HTTP_CONNECTION": "close", "HTTP_X_PROXY_CAPABILITIES": "reproxy-file", "HTTP_X_FORWARDED_FOR": "127.0.0.1",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
        "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
    }


def answer_headers(app: WSGIApp, path: str) -> Headers:
    """The headers ``app`` answers a proxied ``GET path`` with (its body is not read)."""
    answer: list[Headers] = []
    body = app(proxied_environ(path), lambda status, headers, exc_info=None: answer.append(headers))
    close = getattr(body, "close", None)
    if close is not None:
        close()
    return answer[0]
