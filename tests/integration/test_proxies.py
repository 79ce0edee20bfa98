"""End to end through the real front proxies: client → Perlbal or nginx → the middleware, WSGI
under gunicorn and ASGI under uvicorn.

Debian's ``perlbal`` and ``nginx``, with the shipped ``examples/perlbal.conf`` and ``nginx.conf``,
run on loopback ports in front of the application server; the files are in the development
MogileFS, or on storage nodes that are real Perlbal ``web_server``s, as mogstored runs them. Requests that reached the
application are read from an access log, whatever the proxy: gunicorn's own, or for uvicorn (whose
log has no byte count) the same line written by the test application's
:class:`~integration._gunicorn_app.AccessLog`. It holds how many body bytes the application sent,
which is 0 when the proxy fetched the file itself. The storage nodes that nginx must not trust are
a small recording server of this module's own; the application before them is a WSGI stand-in
for the middleware, so those tests run under gunicorn only.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from conftest import CLASSES, DOMAIN, require_module
from integration._gunicorn import GunicornServer, run_gunicorn, run_uvicorn
from integration._gunicorn_app import APP_PAGES, STAND_IN_ETAG
from integration._proxies import (
    Proxy,
    run_nginx_front,
    run_perlbal_front,
    run_perlbal_storage,
)
from integration._wire_client import HTTPReply, eventually, free_port, read_http_reply
from wiretools import PatternFile, pattern_md5

from mogile_middleware import Client
from mogile_middleware.devserver import DevMogileFS

require_module("gunicorn")

MIB = 1024 * 1024
#: Empty, one byte, either side of the 64 KiB chunks, and far beyond any proxy buffer.
SIZES = (0, 1, 65_535, 65_537, MIB + 7, 64 * MIB)
FRONTS: dict[str, Callable[[int], AbstractContextManager[Proxy]]] = {
    "perlbal": run_perlbal_front,
    "nginx": run_nginx_front,
}
#: The application servers: gunicorn with the WSGI middleware, uvicorn with the ASGI one.
SERVERS = ("gunicorn", "uvicorn")
#: Method, path, status and the body bytes the application sent.
ACCESS_LOG_FORMAT = "%(m)s %(U)s %(s)s %(B)s"
#: What a front proxy's client must never see (compared in lower case).
INTERNAL_MARKERS = ("x-reproxy", "x-accel", ".fid")
PHOTO = b"\xff\xd8\xff\xe0 not really a JPEG, but served as one\n" * 100
PHOTO_MD5 = hashlib.md5(PHOTO).hexdigest()


def pattern_bytes(first: int, last: int) -> bytes:
    """Bytes ``first`` to ``last`` of a :class:`PatternFile` (byte ``i`` is ``i % 256``)."""
    return bytes(offset % 256 for offset in range(first, last + 1))


@dataclass(frozen=True)
class Fetched:
    """A response read to its end: the body as its length and MD5, and its first KiB."""

    status: int
    headers: http.client.HTTPMessage
    length: int
    md5: str
    start: bytes

    def text(self) -> str:
        """Status line, headers and the start of the body, for finding internal details in them."""
        return f"{self.status}\n{self.headers}\n{self.start.decode('latin-1')}".lower()


def fetch(port: int, path: str, headers: Mapping[str, str] | None = None, method: str = "GET") -> Fetched:
    """One request on a new connection to ``127.0.0.1:port``; the body is streamed, never held whole."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, headers=dict(headers or {}))
        response = connection.getresponse()
        digest, length, start = hashlib.md5(), 0, b""
        while chunk := response.read(MIB):
            digest.update(chunk)
            length += len(chunk)
            start += chunk[:1024 - len(start)]
        return Fetched(response.status, response.headers, length, digest.hexdigest(), start)
    finally:
        connection.close()


def get_with(port: int, path: str, headers: Mapping[str, str], source: str = "127.0.0.1") -> HTTPReply:
    """One GET on a new connection from ``source`` to ``127.0.0.1:port``, read off the socket: every
    header line is kept."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{lines}\r\n".encode())
        reply, _ = read_http_reply(sock, "GET")
    return reply


@dataclass(frozen=True)
class Stack:
    """A front proxy before the application server with the middleware (gunicorn with one sync
    worker, or uvicorn), before a MogileFS."""

    proxy_port: int
    backend_port: int
    storage_ports: tuple[int, ...]
    access_log: Path

    def get(self, path: str, headers: Mapping[str, str] | None = None, method: str = "GET") -> Fetched:
        """A request through the proxy; fails if the answer shows a reproxy header or a storage URL."""
        fetched = fetch(self.proxy_port, path, headers, method)
        self.assert_hidden(fetched.text())
        return fetched

    def get_fields(self, path: str, headers: Mapping[str, str] | None = None) -> HTTPReply:
        """A GET through the proxy read off the socket, every header line kept (repeats too)."""
        reply = get_with(self.proxy_port, path, dict(headers or {}))
        head = "\n".join(f"{name}: {value}" for name, value in reply.fields)
        self.assert_hidden(f"{head}\n{reply.body[:1024].decode('latin-1')}".lower())
        return reply

    def assert_hidden(self, text: str) -> None:
        """Fail if ``text`` (lower case) shows a reproxy header or a storage URL."""
        markers = (*INTERNAL_MARKERS, *(f"127.0.0.1:{port}" for port in self.storage_ports))
        exposed = [marker for marker in markers if marker in text]
        assert not exposed, f"the client saw {exposed}: {text}"

    def direct(self, path: str, headers: Mapping[str, str] | None = None) -> Fetched:
        """A request straight to the application server, past the proxy."""
        return fetch(self.backend_port, path, headers)

    def app_requests(self, path: str) -> list[tuple[str, int]]:
        """The requests for ``path`` that reached the application, as ``(status, body bytes sent)``."""
        # One sync worker logs each request before it accepts the next, and AccessLog before the
        # last message of the answer: once this one is answered, every earlier line is in the file.
        self.direct("/")
        lines = [line.split() for line in self.access_log.read_text().splitlines()]
        return [(status, int(sent)) for _, logged, status, sent in lines if logged == path]


@contextmanager
def logged_server(server: str, env: dict[str, str], access_log: Path) -> Iterator[GunicornServer]:
    """gunicorn (one sync worker) or uvicorn over the middleware, each request logged to ``access_log``."""
    if server == "gunicorn":
        logging = ["--access-logfile", str(access_log), "--access-logformat", ACCESS_LOG_FORMAT]
        with run_gunicorn(env, extra_args=logging) as running:
            yield running
    else:
        with run_uvicorn({**env, "MOGILE_ACCESS_LOG": str(access_log)}) as running:
            yield running


@contextmanager
def serving(mogile: DevMogileFS, server: str, front: str, tmp: Path, **env: str) -> Iterator[Stack]:
    """``server`` with the middleware reproxying for ``front`` (trusted on loopback), then the proxy."""
    access_log = tmp / "access.log"
    environment = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": mogile.trackers[0], "MOGILE_REPROXY": front,
                   "MOGILE_TRUSTED_PROXIES": "127.0.0.1", **env}
    assert mogile.store is not None
    storage_ports = tuple(device.http_port for device in mogile.store.devices())
    with logged_server(server, environment, access_log) as app, FRONTS[front](app.port) as proxy:
        yield Stack(proxy.port, app.port, storage_ports, access_log)


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    """Each application server in turn: a test that takes this runs under gunicorn and uvicorn."""
    return request.param


def reproxy_ports(stack: Stack, path: str) -> list[int]:
    """The storage ports of the replica URLs the middleware gives the proxy for ``path``, in order."""
    # The test client is on loopback too, so the middleware takes it for the trusted proxy.
    # Perlbal's X-REPROXY-URL lists them all; nginx's X-Reproxy-URL, X-Reproxy-URL-2 name one each.
    urls = [url for name, value in stack.direct(path).headers.items()
            if name.lower().startswith("x-reproxy-url") for url in value.split()]
    return [urlsplit(url).port or 80 for url in urls]


# Files of every size, and the HTTP features, through both proxies.


@pytest.fixture(scope="module")
def sized_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevMogileFS]:
    """A MogileFS holding ``sizes/<size>.mp4`` for every size, each on both storage nodes."""
    with DevMogileFS(tmp_path_factory.mktemp("mogdata"), domains={DOMAIN: CLASSES}) as mogile:
        client = Client(DOMAIN, mogile.trackers, storage_timeout=60)
        for size in SIZES:
            client.store_file(f"sizes/{size}.mp4", PatternFile(size), cls="avatar")
        yield mogile


@pytest.fixture(scope="module", params=sorted(FRONTS))
def through(request: pytest.FixtureRequest, server: str, sized_files: DevMogileFS,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Each front proxy in turn before each server, serving the files of ``sized_files``."""
    with serving(sized_files, server, request.param, tmp_path_factory.mktemp(request.param)) as stack:
        yield stack


def test_every_size_arrives_exact_and_is_fetched_by_the_proxy(through: Stack) -> None:
    for size in SIZES:
        path = f"/mogilefs/sizes/{size}.mp4"
        answer = through.get(path)
        assert (answer.status, answer.length, answer.md5) == (200, size, pattern_md5(size)), path
        assert answer.headers["Content-Length"] == str(size)
        assert answer.headers["Content-Type"] == "video/mp4"  # the application's, not the node's text/plain
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert "Vary" not in answer.headers  # what chose nginx's answer is nginx's own
        assert through.app_requests(path) == [("200", 0)]  # the application sent headers only


def test_head_sends_the_headers_only(through: Stack) -> None:
    answer = through.get("/mogilefs/sizes/1048583.mp4", method="HEAD")
    assert (answer.status, answer.length) == (200, 0)
    assert answer.headers["Content-Length"] == "1048583"
    assert answer.headers["Content-Type"] == "video/mp4"
    # A HEAD has no range (RFC 9110 14.2): the GET's 200 head, not the node's 206.
    ranged = through.get("/mogilefs/sizes/1048583.mp4", {"Range": "bytes=0-9"}, method="HEAD")
    assert (ranged.status, ranged.length, ranged.headers.get_all("Content-Length")) == (200, 0, ["1048583"])
    assert "Content-Range" not in ranged.headers


@pytest.mark.parametrize(("first", "last"), [(0, 9), (65_530, 65_536)])
def test_a_range_gets_206_and_those_bytes(through: Stack, first: int, last: int) -> None:
    answer = through.get("/mogilefs/sizes/65537.mp4", {"Range": f"bytes={first}-{last}"})
    assert answer.status == 206
    assert answer.start == pattern_bytes(first, last)
    assert answer.headers["Content-Range"] == f"bytes {first}-{last}/65537"


@pytest.mark.parametrize(("range_header", "first", "last"), [("BYTES=0-9", 0, 9), ("bytes = 5-9", 5, 9),
                                                          ("bytes=-3", 65_534, 65_536)])
def test_a_range_the_storage_node_reads_otherwise_gets_206_and_those_bytes(through: Stack, range_header: str,
                                                                           first: int, last: int) -> None:
    """mogstored reads only ``bytes=a-b`` so spelled, and a suffix as the first bytes: such a range
    is served by the application, not sent on (through Perlbal, its whole file was a 503)."""
    answer = through.get("/mogilefs/sizes/65537.mp4", {"Range": range_header})
    assert (answer.status, answer.headers["Content-Range"]) == (206, f"bytes {first}-{last}/65537")
    assert answer.start == pattern_bytes(first, last)


@pytest.mark.parametrize("range_header", ["bytes=" + "0" * 1100 + "5-9", "bytes=" + ",".join(["5-9"] * 300)],
                         ids=["zero-padded", "a-list"])
def test_a_range_too_long_to_read_gets_all_of_the_file(through: Stack, range_header: str) -> None:
    answer = through.get("/mogilefs/sizes/65537.mp4", {"Range": range_header})
    assert (answer.status, answer.length, answer.md5) == (200, 65537, pattern_md5(65537))
    assert "Content-Range" not in answer.headers


def test_an_invalid_range_is_ignored_not_the_storage_nodes_416(through: Stack) -> None:
    answer = through.get("/mogilefs/sizes/65537.mp4", {"Range": "bytes=9-0"})
    assert (answer.status, answer.length, answer.start) == (200, 65537, pattern_bytes(0, 1023))
    assert "Content-Range" not in answer.headers


@pytest.mark.parametrize("range_header", ["bytes=65537-", "bytes=70000-70010"])
def test_a_range_past_the_end_is_the_applications_416(through: Stack, range_header: str) -> None:
    """Not the storage node's, which the proxy would send with the file's type and ETag."""
    path = "/mogilefs/sizes/65537.mp4"
    earlier = len(through.app_requests(path))
    answer = through.get(path, {"Range": range_header})
    assert answer.status == 416 and answer.headers["Content-Range"] == "bytes */65537"
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    [(status, sent)] = through.app_requests(path)[earlier:]
    assert status == "416" and sent == answer.length > 0
    assert_error_fields(through.get_fields(path, {"Range": range_header}), 416)


def assert_error_fields(reply: HTTPReply, status: int) -> None:
    """An error answer read off the socket: each header once, a text body, none of the file's headers."""
    names = [name for name, _ in reply.fields]
    assert reply.status == status and len(names) == len(set(names)), reply.fields
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"
    assert not {"content-disposition", "content-security-policy", "x-reproxy-expected-size"} & set(names)


def test_the_etag_revalidates_to_304_and_another_version_is_412(through: Stack) -> None:
    etag = through.get("/mogilefs/sizes/65535.mp4").headers["ETag"]
    assert etag
    answer = through.get("/mogilefs/sizes/65535.mp4", {"If-None-Match": etag})
    assert (answer.status, answer.length) == (304, 0)
    assert through.get("/mogilefs/sizes/65535.mp4", {"If-Match": '"fid-0"'}).status == 412
    failed = through.get_fields("/mogilefs/sizes/65535.mp4", {"If-Match": '"fid-0"'})
    assert_error_fields(failed, 412)
    assert "etag" not in failed.headers
    answer = through.get("/mogilefs/sizes/65535.mp4", {"If-Match": etag})
    assert (answer.status, answer.length) == (200, 65535)


def test_an_unknown_key_is_the_applications_404(through: Stack) -> None:
    assert through.get("/mogilefs/sizes/none.mp4").status == 404


def test_a_client_expecting_100_continue_gets_the_answer(through: Stack) -> None:
    """Perlbal passes ``Expect: 100-continue`` on in an HTTP/1.0 request, and took the ``100
    Continue`` uvicorn sent when the middleware first asked whether the client was still there
    for the answer: its client got that and a closed connection, for every key not looked up yet."""
    for n in range(3):
        assert through.get(f"/mogilefs/sizes/none-{n}-{time.monotonic()}.mp4", {"Expect": "100-continue"}).status == 404
    answer = through.get("/mogilefs/sizes/65537.mp4", {"Expect": "100-continue", "Range": "bytes=1-2"})
    assert (answer.status, answer.start) == (206, pattern_bytes(1, 2))
    with socket.create_connection(("127.0.0.1", through.backend_port), timeout=10) as sock:
        sock.sendall(b"GET /mogilefs/sizes/none.mp4 HTTP/1.0\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(13) in (b"HTTP/1.1 404 ", b"HTTP/1.0 404 ")  # no 100 to an HTTP/1.0 client


def test_a_fragment_in_the_request_target_is_not_part_of_the_key(through: Stack) -> None:
    """No browser sends one, but both proxies pass it on (and uvicorn keeps it in the path)."""
    reply = get_with(through.proxy_port, "/mogilefs/sizes/1.mp4#frag", {})
    assert (reply.status, reply.body) == (200, b"\x00")


def test_the_proxy_fetches_the_file_whatever_the_clients_address(through: Stack) -> None:
    """The middleware trusts the proxy's own address: neither the client's address (which Perlbal
    sends as X-Forwarded-For) nor a forwarded-for header the client sends itself (which the shipped
    nginx.conf passes on) may turn reproxying off. (uvicorn runs with --no-proxy-headers, as the
    README says it must: by default it puts X-Forwarded-For in place of the proxy's address.)"""
    path = "/mogilefs/sizes/65535.mp4"
    replies = [get_with(through.proxy_port, path, {}, source="127.0.0.2"),
               get_with(through.proxy_port, path, {"X-Forwarded-For": "203.0.113.9"})]
    assert [(reply.status, len(reply.body)) for reply in replies] == [(200, 65_535)] * 2
    assert through.app_requests(path)[-2:] == [("200", 0)] * 2


# Failover, the reproxy cache and untrusted clients, each on a MogileFS of its own.


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_a_stopped_first_replica_is_skipped(server: str, front: str, devmogile: DevMogileFS, tmp_path: Path) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("photos/1.jpg", PHOTO, cls="avatar")
    with serving(devmogile, server, front, tmp_path) as stack:
        assert stack.get("/mogilefs/photos/1.jpg").md5 == PHOTO_MD5
        ports = reproxy_ports(stack, "/mogilefs/photos/1.jpg")
        assert len(ports) == 2
        next(node for node in devmogile.nodes if node.port == ports[0]).stop()

        answer = stack.get("/mogilefs/photos/1.jpg")
        assert (answer.status, answer.md5) == (200, PHOTO_MD5)
        assert answer.headers["Content-Type"] == "image/jpeg"
        assert answer.headers["ETag"]
        ranged = stack.get("/mogilefs/photos/1.jpg", {"Range": "bytes=0-9", "If-Range": answer.headers["ETag"]})
        assert (ranged.status, ranged.start) == (206, PHOTO[:10])
        # The middleware's cached answer still names the stopped node first: the proxy moved on.
        assert reproxy_ports(stack, "/mogilefs/photos/1.jpg") == ports


def test_a_client_pausing_longer_than_the_nodes_idle_timeout_gets_all_of_the_file_through_nginx(
        server: str, devmogile: DevMogileFS, tmp_path: Path) -> None:
    """mogstored closes a connection it could send nothing on for 30 s: when nginx read the node
    at its client's pace (proxy_max_temp_file_size 0), a client that paused got its download cut,
    as nginx cannot ask for the rest. nginx now takes the file at the node's pace."""
    with serving(paused_file_store(devmogile), server, "nginx", tmp_path) as stack:
        assert_whole_after_a_pause(stack.proxy_port)


def test_a_client_pausing_longer_than_the_nodes_idle_timeout_gets_all_of_the_file_in_serve_mode(
        server: str, devmogile: DevMogileFS, tmp_path: Path) -> None:
    """Off the server's socket: the middleware goes on from the replica (a Range from the byte it
    broke at) once the node closed the connection it could send nothing on."""
    env = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": paused_file_store(devmogile).trackers[0]}
    with logged_server(server, env, tmp_path / "access.log") as app:
        assert_whole_after_a_pause(app.port)


#: The file a paused client downloads: more than the kernel's buffers between the node and it.
PAUSED_SIZE = 16 * 1024 * 1024


def paused_file_store(devmogile: DevMogileFS) -> DevMogileFS:
    """``devmogile`` holding ``paused.mp4`` (:data:`PAUSED_SIZE`, one replica), its nodes closing
    a connection they could send nothing on for 0.5 s, as mogstored does after 30 s."""
    Client(DOMAIN, devmogile.trackers).store_file("paused.mp4", PatternFile(PAUSED_SIZE), cls="thumb")
    for node in devmogile.nodes:
        node.stop()
        node.idle_timeout = 0.5
        node.start()
    return devmogile


def assert_whole_after_a_pause(port: int) -> None:
    """GET ``paused.mp4`` from ``port``, read nothing for 3 s after the first piece, then the rest: all of it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /mogilefs/paused.mp4 HTTP/1.1\r\nHost: media\r\nConnection: close\r\n\r\n")
        received = sock.recv(64 * 1024)
        time.sleep(3)  # the client reads nothing
        while piece := sock.recv(1024 * 1024):
            received += piece
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200" and f"content-length: {PAUSED_SIZE}".encode() in head.lower()
    assert len(body) == PAUSED_SIZE and hashlib.md5(body).hexdigest() == pattern_md5(PAUSED_SIZE)


def test_perlbal_passes_over_a_truncated_replica_for_a_range_too(server: str, devmogile: DevMogileFS,
                                                                 tmp_path: Path) -> None:
    """The middleware tells Perlbal the size of the part a range asks for, so a short replica (a
    truncated .fid file) is passed over as it is for a whole-file GET."""
    Client(DOMAIN, devmogile.trackers).store_content("photos/3.jpg", PHOTO, cls="avatar")
    with serving(devmogile, server, "perlbal", tmp_path) as stack:
        first_url = stack.direct("/mogilefs/photos/3.jpg").headers["X-REPROXY-URL"].split()[0]
        node = next(node for node in devmogile.nodes if node.port == urlsplit(first_url).port)
        (node.docroot / urlsplit(first_url).path.lstrip("/")).write_bytes(PHOTO[:20])
        ranged = stack.get("/mogilefs/photos/3.jpg", {"Range": "bytes=10-40"})
        assert (ranged.status, ranged.start) == (206, PHOTO[10:41])


def test_nginx_passes_over_a_replica_too_short_for_a_range(server: str, devmogile: DevMogileFS,
                                                           tmp_path: Path) -> None:
    """A range past the end of a truncated first replica: that node's 416 sends nginx to the
    second replica, as a 404 or a 5xx does (the application answers a range past the file's
    end itself, so a node's 416 is a damaged replica's)."""
    Client(DOMAIN, devmogile.trackers).store_content("photos/4.jpg", PHOTO, cls="avatar")
    with serving(devmogile, server, "nginx", tmp_path) as stack:
        first_port = reproxy_ports(stack, "/mogilefs/photos/4.jpg")[0]
        node = next(node for node in devmogile.nodes if node.port == first_port)
        [path] = [urlsplit(url).path for url in Client(DOMAIN, devmogile.trackers).get_paths("photos/4.jpg")
                  if urlsplit(url).port == first_port]
        (node.docroot / path.lstrip("/")).write_bytes(PHOTO[:20])
        ranged = stack.get("/mogilefs/photos/4.jpg", {"Range": "bytes=30-40"})
        assert (ranged.status, ranged.start) == (206, PHOTO[30:41])


def test_perlbal_answers_cached_keys_without_the_application(server: str, devmogile: DevMogileFS,
                                                            tmp_path: Path) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("photos/2.jpg", PHOTO, cls="avatar")
    with serving(devmogile, server, "perlbal", tmp_path, MOGILE_PERLBAL_CACHE_SECONDS="30") as stack:
        answers = [stack.get("/mogilefs/photos/2.jpg") for _ in range(5)]
        assert stack.app_requests("/mogilefs/photos/2.jpg") == [("200", 0)]
    for answer in answers:
        assert (answer.status, answer.md5) == (200, PHOTO_MD5)
        # A cache hit carries only the headers that X-REPROXY-CACHE-FOR names: every one of the file's.
        assert (answer.headers["Content-Type"], answer.headers["ETag"]) == ("image/jpeg", answers[0].headers["ETag"])
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Accept-Ranges"] == "bytes"


def test_perlbals_cache_keeps_an_uploads_sandbox(server: str, devmogile: DevMogileFS, tmp_path: Path) -> None:
    """A user's SVG runs script on the site's origin without its sandbox: a cache hit keeps it."""
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.domain)</script></svg>'
    Client(DOMAIN, devmogile.trackers).store_content("uploads/evil.svg", svg, cls="avatar")
    with serving(devmogile, server, "perlbal", tmp_path, MOGILE_PERLBAL_CACHE_SECONDS="30",
                 MOGILE_CONTENT_DISPOSITION="attachment") as stack:
        answers = [stack.get("/mogilefs/uploads/evil.svg") for _ in range(3)]
        assert stack.app_requests("/mogilefs/uploads/evil.svg") == [("200", 0)]
    for answer in answers:
        assert answer.status == 200 and answer.headers["Content-Security-Policy"] == "sandbox"
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Content-Disposition"] == 'attachment; filename="evil.svg"'


def test_nginx_asking_again_passes_a_views_headers_on_once(server: str, devmogile: DevMogileFS, tmp_path: Path) -> None:
    """Another process overwrites the key a view serves: its replicas given to nginx are gone, so
    nginx asks the application again, and holds the first answer's headers meanwhile."""
    writer = Client(DOMAIN, devmogile.trackers)
    writer.store_content("viewed.txt", b"version 1\n" * 100, "avatar")
    user = {"X-Test-User": "allowed"}
    with serving(devmogile, server, "nginx", tmp_path) as stack:
        assert stack.get("/view/viewed.txt?download=mine.txt", user).status == 200  # its replicas cached
        writer.store_content("viewed.txt", b"version 2, longer\n" * 100, "avatar")  # the old files go at once
        again = stack.get_fields("/view/viewed.txt?download=mine.txt", user)
        assert (again.status, again.body) == (200, b"version 2, longer\n" * 100)
        names = [name.lower() for name, _ in again.fields]
        assert [name for name in set(names) if names.count(name) > 1 and name != "cache-control"] == []
        assert {"set-cookie", "content-disposition", "etag"} <= set(names)
        assert all(value == "private" for name, value in again.fields if name.lower() == "cache-control")


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_a_middleware_inside_another_is_reproxied_through_the_proxy(server: str, front: str, devmogile: DevMogileFS,
                                                                   tmp_path: Path) -> None:
    """Two prefixes, a middleware each, one inside the other: the outer one took the inner one's
    reproxy headers for the application's and dropped them, and the client got an empty file."""
    Client(DOMAIN, devmogile.trackers).store_content("photos/4.jpg", PHOTO, cls="avatar")
    with serving(devmogile, server, front, tmp_path, MOGILE_INNER_PREFIX="/thumbs/") as stack:
        for path in ("/thumbs/photos/4.jpg", "/mogilefs/photos/4.jpg"):
            reply = stack.get_fields(path)
            names = [name.lower() for name, _ in reply.fields]
            assert (reply.status, hashlib.md5(reply.body).hexdigest()) == (200, PHOTO_MD5), path
            assert len(names) == len(set(names)), reply.fields
            assert stack.app_requests(path) == [("200", 0)]  # the proxy fetched it


def test_perlbals_cache_never_answers_for_a_view(server: str, devmogile: DevMogileFS, tmp_path: Path) -> None:
    """A view checks who asks each time: its file is not left in Perlbal's cache for the next client."""
    Client(DOMAIN, devmogile.trackers).store_content("private/invoice.txt", b"alice's invoice", cls="avatar")
    with serving(devmogile, server, "perlbal", tmp_path, MOGILE_PERLBAL_CACHE_SECONDS="30") as stack:
        allowed = stack.get("/view/private/invoice.txt", {"X-Test-User": "allowed"})
        refused = stack.get("/view/private/invoice.txt")
        assert stack.app_requests("/view/private/invoice.txt") == [("200", 0), ("403", len(b"not yours\n"))]
    assert (allowed.status, allowed.length) == (200, len(b"alice's invoice"))
    assert refused.status == 403 and b"alice" not in refused.start


def test_a_view_answering_a_post_with_a_range_sends_the_file_whole(through: Stack) -> None:
    """The POST's Range is not the file's (RFC 9110 14.2): the application sends the whole file
    itself, since the proxy would pass that Range on to the storage node."""
    path = "/view/sizes/65537.mp4"
    earlier = len(through.app_requests(path))
    answer = through.get(path, {"X-Test-User": "allowed", "Range": "bytes=0-9"}, method="POST")
    assert (answer.status, answer.length, answer.md5) == (200, 65537, pattern_md5(65537))
    assert "Content-Range" not in answer.headers
    assert through.app_requests(path)[earlier:] == [("200", 65537)]


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_only_the_proxy_gets_reproxy_headers(server: str, front: str, devmogile: DevMogileFS, tmp_path: Path) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("photos/3.jpg", PHOTO, cls="avatar")
    # Client and proxy share 127.0.0.1: the proxy is told apart by the request header it adds.
    with serving(devmogile, server, front, tmp_path, MOGILE_REQUIRE_PROXY_HEADER="1") as stack:
        direct = stack.direct("/mogilefs/photos/3.jpg")
        assert (direct.status, direct.md5) == (200, PHOTO_MD5)
        assert not [name for name in direct.headers if name.lower().startswith(("x-reproxy", "x-accel"))]
        assert stack.get("/mogilefs/photos/3.jpg").md5 == PHOTO_MD5
        assert stack.app_requests("/mogilefs/photos/3.jpg") == [("200", len(PHOTO)), ("200", 0)]


@pytest.mark.parametrize("front", ["perlbal", "nginx"])
def test_a_range_of_another_version_gets_the_whole_file(server: str, front: str, devmogile: DevMogileFS,
                                                        tmp_path: Path) -> None:
    """A resumed download whose key was overwritten meanwhile: the whole new file, never a splice."""
    Client(DOMAIN, devmogile.trackers).store_content("photos/4.jpg", PHOTO, cls="avatar")
    with serving(devmogile, server, front, tmp_path) as stack:
        etag = stack.get("/mogilefs/photos/4.jpg").headers["ETag"]
        same = stack.get("/mogilefs/photos/4.jpg", {"Range": "bytes=0-9", "If-Range": etag})
        assert (same.status, same.start) == (206, PHOTO[:10])
        # Another version, this one's as a weak ETag (which never matches), a date (the application sends none).
        for other in ('"fid-0"', f"W/{etag}", "Tue, 01 Dec 2026 23:09:04 GMT"):
            answer = stack.get("/mogilefs/photos/4.jpg", {"Range": "bytes=0-9", "If-Range": other})
            assert (answer.status, answer.md5) == (200, PHOTO_MD5), other


# What browsers are told about users' files: every header once, from either replica.


CACHE_CONTROL = "public, max-age=600"
#: A key, and the headers its answer carries besides the ones every file gets (None: absent).
POLICY_CASES = [
    pytest.param("evil.html", {"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": "sandbox",
                               "Content-Disposition": 'attachment; filename="evil.html"'}, id="html"),
    pytest.param("evil.svg", {"Content-Type": "image/svg+xml; charset=utf-8", "Content-Security-Policy": "sandbox",
                              "Content-Disposition": 'attachment; filename="evil.svg"'}, id="svg"),
    pytest.param("evil.js", {"Content-Type": "text/plain; charset=utf-8", "Content-Security-Policy": None,
                             "Content-Disposition": 'attachment; filename="evil.js"'}, id="js"),
    pytest.param("dir/naïve résumé.pdf", {
        "Content-Type": "application/pdf", "Content-Security-Policy": None,
        "Content-Disposition": 'attachment; filename="na_ve r_sum_.pdf"; '
                               "filename*=UTF-8''na%C3%AFve%20r%C3%A9sum%C3%A9.pdf",
    }, id="non-ascii-name"),
    # A right-to-left override would show the name as "invoiceexe.png": left out of both names.
    pytest.param("invoice\u202egnp.exe", {"Content-Type": "application/octet-stream", "Content-Security-Policy": None,
                                          "Content-Disposition": 'attachment; filename="invoicegnp.exe"'},
                 id="bidirectional-override"),
]


def content_of(key: str) -> bytes:
    """What ``key`` holds: a script, which no browser may run on the site."""
    return f"<script>alert('{key}')</script>\n".encode()


@pytest.fixture(scope="module", params=sorted(FRONTS))
def policed(request: pytest.FixtureRequest, server: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, DevMogileFS]]:
    """Each front proxy before the middleware (under each server) with a Cache-Control and
    attachments, and the MogileFS holding every key of :data:`POLICY_CASES` on both its nodes."""
    with DevMogileFS(tmp_path_factory.mktemp("mogdata"), domains={DOMAIN: CLASSES}) as mogile:
        client = Client(DOMAIN, mogile.trackers)
        keys = [str(case.values[0]) for case in POLICY_CASES]
        for key in keys:
            client.store_content(key, content_of(key), cls="avatar")
        # The tracker copies a new file in the background, and the middleware would cache one path.
        copied = eventually(lambda: [len(client.get_paths(key)) for key in keys], lambda counts: set(counts) == {2})
        assert set(copied) == {2}
        with serving(mogile, server, request.param, tmp_path_factory.mktemp(request.param),
                     MOGILE_CACHE_CONTROL=CACHE_CONTROL, MOGILE_CONTENT_DISPOSITION="attachment") as stack:
            yield stack, mogile


@pytest.mark.parametrize("replica", ["first", "second"])
@pytest.mark.parametrize(("key", "expected"), POLICY_CASES)
def test_every_file_header_arrives_once_from_either_replica(policed: tuple[Stack, DevMogileFS], key: str,
                                                            expected: dict[str, str | None], replica: str) -> None:
    stack, mogile = policed
    path = "/mogilefs/" + quote(key)
    # The fid's ETag is the one validator: each replica has its own Last-Modified, of its node.
    expected = {**expected, "Cache-Control": CACHE_CONTROL, "X-Content-Type-Options": "nosniff",
                "ETag": stack.direct(path).headers["ETag"], "Last-Modified": None, "Accept-Ranges": "bytes"}
    with ExitStack() as stopped:
        if replica == "second":
            # nginx gets there through error_page (@reproxy2), where the application's headers are gone.
            # A node stopped by an earlier test may have left a one-path answer cached for a moment.
            ports = eventually(lambda: reproxy_ports(stack, path), lambda ports: len(ports) == 2, timeout=10)
            assert len(ports) == 2
            node = next(node for node in mogile.nodes if node.port == ports[0])
            node.stop()
            stopped.callback(node.start)
        reply = stack.get_fields(path)
    assert (reply.status, reply.body) == (200, content_of(key))
    for name, value in expected.items():
        assert [got for field, got in reply.fields if field == name.lower()] == ([value] if value else []), name


# nginx does not trust the storage nodes, and keeps its internal location to itself.


NODE_BODY = b"the bytes of the file, from the storage node\n"
#: What the client sends nginx, of which a storage node needs only the Range (If-Range is nginx's to check).
CLIENT_HEADERS = {"Cookie": "session=s3cret", "Authorization": "Basic dXNlcjpwYXNz", "User-Agent": "test",
                  "Range": "bytes=0-4", "If-Range": STAND_IN_ETAG}


class MeddlingNode(http.server.ThreadingHTTPServer):
    """A storage node that records the header fields of each request, and answers with the file
    and headers that would make nginx serve an internal page, set a cookie and stop buffering."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _MeddlingHandler)
        self.requests: list[list[tuple[str, str]]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}/dev1/0/000/000/0000000001.fid"


class _MeddlingHandler(http.server.BaseHTTPRequestHandler):
    server: MeddlingNode

    def do_GET(self) -> None:
        self.server.requests.append([(name.lower(), value) for name, value in self.headers.items()])
        self.send_response(200)
        for name, value in (("Content-Type", "text/plain"), ("Content-Length", str(len(NODE_BODY))),
                            ("X-Accel-Redirect", "/secret/"), ("Set-Cookie", "a=b"), ("X-Accel-Buffering", "no")):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(NODE_BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def nginx_before_replicas(urls: list[str]) -> Iterator[Proxy]:
    """nginx before a stand-in for the middleware that sends every ``/mogilefs/`` path to ``urls``."""
    with (run_gunicorn({"MOGILE_REPLICA_URLS": " ".join(urls)}, app="_gunicorn_app:make_reproxying_app()") as app,
          run_nginx_front(app.port) as nginx):
        yield nginx


@pytest.fixture(params=["first", "second"])
def meddling(request: pytest.FixtureRequest) -> Iterator[tuple[Proxy, MeddlingNode]]:
    """nginx sent to a :class:`MeddlingNode` as the first replica, or as the second after one that refuses."""
    node = MeddlingNode()
    thread = threading.Thread(target=node.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    refusing = f"http://127.0.0.1:{free_port()}/dev2/0/000/000/0000000001.fid"
    try:
        with nginx_before_replicas([node.url] if request.param == "first" else [refusing, node.url]) as nginx:
            yield nginx, node
    finally:
        node.shutdown()
        node.server_close()
        thread.join(5)


def test_a_storage_node_gets_only_the_headers_that_choose_the_bytes(meddling: tuple[Proxy, MeddlingNode]) -> None:
    nginx, node = meddling
    assert get_with(nginx.port, "/mogilefs/report.pdf", CLIENT_HEADERS).status == 200
    [received] = node.requests
    assert ("range", "bytes=0-4") in received
    assert {name for name, _ in received} == {"host", "connection", "range"}  # no Cookie, no Authorization


def test_a_storage_node_cannot_redirect_nginx_nor_set_cookies(meddling: tuple[Proxy, MeddlingNode]) -> None:
    nginx, _ = meddling
    reply = get_with(nginx.port, "/mogilefs/report.pdf", CLIENT_HEADERS)
    assert (reply.status, reply.body) == (200, NODE_BODY)  # not the page at /secret/
    names = [name for name, _ in reply.fields]
    assert "set-cookie" not in names
    assert not [name for name in names if name.startswith("x-accel")]
    assert [value for name, value in reply.fields if name == "content-type"] == ["application/pdf"]


def test_a_client_cannot_say_that_every_replica_failed(meddling: tuple[Proxy, MeddlingNode]) -> None:
    nginx, _ = meddling
    # The stand-in application answers 502 to X-Reproxy-Failed; the middleware would stream the file itself.
    reply = get_with(nginx.port, "/mogilefs/report.pdf", {"X-Reproxy-Failed": "1"})
    assert (reply.status, reply.body) == (200, NODE_BODY)


def test_only_the_exact_internal_location_is_nginxs_and_outside_requests_get_404() -> None:
    with nginx_before_replicas([f"http://127.0.0.1:{free_port()}/dev1/0/000/000/0000000001.fid"]) as nginx:
        report = get_with(nginx.port, "/reproxy-report", {})
        assert (report.status, report.body) == (200, APP_PAGES["/reproxy-report"])
        # nginx's own 404: the stand-in application answers 200, or 502 when nginx says X-Reproxy-Failed.
        for path in ("/reproxy", "/reproxy?x=1", "/metrics"):  # the metrics are not the public's either
            assert get_with(nginx.port, path, {}).status == 404, path
        assert get_with(nginx.port, "/metrics-page", {}).status == 200  # only that path


# Perlbal as the storage nodes.


def test_perlbal_storage_nodes_take_replicate_serve_and_delete_files(server: str, tmp_path: Path) -> None:
    docroots = [tmp_path / "stor1", tmp_path / "stor2"]
    size = 8 * MIB + 3
    node_urls: list[str] = []
    with ExitStack() as running:
        mogile = running.enter_context(DevMogileFS(tmp_path / "mogdata", storage_nodes=0, domains={DOMAIN: CLASSES}))
        for docroot in docroots:
            docroot.mkdir()
            node = running.enter_context(run_perlbal_storage(docroot))
            (docroot / f"dev{mogile.add_storage_node('127.0.0.1', node.port)}").mkdir()
            node_urls.append(node.url)
        client = Client(DOMAIN, mogile.trackers, storage_timeout=60)
        client.store_file("videos/1.mp4", PatternFile(size), cls="avatar")
        assert sorted(path.split("/dev")[0] for path in client.get_paths("videos/1.mp4")) == sorted(node_urls)

        # Uploaded to one node by PUT, copied to the other by the tracker: a file in each docroot.
        replicas = [list(docroot.rglob("*.fid")) for docroot in docroots]
        assert [len(files) for files in replicas] == [1, 1]
        assert {hashlib.md5(files[0].read_bytes()).hexdigest() for files in replicas} == {pattern_md5(size)}

        stack = running.enter_context(serving(mogile, server, "perlbal", tmp_path, MOGILE_REQUIRE_PROXY_HEADER="1"))
        for answer in (stack.direct("/mogilefs/videos/1.mp4"), stack.get("/mogilefs/videos/1.mp4")):
            assert (answer.status, answer.length, answer.md5) == (200, size, pattern_md5(size))
        for answer in (stack.direct("/mogilefs/videos/1.mp4", {"Range": "bytes=5-14"}),
                       stack.get("/mogilefs/videos/1.mp4", {"Range": "bytes=5-14"})):
            assert (answer.status, answer.start) == (206, pattern_bytes(5, 14))
        # Served by the middleware from a Perlbal node (body), then fetched by the Perlbal front (0).
        assert [sent for _, sent in stack.app_requests("/mogilefs/videos/1.mp4")] == [size, 0, 10, 0]

        client.delete("videos/1.mp4")
        assert not [path for docroot in docroots for path in docroot.rglob("*.fid")]
