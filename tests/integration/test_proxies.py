"""End to end through the real front proxies: client → Perlbal or nginx → gunicorn with the middleware.

Debian's ``perlbal`` and ``nginx`` (with the shipped ``examples/nginx.conf``) run on loopback ports
in front of gunicorn; the files are in the development MogileFS, or on storage nodes that are
real Perlbal ``web_server``s, as mogstored runs them. Requests that reached the application are
read from gunicorn's access log, whatever the proxy; it also logs how many body bytes the
application sent, which is 0 when the proxy fetched the file itself.
"""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import CLASSES, DOMAIN
from integration._gunicorn import run_gunicorn
from integration._proxies import (
    Proxy,
    run_nginx_front,
    run_perlbal_front,
    run_perlbal_storage,
)
from wiretools import PatternFile, pattern_md5

from mogile_middleware import Client
from mogile_middleware.devserver import DevMogileFS

pytest.importorskip("gunicorn", reason="gunicorn is installed by the test command ('.[dev]')")

MIB = 1024 * 1024
#: Empty, one byte, either side of the 64 KiB chunks, and far beyond any proxy buffer.
SIZES = (0, 1, 65_535, 65_537, MIB + 7, 64 * MIB)
FRONTS: dict[str, Callable[[int], AbstractContextManager[Proxy]]] = {
    "perlbal": run_perlbal_front,
    "nginx": run_nginx_front,
}
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


@dataclass(frozen=True)
class Stack:
    """A front proxy before gunicorn (one sync worker) with the middleware, before a MogileFS."""

    proxy_port: int
    backend_port: int
    storage_ports: tuple[int, ...]
    access_log: Path

    def get(self, path: str, headers: Mapping[str, str] | None = None, method: str = "GET") -> Fetched:
        """A request through the proxy; fails if the answer shows a reproxy header or a storage URL."""
        fetched = fetch(self.proxy_port, path, headers, method)
        markers = (*INTERNAL_MARKERS, *(f"127.0.0.1:{port}" for port in self.storage_ports))
        exposed = [marker for marker in markers if marker in fetched.text()]
        assert not exposed, f"the client saw {exposed}: {fetched.text()}"
        return fetched

    def direct(self, path: str, headers: Mapping[str, str] | None = None) -> Fetched:
        """A request straight to gunicorn, past the proxy."""
        return fetch(self.backend_port, path, headers)

    def app_requests(self, path: str) -> list[tuple[str, int]]:
        """The requests for ``path`` that reached gunicorn, as ``(status, body bytes sent)``."""
        # One sync worker logs each request before it accepts the next: once this one is
        # answered, every earlier line is in the file.
        self.direct("/")
        lines = [line.split() for line in self.access_log.read_text().splitlines()]
        return [(status, int(sent)) for _, logged, status, sent in lines if logged == path]


@contextmanager
def serving(mogile: DevMogileFS, front: str, tmp: Path, **env: str) -> Iterator[Stack]:
    """gunicorn with the middleware reproxying for ``front`` (trusted on loopback), then the proxy."""
    access_log = tmp / "access.log"
    environment = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": mogile.trackers[0], "MOGILE_REPROXY": front,
                   "MOGILE_TRUSTED_PROXIES": "127.0.0.1", **env}
    logging = ["--access-logfile", str(access_log), "--access-logformat", ACCESS_LOG_FORMAT]
    assert mogile.store is not None
    storage_ports = tuple(device.http_port for device in mogile.store.devices())
    with run_gunicorn(environment, extra_args=logging) as gunicorn, FRONTS[front](gunicorn.port) as proxy:
        yield Stack(proxy.port, gunicorn.port, storage_ports, access_log)


def reproxy_ports(stack: Stack, path: str) -> list[int]:
    """The storage ports of the replica URLs the middleware gives the proxy for ``path``, in order."""
    # The test client is on loopback too, so gunicorn takes it for the trusted proxy.
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
def through(request: pytest.FixtureRequest, sized_files: DevMogileFS,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Each front proxy in turn, serving the files of ``sized_files``."""
    with serving(sized_files, request.param, tmp_path_factory.mktemp(request.param)) as stack:
        yield stack


def test_every_size_arrives_exact_and_is_fetched_by_the_proxy(through: Stack) -> None:
    for size in SIZES:
        path = f"/mogilefs/sizes/{size}.mp4"
        answer = through.get(path)
        assert (answer.status, answer.length, answer.md5) == (200, size, pattern_md5(size)), path
        assert answer.headers["Content-Length"] == str(size)
        assert answer.headers["Content-Type"] == "video/mp4"  # the application's, not the node's text/plain
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert through.app_requests(path) == [("200", 0)]  # the application sent headers only


def test_head_sends_the_headers_only(through: Stack) -> None:
    answer = through.get("/mogilefs/sizes/1048583.mp4", method="HEAD")
    assert (answer.status, answer.length) == (200, 0)
    assert answer.headers["Content-Length"] == "1048583"
    assert answer.headers["Content-Type"] == "video/mp4"


@pytest.mark.parametrize(("first", "last"), [(0, 9), (65_530, 65_536)])
def test_a_range_gets_206_and_those_bytes(through: Stack, first: int, last: int) -> None:
    answer = through.get("/mogilefs/sizes/65537.mp4", {"Range": f"bytes={first}-{last}"})
    assert answer.status == 206
    assert answer.start == pattern_bytes(first, last)
    assert answer.headers["Content-Range"] == f"bytes {first}-{last}/65537"


def test_the_etag_revalidates_to_304(through: Stack) -> None:
    etag = through.get("/mogilefs/sizes/65535.mp4").headers["ETag"]
    assert etag
    answer = through.get("/mogilefs/sizes/65535.mp4", {"If-None-Match": etag})
    assert (answer.status, answer.length) == (304, 0)


def test_an_unknown_key_is_the_applications_404(through: Stack) -> None:
    assert through.get("/mogilefs/sizes/none.mp4").status == 404


# Failover, the reproxy cache and untrusted clients, each on a MogileFS of its own.


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_a_stopped_first_replica_is_skipped(front: str, devmogile: DevMogileFS, tmp_path: Path) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("photos/1.jpg", PHOTO, cls="avatar")
    with serving(devmogile, front, tmp_path) as stack:
        assert stack.get("/mogilefs/photos/1.jpg").md5 == PHOTO_MD5
        ports = reproxy_ports(stack, "/mogilefs/photos/1.jpg")
        assert len(ports) == 2
        next(node for node in devmogile.nodes if node.port == ports[0]).stop()

        answer = stack.get("/mogilefs/photos/1.jpg")
        assert (answer.status, answer.md5) == (200, PHOTO_MD5)
        assert answer.headers["Content-Type"] == "image/jpeg"
        assert answer.headers["ETag"]
        # The middleware's cached answer still names the stopped node first: the proxy moved on.
        assert reproxy_ports(stack, "/mogilefs/photos/1.jpg") == ports


def test_perlbal_answers_cached_keys_without_the_application(devmogile: DevMogileFS, tmp_path: Path) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("photos/2.jpg", PHOTO, cls="avatar")
    with serving(devmogile, "perlbal", tmp_path, MOGILE_PERLBAL_CACHE_SECONDS="30") as stack:
        answers = [stack.get("/mogilefs/photos/2.jpg") for _ in range(5)]
        assert stack.app_requests("/mogilefs/photos/2.jpg") == [("200", 0)]
    for answer in answers:
        assert (answer.status, answer.md5) == (200, PHOTO_MD5)
        # A cache hit carries only the headers that X-REPROXY-CACHE-FOR names: these two.
        assert (answer.headers["Content-Type"], answer.headers["ETag"]) == ("image/jpeg", answers[0].headers["ETag"])


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_only_the_proxy_gets_reproxy_headers(front: str, devmogile: DevMogileFS, tmp_path: Path) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("photos/3.jpg", PHOTO, cls="avatar")
    # Client and proxy share 127.0.0.1: the proxy is told apart by the request header it adds.
    with serving(devmogile, front, tmp_path, MOGILE_REQUIRE_PROXY_HEADER="1") as stack:
        direct = stack.direct("/mogilefs/photos/3.jpg")
        assert (direct.status, direct.md5) == (200, PHOTO_MD5)
        assert not [name for name in direct.headers if name.lower().startswith(("x-reproxy", "x-accel"))]
        assert stack.get("/mogilefs/photos/3.jpg").md5 == PHOTO_MD5
        assert stack.app_requests("/mogilefs/photos/3.jpg") == [("200", len(PHOTO)), ("200", 0)]


# Perlbal as the storage nodes.


def test_perlbal_storage_nodes_take_replicate_serve_and_delete_files(tmp_path: Path) -> None:
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

        stack = running.enter_context(serving(mogile, "perlbal", tmp_path, MOGILE_REQUIRE_PROXY_HEADER="1"))
        for answer in (stack.direct("/mogilefs/videos/1.mp4"), stack.get("/mogilefs/videos/1.mp4")):
            assert (answer.status, answer.length, answer.md5) == (200, size, pattern_md5(size))
        for answer in (stack.direct("/mogilefs/videos/1.mp4", {"Range": "bytes=5-14"}),
                       stack.get("/mogilefs/videos/1.mp4", {"Range": "bytes=5-14"})):
            assert (answer.status, answer.start) == (206, pattern_bytes(5, 14))
        # Served by the middleware from a Perlbal node (body), then fetched by the Perlbal front (0).
        assert [sent for _, sent in stack.app_requests("/mogilefs/videos/1.mp4")] == [size, 0, 10, 0]

        client.delete("videos/1.mp4")
        assert not [path for docroot in docroots for path in docroot.rglob("*.fid")]
