"""What a client gets, read raw through a real gunicorn: types, script, ranges, and what a hostile
tracker, storage node or memcached entry cannot make of an answer."""

from __future__ import annotations

import pickle
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import DOMAIN, require_module
from integration._gunicorn import GunicornServer, run_gunicorn, run_uvicorn
from integration._memcached import start_memcached
from integration._wire_client import HTTPReply, read_http_reply
from pymemcache.client.base import Client as MemcacheClient
from wiretools import files_tracker

from mogile_middleware import Client
from mogile_middleware.cache import entry_key
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.memcache import MemcachedBackend

require_module("gunicorn")

FILES = {
    "data:text/html,x.png": "image/png",
    "data:text/€,x": "application/octet-stream",
    "notes/café.txt": "text/plain; charset=utf-8",
    "logs.tar.gz": "application/gzip",
    "logs.tgz": "application/gzip",
    "evil.html": "text/html; charset=utf-8",
    "evil.svg": "image/svg+xml; charset=utf-8",
    "evil.xml": "text/xml; charset=utf-8",
    "evil.js": "text/plain; charset=utf-8",
}
SANDBOXED = {"evil.html", "evil.svg", "evil.xml"}


def ask(server: GunicornServer, key: str, headers: dict[str, str] | None = None) -> HTTPReply:
    lines = [f"GET /mogilefs/{quote(key)} HTTP/1.1", "Host: media", "Connection: close",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        reply, _ = read_http_reply(sock, "GET")
    return reply


#: The same tests through both middlewares: WSGI under gunicorn, ASGI under uvicorn.
SERVERS = {"gunicorn": run_gunicorn, "uvicorn": run_uvicorn}


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest, devmogile: DevMogileFS) -> Iterator[GunicornServer]:
    client = Client(DOMAIN, devmogile.trackers)
    for key in FILES:
        client.store_content(key, b"0123456789", cls="thumb")
    with SERVERS[request.param]({"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0]}) as server:
        yield server


def test_types_come_from_the_extension_and_users_files_run_no_script(server: GunicornServer) -> None:
    for key, content_type in FILES.items():
        reply = ask(server, key)
        assert (reply.status, reply.headers["content-type"]) == (200, content_type), key
        assert ("content-security-policy" in reply.headers) is (key in SANDBOXED), key
        assert "content-encoding" not in reply.headers
        if key in SANDBOXED:
            assert reply.headers["content-security-policy"] == "sandbox"


@pytest.mark.parametrize(("range_header", "status", "body"), [
    pytest.param("bytes=-0", 416, None, id="empty-suffix"),
    pytest.param("bytes=0-1,5-6", 200, b"0123456789", id="several-ranges-ignored"),
    pytest.param("bytes=-3", 206, b"789", id="suffix"),
    pytest.param("bytes=8-100", 206, b"89", id="past-the-end"),
    pytest.param("bytes=10-", 416, None, id="from-the-end"),
])
def test_ranges_as_rfc_9110_says(server: GunicornServer, range_header: str, status: int, body: bytes | None) -> None:
    reply = ask(server, "notes/café.txt", {"Range": range_header})
    assert reply.status == status
    if body is not None:
        assert reply.body == body
    else:
        assert reply.headers["content-range"] == "bytes */10" and "cache-control" in reply.headers


def test_bad_replica_urls_from_a_tracker_are_skipped(devmogile: DevMogileFS) -> None:
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("good.txt", b"good bytes", cls="thumb")
    [good] = client.get_paths("good.txt")
    fid = int(good.rsplit("/", 1)[1].split(".")[0])
    bad = ["http://127.0.0.1:99999/dev1/x.fid", "http://127.0.0.1:abc/dev1/x.fid", "http://[::1/dev1/x.fid"]
    files = {f"good{n}.txt": (fid, 10, [url, good]) for n, url in enumerate(bad)}
    nothing_listens = "http://127.0.0.1:1/dev1/0/000/000/0000000001.fid"
    files["other.txt"] = (1, 10, [bad[0], nothing_listens])
    tracker = files_tracker(files)
    try:
        with run_gunicorn({"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": tracker.tracker}) as server:
            for key in files:
                reply = ask(server, key)
                assert (reply.status, reply.body) == ((502, reply.body) if key == "other.txt" else (200, b"good bytes"))
    finally:
        tracker.stop()


@pytest.mark.parametrize("run", [run_gunicorn, run_uvicorn], ids=["gunicorn", "uvicorn"])
def test_a_file_the_tracker_lists_no_replica_of_is_a_plain_502_saying_so(run) -> None:
    """After its only device was marked dead, mogilefsd 2.73 answers ``paths=0``: the answer said
    that no replica answered, though none had been asked."""
    tracker = files_tracker({"lost.txt": (7, 10, [])})
    try:
        with run({"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": tracker.tracker}) as server:
            replies = [ask(server, "lost.txt") for _ in range(3)]
    finally:
        tracker.stop()
    for reply in replies:
        assert reply.status == 502
        assert reply.body == b"502 Bad Gateway\nThe trackers list no usable replica of this file.\n"
        assert reply.headers["cache-control"] == "no-store" and "etag" not in reply.headers


@pytest.mark.parametrize("run", [run_gunicorn, run_uvicorn], ids=["gunicorn", "uvicorn"])
def test_a_domain_the_tracker_does_not_know_is_one_plain_502(devmogile: DevMogileFS, run) -> None:
    with run({"MOGILE_DOMAIN": "misspelt", "MOGILE_TRACKERS": devmogile.trackers[0]}) as server:
        reply = ask(server, "a.txt")
    assert (reply.status, reply.body) == (502, b"502 Bad Gateway\nThe tracker refused to look the file up.\n")
    names = [name for name, _ in reply.fields]
    assert names.count("content-length") == 1 and names.count("content-type") == 1
    assert reply.headers["cache-control"] == "no-store" and "etag" not in reply.headers


def test_a_dripping_tracker_costs_one_deadline_then_a_503(devmogile: DevMogileFS) -> None:
    """A tracker that sends its reply a byte at a time cannot hold a worker past ``io_timeout``."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(4096)
                for byte in b"OK paths=1&path1=http://127.0.0.1:1/dev1/0/000/000/0000000001.fid\r\n":
                    if stop.is_set():
                        break
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        break
                    time.sleep(0.2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        env = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": f"127.0.0.1:{listener.getsockname()[1]}",
               "MOGILE_IO_TIMEOUT": "1"}
        with run_gunicorn(env) as server:
            started = time.monotonic()
            reply = ask(server, "any.txt")
            assert reply.status == 503 and time.monotonic() - started < 3
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_forged_memcached_entry_is_a_miss_through_gunicorn(devmogile: DevMogileFS, tmp_path: Path) -> None:
    """A pickle payload and a foreign URL in memcached: the file comes from the tracker, nothing runs."""
    ran = tmp_path / "ran"

    class Boom:
        def __reduce__(self) -> tuple[object, ...]:
            return (ran.touch, ())

    Client(DOMAIN, devmogile.trackers).store_content("real.txt", b"the real bytes", cls="thumb")
    with start_memcached() as memcached:
        backend = MemcachedBackend(memcached.address)
        raw = MemcacheClient(memcached.address)
        env = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": devmogile.trackers[0], "MOGILE_MEMCACHED": memcached.address,
               "MOGILE_REPROXY": "nginx", "MOGILE_TRUSTED_PROXIES": "127.0.0.1"}
        with run_gunicorn(env) as server:
            memcached_key = backend._memcached_key(entry_key(DOMAIN, "real.txt"))
            raw.set(memcached_key, pickle.dumps((Boom(), 1e12)), noreply=False)
            first = ask(server, "real.txt")
            foreign = f'[1,"{entry_key(DOMAIN, "real.txt")}",1e12,["real.txt",' \
                      '["http://169.254.169.254/latest/meta-data/"],"fid-1",5,true]]'
            raw.set(memcached_key, foreign.encode(), noreply=False)
            second = ask(server, "real.txt")
    assert not ran.exists()
    for reply in (first, second):
        assert reply.status == 200 and "169.254" not in reply.headers["x-reproxy-url"]
        assert reply.headers["x-reproxy-url"].endswith(".fid")


@pytest.mark.parametrize("mode", ["perlbal", "nginx"])
@pytest.mark.parametrize("serving", sorted(SERVERS))
def test_the_reproxy_headers_name_as_many_replicas_as_were_asked_for(serving: str, mode: str) -> None:
    """A tracker listing five replicas of a key asked for two: all went into the headers (one
    X-REPROXY-URL of five, or X-Reproxy-URL-2 to -5), as they reach a proxy on the wire."""
    urls = [f"http://127.0.0.1:{7500 + n}/dev{n}/0/000/000/0000000001.fid" for n in range(1, 6)]
    tracker = files_tracker({"k.txt": (1, 10, urls)})
    env = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": tracker.tracker, "MOGILE_REPROXY": mode,
           "MOGILE_TRUSTED_PROXIES": "127.0.0.1"}
    proxy = {"X-Proxy-Capabilities": "reproxy-file"} if mode == "perlbal" else {"X-Sendfile-Type": "X-Accel-Redirect"}
    try:
        with SERVERS[serving](env) as server:
            reply = ask(server, "k.txt", proxy)
    finally:
        tracker.stop()
    reproxied = [(name.lower(), value) for name, value in reply.fields if name.lower().startswith("x-reproxy-url")]
    if mode == "perlbal":
        assert reproxied == [("x-reproxy-url", " ".join(urls[:2]))]
    else:
        assert reproxied == [("x-reproxy-url", urls[0]), ("x-reproxy-url-2", urls[1])]
