"""Files changing under the middleware, through a real gunicorn (WSGI) or uvicorn (ASGI) read
with raw sockets.

Writers here are other processes' clients (no shared cache), over the development MogileFS in
its real-tracker-like mode: replicas follow a new file later, and an overwritten or deleted fid's
files vanish from the storage nodes later. Error answers are read byte for byte, since merged or
duplicated headers are invisible to WSGI-level tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from conftest import CLASSES, DOMAIN, require_module
from integration._gunicorn import GunicornServer, run_gunicorn, run_uvicorn
from integration._memcached import start_memcached
from integration._proxies import run_nginx_front, run_perlbal_front
from integration._wire_client import HTTPReply, eventually, free_port, http_request, read_http_reply
from wiretools import ScriptedTracker

from mogile_middleware import Client
from mogile_middleware.async_client import AsyncClient
from mogile_middleware.client import FileInfo
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.exceptions import KeyChangingError, UnknownKeyError
from mogile_middleware.locate import CONFIRMED_SECONDS, SETTLING_PAUSES, AsyncLocator, Location
from mogile_middleware.memcache import MemcachedBackend

require_module("gunicorn")

#: Seconds the development tracker waits before replicating and before deleting old files.
DELAY = 0.5
#: Seconds an overwrite leaves its key unknown, as mogilefsd's ``create_close`` does for a moment.
GAP = 0.25
CACHE_CONTROL = "public, max-age=3600"
#: Headers that describe a file: an error answer carries none of them (416: RFC 9110 allows ETag).
FILE_HEADERS = {"etag", "accept-ranges", "content-range", "x-reproxy-url", "x-accel-redirect"}

#: How the middleware is served: a gunicorn worker class and count (WSGI), or uvicorn (ASGI, one process).
UVICORN = ("uvicorn", 1)
WORKERS = [
    pytest.param(("sync", 1), id="sync-1"),
    pytest.param(("sync", 2), id="sync-2"),
    pytest.param(("gthread", 1), id="gthread-1"),
    pytest.param(("gthread", 2), id="gthread-2"),
    pytest.param(UVICORN, id="uvicorn-1"),
]
#: One of each server, for the tests that do not depend on the worker model.
SERVERS = [pytest.param(("sync", 1), id="gunicorn"), pytest.param(UVICORN, id="uvicorn")]


@pytest.fixture
def mogile(tmp_path: Path) -> Iterator[DevMogileFS]:
    with DevMogileFS(tmp_path / "mogdata", domains={DOMAIN: CLASSES}, replication_delay=DELAY) as mogile:
        yield mogile


@pytest.fixture
def gapped(tmp_path: Path) -> Iterator[DevMogileFS]:
    """The same, with overwrites that leave their key unknown for :data:`GAP` seconds."""
    with DevMogileFS(tmp_path / "mogdata", domains={DOMAIN: CLASSES}, replication_delay=DELAY,
                     overwrite_gap=GAP) as mogile:
        yield mogile


def serve(mogile: DevMogileFS, workers: tuple[str, int] = ("sync", 1), port: int | None = None, **env: str):
    kind, count = workers
    environment = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": mogile.trackers[0],
                   "MOGILE_CACHE_CONTROL": CACHE_CONTROL, **env}
    if kind == "uvicorn":
        assert count == 1, "run_uvicorn runs one process"
        return run_uvicorn(environment, port=port)
    extra = ["--worker-class", "gthread", "--threads", "4"] if kind == "gthread" else []
    return run_gunicorn(environment, workers=count, extra_args=extra, port=port)


def ask(server: GunicornServer, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> HTTPReply:
    """One request on a new connection, read raw (every header line kept)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        reply, _ = read_http_reply(sock, method, timeout=15)
    return reply


def names(reply: HTTPReply) -> list[str]:
    return [name for name, _ in reply.fields]


def assert_clean_error(reply: HTTPReply, status: int, method: str = "GET") -> None:
    """One framing header, none of a file's headers, and nothing a cache would keep."""
    assert reply.status == status, reply
    assert names(reply).count("content-length") == 1 and "transfer-encoding" not in names(reply), reply.fields
    assert int(reply.headers["content-length"]) == len(reply.body) or method == "HEAD"
    assert names(reply).count("content-type") == 1 and reply.headers["content-type"].startswith("text/plain")
    assert reply.headers.get("cache-control") == "no-store" and names(reply).count("cache-control") == 1
    allowed = {"etag", "accept-ranges", "content-range"} if status == 416 else set()
    assert not (FILE_HEADERS - allowed) & set(names(reply)), reply.fields


def old_files_gone(urls: list[str]) -> bool:
    return all(http_request(url, "HEAD").status == 404 for url in urls)


def wait_until_gone(urls: list[str]) -> None:
    assert eventually(lambda: old_files_gone(urls), bool, timeout=10 * DELAY + 5), f"{urls} still answer"


@pytest.mark.parametrize("workers", SERVERS)
def test_every_error_answer_is_framed_once_and_carries_no_file_headers(mogile: DevMogileFS,
                                                                       workers: tuple[str, int]) -> None:
    client = Client(DOMAIN, mogile.trackers)
    client.store_content("small.txt", b"0123456789", cls="thumb")
    client.store_content("gone.txt", b"soon unreachable", cls="thumb")
    with serve(mogile, workers) as server:
        assert_clean_error(ask(server, "/mogilefs/%ff"), 400)
        assert_clean_error(ask(server, "/mogilefs/no-such-key"), 404)
        assert_clean_error(ask(server, "/mogilefs/small.txt", "POST"), 405)
        assert ask(server, "/mogilefs/small.txt", "DELETE").headers["allow"] == "GET, HEAD"
        unsatisfiable = ask(server, "/mogilefs/small.txt", headers={"Range": "bytes=10-"})
        assert_clean_error(unsatisfiable, 416)
        assert unsatisfiable.headers["content-range"] == "bytes */10"
        assert_clean_error(ask(server, "/mogilefs/small.txt", headers={"If-Match": '"fid-0"'}), 412)
        ok = ask(server, "/mogilefs/gone.txt")
        assert (ok.status, ok.body, ok.headers["cache-control"]) == (200, b"soon unreachable", CACHE_CONTROL)
        for node in mogile.nodes:
            node.stop()
        assert_clean_error(ask(server, "/mogilefs/gone.txt"), 502)
        assert_clean_error(ask(server, "/mogilefs/gone.txt", headers={"Range": "bytes=0-3"}), 502)
        mogile.stop_tracker()
        unavailable = ask(server, "/mogilefs/never-asked.txt")
        assert_clean_error(unavailable, 503)
        assert unavailable.headers["retry-after"] == "5"


@pytest.mark.parametrize("workers", WORKERS)
def test_outside_overwrite_and_delete_heal_in_serve_mode(mogile: DevMogileFS, workers: tuple[str, int]) -> None:
    writer = Client(DOMAIN, mogile.trackers)  # another process: it shares no cache with the server
    writer.store_content("photo.png", b"first version", cls="avatar")
    with serve(mogile, workers) as server:
        for _ in range(2 * workers[1]):  # warm every worker's path cache
            assert ask(server, "/mogilefs/photo.png").body == b"first version"
        first_etag = ask(server, "/mogilefs/photo.png", "HEAD").headers["etag"]
        old_urls = writer.get_paths("photo.png")

        writer.store_content("photo.png", b"second version!", cls="avatar")
        wait_until_gone(old_urls)
        for _ in range(2 * workers[1]):
            full = ask(server, "/mogilefs/photo.png")
            assert (full.status, full.body) == (200, b"second version!")
            assert full.headers["etag"] != first_etag
            head = ask(server, "/mogilefs/photo.png", "HEAD")
            assert (head.status, head.headers["content-length"]) == (200, "15")
            part = ask(server, "/mogilefs/photo.png", headers={"Range": "bytes=7-"})
            assert (part.status, part.body) == (206, b"version!")

        old_urls = writer.get_paths("photo.png")
        writer.delete("photo.png")
        wait_until_gone(old_urls)
        for _ in range(2 * workers[1]):
            for method, headers in [("GET", {}), ("HEAD", {}), ("GET", {"Range": "bytes=0-1"})]:
                assert_clean_error(ask(server, "/mogilefs/photo.png", method, headers), 404, method)


@pytest.mark.parametrize("workers", SERVERS)
@pytest.mark.parametrize("mode", ["serve", "nginx", "perlbal"])
def test_a_412_or_416_is_decided_by_the_current_version_not_the_cached_one(
        mogile: DevMogileFS, workers: tuple[str, int], mode: str) -> None:
    """Another process made each file longer: a range past the cached length and an If-Match of
    the new version get the new file, not a 416 or 412 of the old one (nor through a proxy)."""
    writer = Client(DOMAIN, mogile.trackers)
    keys = ["matched.txt", "ranged.txt", "past.txt"]
    for key in keys:
        writer.store_content(key, b"1" * 100, cls="thumb")
    reproxy = {} if mode == "serve" else {"MOGILE_REPROXY": mode, "MOGILE_TRUSTED_PROXIES": "127.0.0.1"}
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serve(mogile, workers, **reproxy))
        run_front = run_nginx_front if mode == "nginx" else run_perlbal_front
        front: Any = server if mode == "serve" else stack.enter_context(run_front(server.port))

        def get(key: str, headers: dict[str, str] | None = None) -> HTTPReply:
            return ask(front, f"/mogilefs/{key}", headers=headers)

        for key in keys:
            assert get(key).status == 200  # its location cached
            writer.store_content(key, b"2" * 200, cls="thumb")
        etags = {key: f'"fid-{writer.file_info(key).fid}"' for key in keys}
        matched = get("matched.txt", {"If-Match": etags["matched.txt"]})
        assert (matched.status, matched.headers["etag"], matched.body) == (200, etags["matched.txt"], b"2" * 200)
        ranged = get("ranged.txt", {"Range": "bytes=150-199"})
        assert (ranged.status, ranged.headers["content-range"], ranged.body) == (206, "bytes 150-199/200", b"2" * 50)
        past = get("past.txt", {"Range": "bytes=200-"})
        assert_clean_error(past, 416)
        assert (past.headers["content-range"], past.headers["etag"]) == ("bytes */200", etags["past.txt"])
        assert_clean_error(get("past.txt", {"If-Match": '"fid-1"'}), 412)


def test_refusals_a_client_asks_for_cost_one_tracker_call_per_key_and_second(mogile: DevMogileFS) -> None:
    """412 and 416 are a client's to ask for at will: their confirmation is not asked again
    within a second, as the path cache keeps other answers from asking the trackers."""
    from mogile_middleware.middleware import MogileFSMiddleware

    class CountingClient(Client):
        asked = 0

        def file_info(self, key: str) -> FileInfo:  # type: ignore[override]
            CountingClient.asked += 1
            return super().file_info(key)

    Client(DOMAIN, mogile.trackers).store_content("asked.txt", b"x" * 10, cls="thumb")
    middleware = MogileFSMiddleware(lambda environ, start_response: [], client=CountingClient(DOMAIN, mogile.trackers))
    assert middleware.answer({"REQUEST_METHOD": "GET"}, "asked.txt").status.startswith("200")
    looked_up = CountingClient.asked
    for _ in range(20):
        refused = middleware.answer({"REQUEST_METHOD": "GET", "HTTP_RANGE": "bytes=10-"}, "asked.txt")
        assert refused.status.startswith("416")
        assert middleware.answer({"REQUEST_METHOD": "GET", "HTTP_IF_MATCH": '"x"'}, "asked.txt").status.startswith("412")
    assert CountingClient.asked == looked_up + 1
    time.sleep(CONFIRMED_SECONDS)
    assert middleware.answer({"REQUEST_METHOD": "GET", "HTTP_RANGE": "bytes=10-"}, "asked.txt").status.startswith("416")
    assert CountingClient.asked == looked_up + 2


def test_refusals_asked_at_once_on_an_event_loop_share_one_confirmation(mogile: DevMogileFS) -> None:
    """Under uvicorn each of the requests a confirmation was in flight for made its own: 30
    clients asking for 416s at once cost 30 tracker calls, taking the other requests' connections."""

    class SlowCountingClient(AsyncClient):
        asked = 0

        async def file_info(self, key: str) -> FileInfo:  # type: ignore[override]
            SlowCountingClient.asked += 1
            await asyncio.sleep(0.1)  # a tracker slow to answer: the others come meanwhile
            return await super().file_info(key)

    Client(DOMAIN, mogile.trackers).store_content("shared.txt", b"x" * 10, cls="thumb")

    async def confirm_at_once() -> list[Location]:
        client = SlowCountingClient(DOMAIN, mogile.trackers)
        try:
            locator = AsyncLocator(client, with_length=True)
            location = await locator.locate("shared.txt")
            before = SlowCountingClient.asked
            waiting = [asyncio.ensure_future(locator.confirmed(location)) for _ in range(30)]
            await asyncio.sleep(0.02)
            waiting.pop().cancel()  # a client gone leaves the confirmation to the others
            confirmed = await asyncio.gather(*waiting)
            assert SlowCountingClient.asked == before + 1
            await asyncio.sleep(0)
            assert not [kept for kept in (location.memo or {}).values() if isinstance(kept, asyncio.Task)]  # let go
            return confirmed
        finally:
            await client.aclose()

    confirmed = asyncio.run(confirm_at_once())
    assert len(confirmed) == 29 and all(location.length == 10 for location in confirmed)


def test_a_refusal_names_the_version_the_trackers_name_not_one_another_request_found(devmogile: DevMogileFS) -> None:
    """While a request confirms its cached version, another request finds a newer one and a third
    is written: the answer is the third's, not the one the other request left in the cache."""
    from mogile_middleware.middleware import MogileFSMiddleware

    writer = Client(DOMAIN, devmogile.trackers)
    writer.store_content("raced.txt", b"1" * 100, cls="thumb")
    meanwhile: list[Callable[[], object]] = []

    class Interleaved(Client):
        def file_info(self, key: str) -> FileInfo:  # type: ignore[override]
            if meanwhile:
                meanwhile.pop()()
            return super().file_info(key)

    middleware = MogileFSMiddleware(lambda environ, start_response: [],
                                    client=Interleaved(DOMAIN, devmogile.trackers))
    assert middleware.answer({"REQUEST_METHOD": "GET"}, "raced.txt").status.startswith("200")
    cached = middleware.locator.locate("raced.txt")

    def other_writes_and_requests() -> None:
        writer.store_content("raced.txt", b"2" * 200, cls="thumb")
        middleware.locator.relocate(cached)  # another request finds the second version
        writer.store_content("raced.txt", b"3" * 300, cls="thumb")

    meanwhile.append(other_writes_and_requests)
    answer = middleware.answer({"REQUEST_METHOD": "GET", "HTTP_RANGE": "bytes=300-"}, "raced.txt")
    assert answer.status.startswith("416") and ("Content-Range", "bytes */300") in answer.headers


def test_a_refusal_for_a_version_its_urls_name_is_confirmed_without_locating_the_key_anew() -> None:
    """Replica URLs a rewriting layer made name no fid: file_info's fid confirms their version all the same."""
    from mogile_middleware.middleware import MogileFSMiddleware

    def reply(line: bytes) -> bytes:
        if line.startswith(b"get_paths"):
            return b"OK paths=1&path1=http://127.0.0.1:1/files/k.bin\r\n"
        if line.startswith(b"file_info"):
            return b"OK fid=7&domain=testdom&class=thumb&key=k&length=10&devcount=1\r\n"
        return b"OK domains=1&domain1=testdom&domain1classes=1&domain1class1name=thumb&domain1class1mindevcount=1\r\n"

    tracker = ScriptedTracker(reply)
    try:
        middleware = MogileFSMiddleware(lambda environ, start_response: [], domain=DOMAIN, trackers=[tracker.tracker])
        assert middleware.answer({"REQUEST_METHOD": "GET", "HTTP_RANGE": "bytes=10-"}, "k").status.startswith("416")
    finally:
        tracker.stop()
    commands = [line.split()[0] for line in tracker.requests]
    assert (commands.count(b"get_paths"), commands.count(b"file_info")) == (1, 2)


def test_trackers_that_cannot_tell_the_classes_are_asked_again_only_after_a_pause(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A failing ``get_domains`` costs one request and one warning per pause, not per lookup;
    the copy counts learned before are kept meanwhile: a one-copy file stays complete, located
    with ``get_paths`` alone where no length is needed (Perlbal mode, every client trusted)."""
    from mogile_middleware import locate
    from mogile_middleware.middleware import MogileFSMiddleware

    domains_answer = [b"ERR failure Database+unavailable\r\n"]

    def reply(line: bytes) -> bytes:
        if line.startswith(b"get_paths"):
            return b"OK paths=1&path1=http://127.0.0.1:1/dev1/0/000/000/0000000007.fid\r\n"
        if line.startswith(b"file_info"):  # about the key asked, as mogilefsd answers
            key = parse_qs(line.split()[1].decode())["key"][0]
            return f"OK fid=7&domain=testdom&class=thumb&key={key}&length=10&devcount=1\r\n".encode()
        return domains_answer[0]

    def located(key: str) -> Location:
        middleware.locator.forget(key)
        return middleware.locator.locate(key)

    def asked(command: bytes) -> int:
        return sum(line.split()[0] == command for line in tracker.requests)

    monkeypatch.setattr(locate, "CLASSES_RETRY_SECONDS", 0.3)
    monkeypatch.setattr(locate, "CLASSES_SECONDS", 0.3)
    tracker = ScriptedTracker(reply)
    try:
        middleware = MogileFSMiddleware(lambda environ, start_response: [], domain=DOMAIN, trackers=[tracker.tracker],
                                        reproxy="perlbal")
        assert not any(located(f"k{n}").complete for n in range(5))  # one copy of an unknown class: replicating
        assert asked(b"get_domains") == 1
        warned = ("cannot learn the classes of 'testdom' (asked again in 0.3 s): "
                  "TrackerError('failure: Database unavailable')")
        assert [record.message for record in caplog.records].count(warned) == 1
        time.sleep(0.4)
        domains_answer[0] = (b"OK domains=1&domain1=testdom&domain1classes=1&domain1class1name=thumb"
                             b"&domain1class1mindevcount=1\r\n")
        assert located("k").complete and asked(b"get_domains") == 2
        time.sleep(0.4)  # the counts are due to be asked again
        domains_answer[0] = b"ERR failure Database+unavailable\r\n"
        file_infos = asked(b"file_info")
        assert located("k").complete and located("k2").complete
        assert (asked(b"get_domains"), asked(b"file_info")) == (3, file_infos)
    finally:
        tracker.stop()


def test_with_no_tracker_answering_412_and_416_are_decided_from_the_cached_paths(mogile: DevMogileFS) -> None:
    from mogile_middleware.middleware import MogileFSMiddleware

    Client(DOMAIN, mogile.trackers).store_content("kept.txt", b"x" * 10, cls="thumb")
    middleware = MogileFSMiddleware(lambda environ, start_response: [], domain=DOMAIN, trackers=mogile.trackers)
    assert middleware.answer({"REQUEST_METHOD": "GET"}, "kept.txt").status.startswith("200")
    mogile.stop_tracker()
    assert middleware.answer({"REQUEST_METHOD": "GET", "HTTP_RANGE": "bytes=10-"}, "kept.txt").status.startswith("416")
    assert middleware.answer({"REQUEST_METHOD": "GET", "HTTP_IF_MATCH": '"x"'}, "kept.txt").status.startswith("412")


def test_an_if_match_of_a_new_version_is_served_where_lengths_are_not_learned(devmogile: DevMogileFS) -> None:
    """nginx mode with every client trusted learns no length of a file with all its copies: the
    key located anew after another process's overwrite is served with the length file_info gives."""
    from mogile_middleware.middleware import MogileFSMiddleware

    writer = Client(DOMAIN, devmogile.trackers)
    writer.store_content("unmeasured.txt", b"old", cls="avatar")
    middleware = MogileFSMiddleware(lambda environ, start_response: [], domain=DOMAIN, trackers=devmogile.trackers,
                                    reproxy="nginx")
    assert middleware.answer({"REQUEST_METHOD": "GET"}, "unmeasured.txt").reproxy == "nginx"
    writer.store_content("unmeasured.txt", b"the new version", cls="avatar")
    etag = f'"fid-{writer.file_info("unmeasured.txt").fid}"'
    answer = middleware.answer({"REQUEST_METHOD": "GET", "HTTP_IF_MATCH": etag}, "unmeasured.txt")
    assert (answer.status, b"".join(answer.body)) == ("200 OK", b"the new version")


@pytest.mark.parametrize("workers", SERVERS)
def test_a_new_file_lists_its_second_replica_within_seconds(mogile: DevMogileFS, workers: tuple[str, int]) -> None:
    writer = Client(DOMAIN, mogile.trackers)
    with serve(mogile, workers, MOGILE_REPROXY="perlbal") as server:
        writer.store_content("new.png", b"fresh", cls="avatar")
        first = ask(server, "/mogilefs/new.png").headers["x-reproxy-url"].split()
        assert len(first) == 1  # the tracker knows one copy yet
        started = time.monotonic()
        urls = eventually(lambda: ask(server, "/mogilefs/new.png").headers["x-reproxy-url"].split(),
                          lambda urls: len(urls) == 2, timeout=10)
        assert len(urls) == 2, "the second replica never reached the reproxy answer"
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("workers", SERVERS)
def test_an_unknown_key_costs_one_tracker_call(mogile: DevMogileFS, tmp_path: Path, workers: tuple[str, int]) -> None:
    count_file = tmp_path / "lookups"
    with serve(mogile, workers, MOGILE_COUNT_FILE=str(count_file)) as server:
        for _ in range(100):
            assert ask(server, "/mogilefs/missing.txt").status == 404
        assert len(count_file.read_text().splitlines()) == 1


def answered(server: GunicornServer, path: str) -> tuple[int, bytes]:
    reply = ask(server, path)
    return reply.status, reply.body


def key_unknown(client: Client, key: str) -> bool:
    try:
        client.get_paths(key)
    except UnknownKeyError:
        return True
    return False


@pytest.mark.parametrize("workers", SERVERS)
def test_a_request_amid_an_outside_overwrite_gets_the_new_file_not_a_404(gapped: DevMogileFS,
                                                                         workers: tuple[str, int]) -> None:
    """The cached replicas are gone and the tracker, amid another overwrite, does not know the key
    for a moment: the middleware asks again rather than answer (and keep) a 404."""
    writer, watcher = Client(DOMAIN, gapped.trackers), Client(DOMAIN, gapped.trackers)
    writer.store_content("hot.png", b"one", cls="avatar")
    with serve(gapped, workers) as server:
        assert ask(server, "/mogilefs/hot.png").body == b"one"
        old_urls = writer.get_paths("hot.png")
        writer.store_content("hot.png", b"two", cls="avatar")
        wait_until_gone(old_urls)
        amid = overwritten_amid(writer, watcher, "hot.png", b"three", lambda: answered(server, "/mogilefs/hot.png"))
        assert amid == (200, b"three")
        assert ask(server, "/mogilefs/hot.png").body == b"three"


def overwritten_amid(writer: Client, watcher: Client, key: str, content: bytes,
                     asked: Callable[[], tuple[int, bytes]]) -> tuple[int, bytes]:
    """What ``asked`` answers while ``writer`` overwrites ``key`` with ``content`` and the tracker,
    amid that overwrite, does not know the key."""
    overwrite = threading.Thread(target=writer.store_content, args=(key, content, "avatar"))
    overwrite.start()
    try:
        assert eventually(lambda: key_unknown(watcher, key), bool, timeout=5, every=0.005)
        return asked()
    finally:
        overwrite.join(10)


@pytest.mark.parametrize("workers", SERVERS)
def test_a_key_marked_changed_in_memcached_is_not_missing_amid_another_overwrite(gapped: DevMogileFS,
                                                                                 workers: tuple[str, int]) -> None:
    """A writer sharing memcached left its mark where the key's location was; a request amid
    another writer's overwrite then asks again rather than answer (and keep) a 404."""
    writer, watcher = Client(DOMAIN, gapped.trackers), Client(DOMAIN, gapped.trackers)
    with start_memcached() as memcached, serve(gapped, workers, MOGILE_MEMCACHED=memcached.address) as server:
        marking = Client(DOMAIN, gapped.trackers, cache_backend=MemcachedBackend(memcached.address))
        marking.store_content("hot.png", b"one", cls="avatar")
        assert ask(server, "/mogilefs/hot.png").body == b"one"
        marking.store_content("hot.png", b"two", cls="avatar")
        amid = overwritten_amid(writer, watcher, "hot.png", b"three", lambda: answered(server, "/mogilefs/hot.png"))
        assert amid == (200, b"three")
        assert ask(server, "/mogilefs/hot.png").body == b"three"


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_a_key_written_by_the_middlewares_own_client_is_not_missing_amid_another_overwrite(
        gapped: DevMogileFS, kind: str) -> None:
    """The middleware's own write drops the key's location; a request amid another writer's
    overwrite then asks again rather than answer (and keep) a 404."""
    from mogile_middleware import asgi
    from mogile_middleware.middleware import MogileFSMiddleware

    writer, watcher = Client(DOMAIN, gapped.trackers), Client(DOMAIN, gapped.trackers)
    writer.store_content("own.txt", b"one", cls="avatar")
    if kind == "wsgi":
        middleware = MogileFSMiddleware(lambda environ, start_response: [], domain=DOMAIN, trackers=gapped.trackers)
        write = middleware.client.store_content

        def get() -> tuple[int, bytes]:
            answer = middleware.answer({"REQUEST_METHOD": "GET"}, "own.txt")
            return int(answer.status[:3]), b"".join(answer.body)
    else:
        asgi_middleware = asgi.MogileFSMiddleware(lambda scope, receive, send: None, domain=DOMAIN,
                                                  trackers=gapped.trackers)

        def write(key: str, content: bytes, cls: str) -> None:
            asyncio.run(asgi_middleware.client.store_content(key, content, cls))

        def get() -> tuple[int, bytes]:
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False} if not sent else \
                    await asyncio.sleep(3600)

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            asyncio.run(asyncio.wait_for(asgi_middleware(
                {"type": "http", "method": "GET", "path": "/mogilefs/own.txt", "raw_path": b"/mogilefs/own.txt",
                 "query_string": b"", "headers": [], "client": ("10.0.0.9", 5000), "root_path": ""},
                receive, send), 10))
            return sent[0]["status"], b"".join(message.get("body", b"") for message in sent[1:])

    assert get() == (200, b"one")
    write("own.txt", b"two", "avatar")
    assert overwritten_amid(writer, watcher, "own.txt", b"three", get) == (200, b"three")


@pytest.mark.parametrize("workers", SERVERS)
def test_a_deleted_key_is_asked_again_briefly_then_its_404_is_kept(mogile: DevMogileFS, tmp_path: Path,
                                                                   workers: tuple[str, int]) -> None:
    """Asking again about a key that existed a moment ago is bounded: a few asks, then one 404 kept."""
    count_file = tmp_path / "lookups"
    writer = Client(DOMAIN, mogile.trackers)
    writer.store_content("gone.png", b"soon deleted", cls="thumb")
    with serve(mogile, workers, MOGILE_COUNT_FILE=str(count_file)) as server:
        assert ask(server, "/mogilefs/gone.png").status == 200
        old_urls = writer.get_paths("gone.png")
        writer.delete("gone.png")
        wait_until_gone(old_urls)
        for _ in range(20):
            assert_clean_error(ask(server, "/mogilefs/gone.png"), 404)
        assert len(count_file.read_text().splitlines()) == 1 + 1 + len(SETTLING_PAUSES)


def test_a_key_overwritten_between_get_paths_and_file_info_is_asked_again(gapped: DevMogileFS) -> None:
    """get_paths names the old file; another client's overwrite then leaves the key unknown to
    file_info for a moment: that is a change, not a missing key."""
    from mogile_middleware.middleware import MogileFSMiddleware

    writer, watcher = Client(DOMAIN, gapped.trackers), Client(DOMAIN, gapped.trackers)
    writer.store_content("moving.txt", b"old", cls="thumb")
    overwrites: list[threading.Thread] = []

    class OverwrittenAfterGetPaths(Client):
        def get_paths(self, *args: object, **kwargs: object) -> list[str]:
            paths = super().get_paths(*args, **kwargs)  # type: ignore[arg-type]
            if not overwrites:
                overwrites.append(threading.Thread(target=writer.store_content, args=("moving.txt", b"new", "thumb")))
                overwrites[0].start()
                assert eventually(lambda: key_unknown(watcher, "moving.txt"), bool, timeout=5, every=0.005)
            return paths

    middleware = MogileFSMiddleware(lambda environ, start_response: [],
                                    client=OverwrittenAfterGetPaths(DOMAIN, gapped.trackers))
    try:
        answer = middleware.answer({"REQUEST_METHOD": "GET"}, "moving.txt")
        assert answer.status == "200 OK" and b"".join(answer.body) == b"new"
    finally:
        overwrites[0].join(10)


def test_after_a_lookup_the_key_kept_changing_through_one_unknown_key_is_not_missing(mogile: DevMogileFS) -> None:
    """A lookup that failed because the key changed between every get_paths and file_info
    (mogilefsd under 30 overwrites a second) is a 503 to try again in a second, and leaves no
    last known value: the next lookup still does not take one unknown_key for a missing key."""
    import dataclasses

    from mogile_middleware.middleware import MogileFSMiddleware

    Client(DOMAIN, mogile.trackers).store_content("busy.txt", b"busy", cls="thumb")
    tracker = {"changing": True, "unknown_once": False}

    class AsUnderOverwrites(Client):
        def file_info(self, key: str) -> FileInfo:  # type: ignore[override]
            info = super().file_info(key)
            return dataclasses.replace(info, fid=info.fid + 1) if tracker["changing"] else info

        def get_paths(self, key: str, *args: object, **kwargs: object) -> list[str]:
            if tracker["unknown_once"]:
                tracker["unknown_once"] = False
                raise UnknownKeyError("unknown_key", key)
            return super().get_paths(key, *args, **kwargs)  # type: ignore[arg-type]

    middleware = MogileFSMiddleware(lambda environ, start_response: [],
                                    client=AsUnderOverwrites(DOMAIN, mogile.trackers))
    busy = middleware.answer({"REQUEST_METHOD": "GET"}, "busy.txt")
    assert busy.status == "503 Service Unavailable" and ("Retry-After", "1") in busy.headers
    assert bytes(busy.body).endswith(b"The file is being replaced.\n")
    tracker.update(changing=False, unknown_once=True)
    answer = middleware.answer({"REQUEST_METHOD": "GET"}, "busy.txt")
    assert answer.status == "200 OK" and b"".join(answer.body) == b"busy"


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("then", ["agreeing", "unknown"])
def test_a_key_seen_changing_only_at_the_last_answer_is_asked_once_more_at_once(
        mogile: DevMogileFS, flavour: str, then: str) -> None:
    """A key deleted and written anew during a lookup: unknown for a while, then get_paths and
    file_info naming different versions at the last answer. It is asked once more at once: when
    the two answers agree, the file, not a 503; when it is unknown again, a 503 to try again (a
    key just seen changing is not called missing), and the next lookup finds it."""
    import dataclasses

    from mogile_middleware.locate import Locator

    Client(DOMAIN, mogile.trackers).store_content("reborn.txt", b"reborn", cls="thumb")
    # One answer per ask: a change first (the key exists), unknown until the last pause, a change again.
    script = ["changed", *["unknown"] * (len(SETTLING_PAUSES) - 1), "changed", *["unknown"] * (then == "unknown")]

    def unless_unknown(key: str) -> None:
        if script and script[0] == "unknown":
            script.pop(0)
            raise UnknownKeyError("unknown_key", key)

    def as_scripted(info: FileInfo) -> FileInfo:
        return dataclasses.replace(info, fid=info.fid + 1) if script and script.pop(0) == "changed" else info

    def locate_after_503(locate: Callable[[str], Any]) -> Any:
        if then == "unknown":
            with pytest.raises(KeyChangingError):
                locate("reborn.txt")
        return locate("reborn.txt")

    if flavour == "sync":
        class Scripted(Client):
            def get_paths(self, key: str, *args: Any, **kwargs: Any) -> list[str]:
                unless_unknown(key)
                return super().get_paths(key, *args, **kwargs)

            def file_info(self, key: str) -> FileInfo:  # type: ignore[override]
                return as_scripted(super().file_info(key))

        location = locate_after_503(Locator(Scripted(DOMAIN, mogile.trackers), with_length=True).locate)
    else:
        class AsyncScripted(AsyncClient):
            async def get_paths(self, key: str, *args: Any, **kwargs: Any) -> list[str]:
                unless_unknown(key)
                return await super().get_paths(key, *args, **kwargs)

            async def file_info(self, key: str) -> FileInfo:  # type: ignore[override]
                return as_scripted(await super().file_info(key))

        loop, client = asyncio.new_event_loop(), AsyncScripted(DOMAIN, mogile.trackers)
        try:
            locator = AsyncLocator(client, with_length=True)
            location = locate_after_503(lambda key: loop.run_until_complete(locator.locate(key)))
        finally:
            loop.run_until_complete(client.aclose())
            loop.close()
    assert not script and location.length == len(b"reborn") and location.paths


@pytest.mark.parametrize("shared", [False, True], ids=["in-process", "memcached"])
def test_with_missing_seconds_0_a_deleted_key_is_asked_again_briefly_only_once(
        mogile: DevMogileFS, shared: bool) -> None:
    """Nothing is kept of a key found missing, its expired location included: the next request
    asks once. In memcached its location was dropped with the mark of a change, and for 30 s
    each request of every process asked again through the pauses of a key being replaced (0.8 s)."""
    with contextlib.ExitStack() as stack:
        backend = MemcachedBackend(stack.enter_context(start_memcached()).address) if shared else None
        _missing_once(mogile, backend)


def _missing_once(mogile: DevMogileFS, backend: MemcachedBackend | None) -> None:
    from mogile_middleware.middleware import MogileFSMiddleware

    class CountingClient(Client):
        asked = 0

        def get_paths(self, *args: object, **kwargs: object) -> list[str]:
            CountingClient.asked += 1
            return super().get_paths(*args, **kwargs)  # type: ignore[arg-type]

    writer = Client(DOMAIN, mogile.trackers)
    writer.store_content("brief.txt", b"soon gone", cls="thumb")
    middleware = MogileFSMiddleware(lambda environ, start_response: [], missing_seconds=0, path_cache_seconds=0.5,
                                    client=CountingClient(DOMAIN, mogile.trackers), cache_backend=backend)
    answer = middleware.answer({"REQUEST_METHOD": "GET"}, "brief.txt")
    assert answer.status == "200 OK" and b"".join(answer.body) == b"soon gone"
    old_urls = writer.get_paths("brief.txt")
    writer.delete("brief.txt")
    wait_until_gone(old_urls)
    time.sleep(0.5)  # the cached location has expired, and is kept to be served stale
    for _ in range(3):
        assert middleware.answer({"REQUEST_METHOD": "GET"}, "brief.txt").status.startswith("404")
    assert CountingClient.asked == 1 + (1 + len(SETTLING_PAUSES)) + 2


def test_a_write_by_the_middlewares_own_client_is_seen_at_once(mogile: DevMogileFS) -> None:
    """The writer here is the middleware's own client: its write drops the "unknown" at once."""
    from mogile_middleware.middleware import MogileFSMiddleware

    middleware = MogileFSMiddleware(lambda environ, start_response: [], domain=DOMAIN, trackers=mogile.trackers)
    assert middleware.answer({"REQUEST_METHOD": "GET"}, "later.txt").status.startswith("404")
    middleware.client.store_content("later.txt", b"now here", cls="thumb")
    answer = middleware.answer({"REQUEST_METHOD": "GET"}, "later.txt")
    assert answer.status == "200 OK" and b"".join(answer.body) == b"now here"


def front_get(port: int, path: str, headers: dict[str, str] | None = None) -> HTTPReply:
    return http_request(f"http://127.0.0.1:{port}{path}", headers=headers)


@pytest.mark.parametrize("workers", SERVERS)
def test_through_nginx_an_outside_change_is_seen_once_the_old_files_are_gone(mogile: DevMogileFS,
                                                                             workers: tuple[str, int]) -> None:
    """nginx falls back to the application when every URL fails; the middleware looks again."""
    writer = Client(DOMAIN, mogile.trackers)
    writer.store_content("doc.txt", b"version one", cls="thumb")
    with serve(mogile, workers, MOGILE_REPROXY="nginx", MOGILE_TRUSTED_PROXIES="127.0.0.1",
               MOGILE_REQUIRE_PROXY_HEADER="1") as server, run_nginx_front(server.port) as nginx:
        assert front_get(nginx.port, "/mogilefs/doc.txt").body == b"version one"
        old_urls = writer.get_paths("doc.txt")
        writer.store_content("doc.txt", b"version two", cls="thumb")
        wait_until_gone(old_urls)
        for _ in range(3):
            reply = front_get(nginx.port, "/mogilefs/doc.txt")
            assert (reply.status, reply.body) == (200, b"version two")
            assert not any("x-reproxy" in name or "x-accel" in name for name in reply.headers)
        assert front_get(nginx.port, "/mogilefs/doc.txt", {"Range": "bytes=8-"}).body == b"two"
        old_urls = writer.get_paths("doc.txt")
        writer.delete("doc.txt")
        wait_until_gone(old_urls)
        assert front_get(nginx.port, "/mogilefs/doc.txt").status == 404


@pytest.mark.parametrize("workers", [pytest.param(("sync", 2), id="gunicorn"), pytest.param(UVICORN, id="uvicorn")])
@pytest.mark.parametrize("front", ["perlbal", "nginx"])
def test_a_writer_sharing_memcached_is_seen_through_the_proxy_at_once(mogile: DevMogileFS, front: str,
                                                                       workers: tuple[str, int]) -> None:
    """Perlbal answers 503 itself when every URL fails: only a writer that drops the shared entry
    (here a plain Client, as a script or another host would use) makes the change visible at once."""
    run_front = run_perlbal_front if front == "perlbal" else run_nginx_front
    with start_memcached() as memcached, serve(
        mogile, workers, MOGILE_REPROXY=front, MOGILE_TRUSTED_PROXIES="127.0.0.1",
        MOGILE_MEMCACHED=memcached.address,
    ) as server, run_front(server.port) as proxy:
        writer = Client(DOMAIN, mogile.trackers, cache_backend=MemcachedBackend(memcached.address))
        writer.store_content("pic.png", b"old picture", cls="thumb")
        for _ in range(4):
            assert front_get(proxy.port, "/mogilefs/pic.png").body == b"old picture"
        old_urls = writer.get_paths("pic.png")
        writer.store_content("pic.png", b"new picture", cls="thumb")
        wait_until_gone(old_urls)
        for _ in range(4):
            reply = front_get(proxy.port, "/mogilefs/pic.png")
            assert (reply.status, reply.body) == (200, b"new picture")
        writer.delete("pic.png")
        assert front_get(proxy.port, "/mogilefs/pic.png").status == 404


@pytest.mark.parametrize("workers", SERVERS)
def test_through_perlbal_the_fallback_url_heals_an_outside_change_in_one_request(mogile: DevMogileFS,
                                                                                 workers: tuple[str, int]) -> None:
    """Perlbal tries the application last; it looks again, so only the first request after the
    old files vanished can fail (Perlbal checks the old length: a delete answers 404, not 200)."""
    writer = Client(DOMAIN, mogile.trackers)
    writer.store_content("song.mp3", b"old tune", cls="thumb")
    port = free_port()
    with serve(mogile, workers, port=port, MOGILE_REPROXY="perlbal", MOGILE_TRUSTED_PROXIES="127.0.0.1",
               MOGILE_PERLBAL_FALLBACK_URL=f"http://127.0.0.1:{port}") as server, \
            run_perlbal_front(server.port) as perlbal:
        assert front_get(perlbal.port, "/mogilefs/song.mp3").body == b"old tune"
        old_urls = writer.get_paths("song.mp3")
        writer.store_content("song.mp3", b"new tune", cls="thumb")  # the same length
        wait_until_gone(old_urls)
        first = front_get(perlbal.port, "/mogilefs/song.mp3")
        assert (first.status, first.body) == (200, b"new tune")  # the fallback, under the old headers
        healed = front_get(perlbal.port, "/mogilefs/song.mp3")
        assert (healed.status, healed.body) == (200, b"new tune")
        assert healed.headers["etag"] != first.headers["etag"]

        old_urls = writer.get_paths("song.mp3")
        writer.delete("song.mp3")
        wait_until_gone(old_urls)
        assert front_get(perlbal.port, "/mogilefs/song.mp3").status == 503  # Perlbal's own: 404 is a failure
        for _ in range(3):
            assert front_get(perlbal.port, "/mogilefs/song.mp3").status == 404


@pytest.mark.parametrize("workers", SERVERS)
def test_perlbal_is_given_no_fallback_url_for_an_answer_that_depends_on_who_asks(mogile: DevMogileFS,
                                                                                 workers: tuple[str, int]) -> None:
    """Perlbal's fallback request carries ``Host`` and ``Range`` alone: a view asked again so would
    judge a request without its user (here refused; a login page would be sent as the file)."""
    writer = Client(DOMAIN, mogile.trackers)
    writer.store_content("private/song.mp3", b"old tune", cls="thumb")
    allowed = {"X-Test-User": "allowed"}
    port = free_port()
    with serve(mogile, workers, port=port, MOGILE_REPROXY="perlbal", MOGILE_TRUSTED_PROXIES="127.0.0.1",
               MOGILE_PERLBAL_FALLBACK_URL=f"http://127.0.0.1:{port}") as server, \
            run_perlbal_front(server.port) as perlbal:
        fallback = f"http://127.0.0.1:{port}/mogilefs/private/song.mp3?mogilefs-fallback"
        assert http_request(f"http://127.0.0.1:{port}/mogilefs/private/song.mp3").headers[
            "x-reproxy-url"].endswith(" " + fallback)
        viewed = http_request(f"http://127.0.0.1:{port}/view/private/song.mp3", headers=allowed)
        assert "fallback" not in viewed.headers["x-reproxy-url"] and viewed.headers["x-reproxy-expected-size"] == "8"
        assert front_get(perlbal.port, "/view/private/song.mp3", allowed).body == b"old tune"
        old_urls = writer.get_paths("private/song.mp3")
        writer.store_content("private/song.mp3", b"new tune", cls="thumb")
        wait_until_gone(old_urls)
        assert front_get(perlbal.port, "/view/private/song.mp3", allowed).status == 503  # Perlbal's, as without one
