"""The applications under test, built from environment variables when run under gunicorn
(:func:`make_app`, WSGI) or uvicorn (:func:`make_asgi_app`, ASGI).

``BENCH_APP=middleware``: the middleware over a tiny app, for ``BENCH_DOMAIN`` on
``BENCH_TRACKERS``, with ``BENCH_OPTIONS`` (JSON keyword arguments). ``BENCH_APP=constant``:
the baseline, answering every request with the headers in ``BENCH_HEADERS`` (JSON pairs) and
``BENCH_BODY_SIZE`` bytes of :func:`pattern`. ``BENCH_APP=lookup`` (ASGI only): the floor of
any middleware, answering the path ``BENCH_PATH`` with the headers in ``BENCH_HEADERS`` from a
dict, and passing every other request on.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from mogile_middleware import MogileFSMiddleware
from mogile_middleware.asgi import ASGIApp, Message, Receive, Scope, Send
from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware

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


def lookup_env(headers: Headers, path: str) -> dict[str, str]:
    """The environment for :func:`make_asgi_app` to build :func:`lookup_asgi_middleware`."""
    return {"BENCH_APP": "lookup", "BENCH_HEADERS": json.dumps(headers), "BENCH_PATH": path}


def _constant_answer() -> tuple[Headers, bytes] | None:
    """The constant app's headers and body if the environment asks for it, else ``None``."""
    if os.environ["BENCH_APP"] != "constant":
        return None
    return _headers(), pattern(int(os.environ.get("BENCH_BODY_SIZE", "0")))


def _middleware_arguments() -> dict[str, Any]:
    """The middleware's keyword arguments that the environment gives."""
    return {"domain": os.environ["BENCH_DOMAIN"], "trackers": os.environ["BENCH_TRACKERS"],
            **json.loads(os.environ.get("BENCH_OPTIONS", "{}"))}


def _headers() -> Headers:
    """The answer's headers that ``BENCH_HEADERS`` gives."""
    return [(name, value) for name, value in json.loads(os.environ["BENCH_HEADERS"])]


def make_app() -> WSGIApp:
    """The WSGI application that the environment describes (see the module doc)."""
    constant = _constant_answer()
    if constant is not None:
        return constant_app(*constant)
    return MogileFSMiddleware(hello, **_middleware_arguments())


def constant_asgi_app(headers: Headers, body: bytes = b"") -> ASGIApp:
    """The ASGI :func:`constant_app`: the two messages the middleware sends, encoded once."""
    start = {"type": "http.response.start", "status": 200,
             "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]}
    end = {"type": "http.response.body", "body": body}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start)
        await send(end)

    return app


def lookup_asgi_middleware(app: ASGIApp, answers: dict[str, Headers]) -> ASGIApp:
    """The least any middleware does: the answer for a request's path from a dict, else ``app``'s.
    No key, trust, conditional or range decision: what is left of a request's cost is the server's."""
    encoded = {path.encode("latin-1"): [(name.lower().encode("latin-1"), value.encode("latin-1"))
                                        for name, value in headers] for path, headers in answers.items()}

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        headers = encoded.get(scope.get("raw_path", b"")) if scope["type"] == "http" else None
        if headers is None:
            await app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": list(headers)})
        await send({"type": "http.response.body", "body": b""})

    return middleware


async def hello_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """The wrapped ASGI application, for requests outside the prefix (uvicorn runs with ``--lifespan off``)."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello\n"})


def make_asgi_app() -> ASGIApp:
    """The ASGI application that the environment describes (see the module doc), for ``uvicorn --factory``."""
    constant = _constant_answer()
    if constant is not None:
        return constant_asgi_app(*constant)
    if os.environ["BENCH_APP"] == "lookup":
        return lookup_asgi_middleware(hello_asgi, {os.environ["BENCH_PATH"]: _headers()})
    return ASGIMiddleware(hello_asgi, **_middleware_arguments())


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


def proxied_scope(path: str) -> Scope:
    """The scope uvicorn builds for the request of :func:`proxied_environ`, for calling apps directly."""
    environ = proxied_environ(path)
    headers = [(name[5:].lower().replace("_", "-").encode("latin-1"), value.encode("latin-1"))
               for name, value in environ.items() if name.startswith("HTTP_")]
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": environ["SERVER_PROTOCOL"].partition("/")[2], "scheme": environ["wsgi.url_scheme"],
        "server": (environ["SERVER_NAME"], int(environ["SERVER_PORT"])),
        "client": (environ["REMOTE_ADDR"], int(environ["REMOTE_PORT"])),
        "method": environ["REQUEST_METHOD"], "root_path": "", "path": path, "raw_path": path.encode("latin-1"),
        "query_string": b"", "headers": headers, "state": {},
    }


def get_receive() -> Receive:
    """A ``receive`` as a server gives one for a GET: its empty body, then nothing (the client stays)."""
    messages: list[Message] = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop()
        await asyncio.get_running_loop().create_future()  # never done: cancelled with the request
        return {"type": "http.disconnect"}

    return receive


async def asgi_answer_headers(app: ASGIApp, path: str) -> Headers:
    """The headers ``app`` answers a proxied ``GET path`` with (its body is dropped)."""
    answer: list[Headers] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer.append([(name.decode("latin-1"), value.decode("latin-1")) for name, value in message["headers"]])

    await app(proxied_scope(path), get_receive(), send)
    return answer[0]
