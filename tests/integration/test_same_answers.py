"""WSGI under gunicorn and ASGI under uvicorn and daphne answer the same requests alike, read off the socket.

Each configuration starts gunicorn and an ASGI server over the same MogileFS and sends every request
of a corpus (methods, awkward paths, ranges, conditionals, proxy headers, a view) to each. Status code, header
lines and body must match, apart from what the server owns rather than the middleware: ``Date``,
``Server``, ``Connection``, the body's framing, and the reason phrase (ASGI has none to give).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import DOMAIN, require_module
from integration._gunicorn import run_daphne, run_gunicorn, run_uvicorn
from integration._wire_client import HTTPReply, free_port, raw_http

from mogile_middleware import Client
from mogile_middleware.devserver import DevMogileFS

require_module("gunicorn")
require_module("uvicorn")
require_module("daphne")

FILES = {"a.txt": b"0123456789", "empty.txt": b"", "dir/b.bin": bytes(range(256)), "café.txt": b"cafe",
         " a.txt": b"leading space"}
#: Answer headers the server writes, not the middleware; with the framing, left out of the comparison.
SERVERS_OWN = {"date", "server", "connection", "transfer-encoding"}
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")
PATHS = (
    "/mogilefs/a.txt", "/mogilefs/missing.txt", "/mogilefs/", "/mogilefs", "/MOGILEFS/a.txt", "/other",
    "/mogilefs/../a.txt", "/mogilefs/%2e%2e/a.txt", "/mogilefs/a%00b", "/mogilefs/%ff", "/mogilefs/a%0d%0aX:1",
    "/mogilefs/" + "k" * 3000, "/mogilefs/a//b", "/mogilefs/a.txt;x", "/mogilefs/a.txt?x=1", "/mogilefs%2fa.txt",
    "/mogilefs/dir%2fb.bin", "/mogilefs/caf%C3%A9.txt", "/mogilefs/%20a.txt", "/mogilefs/a.txt%20",
    "/mogilefs/a.txt#frag", "/mogilefs/a.txt#frag?x=1", "http://media/mogilefs/a.txt", "HTTP://media:80/mogilefs/dir%2fb.bin?x=1",
)
#: Header sets sent with GET and HEAD of a stored, an empty and a missing key; ETAG is the key's own.
HEADERS = (
    (), ("Range: bytes=0-0",), ("Range: bytes=1-1",), ("Range: bytes=-1",), ("Range: bytes=0-",),
    ("Range: bytes=-0",), ("Range: bytes=5-2",), ("Range: bytes=abc",), ("Range: bytes=0-1,2-3",),
    ("Range: bytes=-99999",), ("Range: bytes=99999999999999999999-",), ("Range: items=0-1",),
    ("Range: BYTES=0-1",), ("Range: bytes=0-1", "Range: bytes=2-3"), ("Range: bytes=" + "9" * 5000 + "-",),
    ("If-None-Match: *",), ("If-None-Match: ETAG",), ('If-None-Match: "other"',), ("If-None-Match: W/ETAG, *",),
    ("If-Match: ETAG",), ('If-Match: "other"',), ("If-Match: *",),
    ("If-Range: ETAG", "Range: bytes=0-1"), ('If-Range: "other"', "Range: bytes=0-1"),
    ("If-Range: W/ETAG", "Range: bytes=0-1"), ("If-Range: Sun, 06 Nov 2094 08:49:37 GMT", "Range: bytes=0-1"),
    ("If-Range: *", "Range: bytes=0-1"), ('If-Range: "other", ETAG', "Range: bytes=0-1"),
    ('If-None-Match: "other", , ETAG',), ("Range: bytes= 0-1",), ("Range: bytes=0-1,",),
    ("If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT",), ("If-Modified-Since: garbage",),
    ("If-Unmodified-Since: Sun, 06 Nov 1994 08:49:37 GMT",), ("Range: bytes=0-1", "If-None-Match: *"),
    ("X-Proxy-Capabilities: reproxy-file",), ("X-Sendfile-Type: X-Accel-Redirect",),
    ("X-Forwarded-For: 10.1.2.3",), ("X-Reproxy-URL: http://10.0.0.5/",), ("Accept-Encoding: gzip",),
)
VIEWS = (("/view/a.txt", ("X-Test-User: allowed",)), ("/view/a.txt?download=r%C3%A9sum%C3%A9.txt",
         ("X-Test-User: allowed",)), ("/view/a.txt", ()), ("/view/missing.txt", ("X-Test-User: allowed",)))


@dataclass(frozen=True)
class Answer:
    """What a client can tell of an answer: status, the middleware's header lines (sorted), body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @classmethod
    def of(cls, reply: HTTPReply) -> Answer:
        body = _unchunked(reply.body) if reply.headers.get("transfer-encoding") == "chunked" else reply.body
        fields = sorted((name, value) for name, value in reply.fields if name not in SERVERS_OWN)
        return cls(reply.status, tuple(fields), body)


def _unchunked(data: bytes) -> bytes:
    body = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body
        body, data = body + data[:size], data[size + 2:]


@dataclass(frozen=True)
class Request:
    """One request of the corpus."""

    method: str
    target: str
    headers: tuple[str, ...] = ()
    version: str = "HTTP/1.1"

    def send(self, port: int) -> Answer:
        lines = [f"{self.method} {self.target} {self.version}", "Host: media", "Connection: close", *self.headers]
        return Answer.of(raw_http(port, ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"), self.method))


def corpus(etag: str) -> Iterator[Request]:
    """Every request sent; ETAG in a header line stands for ``etag``."""
    for path in PATHS:
        for method in METHODS:
            yield Request(method, path)
    for key in ("a.txt", "empty.txt", "missing.txt"):
        for method in ("GET", "HEAD"):
            for headers in HEADERS:
                yield Request(method, f"/mogilefs/{key}", tuple(line.replace("ETAG", etag) for line in headers))
    for target, headers in VIEWS:
        for method in ("GET", "HEAD"):
            yield Request(method, target, headers)
    yield Request("GET", "/mogilefs/a.txt", version="HTTP/1.0")


@pytest.fixture(scope="module")
def mogile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevMogileFS]:
    with DevMogileFS(data_dir=tmp_path_factory.mktemp("mogdata"), storage_nodes=2,
                     domains={DOMAIN: {"thumb": 1}}) as mogile:
        client = Client(DOMAIN, mogile.trackers)
        for key, data in FILES.items():
            client.store_content(key, data, cls="thumb")
        yield mogile


#: Every status a file answer can have, and the application's 403 (a view refused).
FILE_STATUSES = {200, 206, 304, 400, 403, 404, 405, 412, 416}
#: Each configuration: the test application's environment, and statuses its corpus must include.
CONFIGURATIONS = {
    "serve": ({}, FILE_STATUSES),
    "serve-body-cache-download-cache-control": ({"MOGILE_BODY_CACHE_BYTES": "1048576",
                                                 "MOGILE_CONTENT_DISPOSITION": "attachment",
                                                 "MOGILE_CACHE_CONTROL": "public, max-age=60"}, FILE_STATUSES),
    "perlbal": ({"MOGILE_REPROXY": "perlbal"}, FILE_STATUSES),
    "perlbal-trusted-cache-fallback": ({"MOGILE_REPROXY": "perlbal", "MOGILE_TRUSTED_PROXIES": "127.0.0.1",
                                        "MOGILE_PERLBAL_CACHE_SECONDS": "30",
                                        "MOGILE_PERLBAL_FALLBACK_URL": "http://127.0.0.1:8000"}, FILE_STATUSES),
    "nginx-trusted-proxy-header": ({"MOGILE_REPROXY": "nginx", "MOGILE_TRUSTED_PROXIES": "127.0.0.1",
                                    "MOGILE_REQUIRE_PROXY_HEADER": "1"}, FILE_STATUSES),
    "tracker-down": ({"MOGILE_TRACKERS": f"127.0.0.1:{free_port()}"}, {200, 400, 405, 503}),
}


#: The ASGI servers, each compared with gunicorn.
ASGI_SERVERS = {"uvicorn": run_uvicorn, "daphne": run_daphne}


@pytest.mark.parametrize("asgi_server", sorted(ASGI_SERVERS))
@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_both_servers_give_the_same_answers(mogile: DevMogileFS, configuration: str, asgi_server: str) -> None:
    extra, statuses = CONFIGURATIONS[configuration]
    env = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": mogile.trackers[0], **extra}
    etag = Client(DOMAIN, mogile.trackers).file_info("a.txt").fid
    differences, seen = [], set()
    with run_gunicorn(env) as gunicorn, ASGI_SERVERS[asgi_server](env) as asgi_server_process:
        for request in corpus(f'"fid-{etag}"'):
            wsgi, asgi = request.send(gunicorn.port), request.send(asgi_server_process.port)
            seen.add(wsgi.status)
            if wsgi != asgi:
                differences.append(f"{request}:\n  gunicorn {wsgi}\n  {asgi_server}  {asgi}")
    assert not differences, "\n".join(differences)
    assert statuses <= seen, f"the corpus no longer reaches {statuses - seen}"
    assert 500 not in seen


#: Header lines, as raw bytes (latin-1's no-break space 0xA0 is one byte), and the status each must get.
BLANKS = (
    (b"Range: bytes=0-1\t", 206), (b"Range: \tbytes=0-1 ", 206), (b"If-None-Match: ETAG \t", 304),
    (b"If-Range: ETAG\t\r\nRange: bytes=0-1", 206),
    # Not a blank (RFC 9110 5.6.3): the value is not the range or the tag it would be without it.
    (b"Range: bytes=0-1\xa0", 200), (b"Range: \xa0bytes=0-1", 200), (b"If-None-Match: ETAG\xa0", 200),
    (b"If-Range: ETAG\xa0\r\nRange: bytes=0-1", 200),  # (a NEL, 0x85, daphne refuses itself: a 400)
    # A field that is no list of entity-tags names no version, whichever comes first; repeated
    # lines, which each server joins its own way, make one such field.
    (b"If-None-Match: ETAG, *", 200), (b"If-None-Match: *, ETAG", 200),
    (b"If-None-Match: ETAG\r\nIf-None-Match: *", 200), (b"If-Match: ETAG\r\nIf-Match: *", 412),
    (b"If-None-Match: ETAG\r\nIf-None-Match: \"other\"", 304),
)


@pytest.mark.parametrize("server", ["gunicorn", *sorted(ASGI_SERVERS)])
def test_only_spaces_and_tabs_are_blanks_around_range_and_entity_tags(mogile: DevMogileFS, server: str) -> None:
    """A no-break space at the edge of the value was dropped as a blank, off the socket of every
    server: the range was served (206) and the tag matched (304). An entity-tag field naming the
    version before its fault matched (304), or let ``If-Match`` pass."""
    env = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": mogile.trackers[0]}
    etag = f'"fid-{Client(DOMAIN, mogile.trackers).file_info("a.txt").fid}"'.encode()
    with {"gunicorn": run_gunicorn, **ASGI_SERVERS}[server](env) as running:
        got = [(line, raw_http(running.port, b"GET /mogilefs/a.txt HTTP/1.1\r\nHost: media\r\nConnection: close\r\n"
                               + line.replace(b"ETAG", etag) + b"\r\n\r\n").status) for line, _ in BLANKS]
    assert got == list(BLANKS)
