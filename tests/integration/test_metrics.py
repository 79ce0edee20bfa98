"""Metrics: the events of the WSGI and ASGI middlewares, the clients and the uploads, counted by
the Prometheus recorder; the ``/metrics`` endpoint of a Paste pipeline under gunicorn with two
workers (and the master's own port), and the Django view."""

from __future__ import annotations

import asyncio
import gc
import http.client
import importlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import DOMAIN, require_module
from integration._gunicorn import REPO, run_gunicorn
from integration._wire_client import free_port, read_http_reply
from integration.test_client import _scripted_open, dropping_node  # noqa: F401 (a fixture)
from integration.test_asgi import http_scope, run
from integration.test_middleware import wrapped_app
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from webtest import TestApp
from wiretools import ScriptedTracker, SilentServer

from mogile_middleware import (AsyncClient, Client, MogileFSMiddleware, TrackerUnavailableError,
                               UnregClassError, Uploader, UploadError, metrics)
from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.prometheus import MetricsEndpoint, PrometheusRecorder

CONTENT = b"metrics " * 1000


def not_found(environ: dict, start_response: object) -> list[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain")])  # type: ignore[operator]
    return [b"app"]


class Counts:
    """The recorder's values, read from its own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def __call__(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` that carry ``labels`` (and any others)."""
        return sum(sample.value for family in self.registry.collect() for sample in family.samples
                   if sample.name == f"mogile_middleware_{name}" and labels.items() <= sample.labels.items())


@pytest.fixture
def counts() -> Iterator[Counts]:
    """A Prometheus recorder in use for the test, on a registry of its own."""
    registry = CollectorRegistry()
    previous = metrics.use(PrometheusRecorder(registry))
    try:
        yield Counts(registry)
    finally:
        metrics.use(previous)


def test_serve_mode_counts_requests_bytes_tracker_calls_and_the_cache(devmogile: DevMogileFS, counts: Counts) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", CONTENT, "avatar")
    app = TestApp(MogileFSMiddleware(not_found, domain=DOMAIN, trackers=devmogile.trackers, prefix="/m/"))
    assert app.get("/m/a.txt").body == CONTENT
    others = counts("path_cache_entries") - 1  # the caches of other middlewares alive in this process
    assert app.get("/m/a.txt").body == CONTENT
    app.head("/m/a.txt")
    app.get("/m/a.txt", headers={"Range": "bytes=0-9"}, status=206)
    app.get("/m/missing", status=404)
    app.get("/elsewhere", status=404)  # the app's own 404: not counted

    assert counts("requests_total", mode="serve", status="200") == 3
    assert counts("requests_total", mode="serve", status="206") == 1
    assert counts("requests_total", mode="serve", status="404") == 1
    assert counts("served_bytes_total") == 2 * len(CONTENT) + 10
    assert counts("path_cache_misses_total") == 2  # a.txt once, missing once
    assert counts("path_cache_hits_total") >= 3
    tracker = devmogile.trackers[0]
    assert counts("tracker_calls_total", tracker=tracker, command="get_paths", outcome="ok") >= 1
    assert counts("tracker_calls_total", tracker=tracker, command="get_paths", outcome="error") == 1  # unknown_key
    assert counts("tracker_call_seconds_count", command="get_paths") == counts(
        "tracker_calls_total", tracker=tracker, command="get_paths", outcome="ok") + 1
    assert counts("path_cache_entries") - others == 2


def test_path_cache_entries_sums_the_caches_of_middlewares_stacked(devmogile: DevMogileFS, counts: Counts) -> None:
    """Each cache set the gauge to its own size: the last to store a key hid the others'."""
    client = Client(DOMAIN, devmogile.trackers)
    for key in ("a.txt", "b.txt", "c.txt"):
        client.store_content(key, CONTENT, "avatar")
    inner = MogileFSMiddleware(not_found, domain=DOMAIN, trackers=devmogile.trackers, prefix="/b/")
    app = TestApp(MogileFSMiddleware(inner, domain=DOMAIN, trackers=devmogile.trackers, prefix="/a/"))
    gc.collect()  # the caches of earlier tests' middlewares left in cycles: not freed midway
    gc.disable()
    try:
        app.get("/a/a.txt")
        others = counts("path_cache_entries") - 1  # the caches of other middlewares alive in this process
        for key in ("b.txt", "c.txt"):
            app.get(f"/a/{key}")
        app.get("/b/a.txt")
        assert counts("path_cache_entries") - others == 4
        client.delete("b.txt")
        app.get("/b/b.txt", status=404)
        assert counts("path_cache_entries") - others == 5  # a key found missing is kept too, for a few seconds
        shared = MogileFSMiddleware(not_found, domain=DOMAIN, trackers=devmogile.trackers, prefix="/s/",
                                    cache_backend=inner.locator.paths.backend)  # the inner one's cache: counted once
        TestApp(shared).get("/s/c.txt")
        assert counts("path_cache_entries") - others == 6
    finally:
        gc.enable()


def test_middlewares_dropped_from_a_shared_client_go_with_their_caches(devmogile: DevMogileFS, counts: Counts) -> None:
    """An application factory or a test suite makes middlewares on the process's one client: each
    dropped one's path cache stayed alive through the client's listeners, counted in the gauge."""
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("a.txt", CONTENT, "avatar")
    kept = TestApp(MogileFSMiddleware(not_found, client=client, prefix="/kept/"))
    kept.get("/kept/a.txt")
    gc.collect()
    kept.get("/kept/missing-first", status=404)  # a cache storing a key sets the gauge
    before = counts("path_cache_entries")  # this one's entries, and those of other middlewares alive
    for number in range(20):
        dropped = TestApp(MogileFSMiddleware(not_found, client=client, prefix="/m/"))
        dropped.get("/m/a.txt")
        dropped.get(f"/m/missing-{number}", status=404)
    del dropped
    gc.collect()
    kept.get("/kept/missing", status=404)
    assert counts("path_cache_entries") == before + 1
    locator = kept.app.locator
    assert locator.paths.backend.get(locator.cache_key("a.txt")) is not None
    client.store_content("a.txt", b"new", "avatar")  # the living middleware still hears of writes
    assert locator.paths.backend.get(locator.cache_key("a.txt")) is None


def test_a_middleware_refuses_to_wrap_one_it_would_answer_for_through_the_metrics_endpoint() -> None:
    """Its private files were served to anyone: ``/media/`` answered ``/media/private/`` itself."""
    options = {"domain": DOMAIN, "trackers": "127.0.0.1:7001"}
    private = MogileFSMiddleware(not_found, prefix="/media/private/", authorize=lambda request, key: False, **options)
    with pytest.raises(ValueError, match="holds the prefix '/media/private/' of the middleware it wraps"):
        MogileFSMiddleware(MetricsEndpoint(private), prefix="/media/", **options)


def test_the_body_cache_counts_hits_misses_and_the_bytes_it_serves(devmogile: DevMogileFS, counts: Counts) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", CONTENT, "avatar")
    app = TestApp(MogileFSMiddleware(not_found, domain=DOMAIN, trackers=devmogile.trackers, body_cache_bytes=1 << 20))
    assert app.get("/mogilefs/a.txt").body == CONTENT
    assert app.get("/mogilefs/a.txt", headers={"Range": "bytes=0-9"}, status=206).body == CONTENT[:10]
    app.head("/mogilefs/a.txt")
    assert counts("body_cache_lookups_total", result="miss") == 1
    assert counts("body_cache_lookups_total", result="hit") == 2
    assert counts("served_bytes_total") == len(CONTENT) + 10  # HEAD sends none
    assert counts("requests_total", mode="serve", status="200") == 2


def test_asgi_counts_a_kept_body_only_once_it_is_sent(devmogile: DevMogileFS, counts: Counts) -> None:
    """A client gone as its answer from the body cache was decided got none of it (the 499 nobody
    reads), and its request was not counted, but the bytes were, as if served."""
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", CONTENT, "avatar")
    middleware = ASGIMiddleware(wrapped_app, domain=DOMAIN, trackers=devmogile.trackers, body_cache_bytes=1 << 20)
    assert run(middleware, http_scope("/mogilefs/a.txt"), [{"type": "http.request"}])[1]["body"] == CONTENT
    gone = run(middleware, http_scope("/mogilefs/a.txt"), [{"type": "http.request"}, {"type": "http.disconnect"}])
    assert gone == [{"type": "http.response.start", "status": 499, "headers": []},
                    {"type": "http.response.body", "body": b""}]
    assert counts("body_cache_lookups_total", result="hit") == 1
    assert counts("served_bytes_total") == len(CONTENT) and counts("requests_total") == 1
    run(middleware, http_scope("/mogilefs/a.txt", "HEAD"), [{"type": "http.request"}])
    assert counts("served_bytes_total") == len(CONTENT) and counts("requests_total") == 2  # HEAD sends none


def test_reproxy_answers_are_counted_by_proxy(devmogile: DevMogileFS, counts: Counts) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", CONTENT, "avatar")
    for mode in ("perlbal", "nginx"):
        app = TestApp(MogileFSMiddleware(not_found, domain=DOMAIN, trackers=devmogile.trackers, reproxy=mode))
        answer = app.get("/mogilefs/a.txt")
        app.get("/mogilefs/a.txt", headers={"If-None-Match": answer.headers["ETag"]}, status=304)
        assert counts("requests_total", mode=mode, status="200") == 1
        assert counts("requests_total", mode=mode, status="304") == 0  # answered here, not by the proxy
    assert counts("requests_total", mode="serve", status="304") == 2
    assert counts("served_bytes_total") == 0


def test_a_skip_is_counted_when_every_tracker_is_marked_dead(counts: Counts) -> None:
    dead = f"127.0.0.1:{free_port()}"
    app = TestApp(MogileFSMiddleware(not_found, client=Client(DOMAIN, [dead])))
    app.get("/mogilefs/a.txt", status=503)  # refused: marked dead
    app.get("/mogilefs/b.txt", status=503)  # skipped, without a call
    assert counts("tracker_calls_total", tracker=dead, outcome="failed") == 1
    assert counts("dead_tracker_skips_total", tracker=dead) == 1


def test_a_tracker_whose_reply_cannot_be_read_is_counted_failed_and_the_next_one_answers(
        devmogile: DevMogileFS, counts: Counts) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", CONTENT, "avatar")
    garbled = ScriptedTracker(lambda line: b"OK paths=x\r\n")
    try:
        trackers = [garbled.tracker, *devmogile.trackers]
        assert TestApp(MogileFSMiddleware(not_found, domain=DOMAIN, trackers=trackers)).get("/mogilefs/a.txt").body \
            == CONTENT
        sent = run(ASGIMiddleware(not_found, domain=DOMAIN, trackers=trackers), http_scope("/mogilefs/a.txt"),
                   [{"type": "http.request"}])
        assert sent[0]["status"] == 200 and b"".join(message.get("body", b"") for message in sent[1:]) == CONTENT
    finally:
        garbled.stop()
    assert counts("tracker_calls_total", tracker=garbled.tracker, command="get_paths", outcome="ok") == 0
    assert counts("tracker_calls_total", tracker=garbled.tracker, command="get_paths", outcome="failed") == 2
    assert counts("tracker_calls_total", tracker=devmogile.trackers[0], command="get_paths", outcome="ok") == 2


def test_asking_whether_a_dead_tracker_is_back_is_counted_as_a_noop(counts: Counts) -> None:
    dead = f"127.0.0.1:{free_port()}"
    app = TestApp(MogileFSMiddleware(not_found, client=Client(DOMAIN, [dead], dead_seconds=0)))
    app.get("/mogilefs/a.txt", status=503)  # refused: marked dead, for no time
    app.get("/mogilefs/b.txt", status=503)  # asked whether it is back: refused again
    assert counts("tracker_calls_total", tracker=dead, command="get_paths", outcome="failed") == 1
    assert counts("tracker_calls_total", tracker=dead, command="noop", outcome="failed") == 1


def test_a_tracker_call_its_caller_gave_up_is_not_counted(counts: Counts) -> None:
    # An ASGI client that left while a slow tracker was asked made the call "failed", and one
    # that left while a hung tracker was asked whether it is back made the noop "ok".
    slow = ScriptedTracker(lambda line: (time.sleep(0.5), b"ERR unknown_key unknown_key\r\n")[1])
    hung = SilentServer()

    async def leave(client: AsyncClient) -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.get_paths("a.txt"), 0.1)

    async def calls() -> None:
        await leave(AsyncClient(DOMAIN, [slow.tracker]))
        dead_soon = AsyncClient(DOMAIN, [hung.tracker], io_timeout=0.3, connect_timeout=0.3, dead_seconds=0.2)
        with pytest.raises(TrackerUnavailableError):
            await dead_soon.get_paths("a.txt")  # no answer: marked dead
        await asyncio.sleep(0.3)
        await leave(dead_soon)  # left while it is asked whether it is back

    try:
        asyncio.run(calls())
    finally:
        slow.stop()
        hung.stop()
    assert counts("tracker_calls_total", tracker=slow.tracker) == 0
    assert counts("tracker_calls_total", tracker=hung.tracker, command="get_paths", outcome="failed") == 1
    assert counts("tracker_calls_total", tracker=hung.tracker, command="noop") == 0


def test_changes_dead_trackers_failovers_and_stale_paths(devmogile: DevMogileFS, counts: Counts) -> None:
    dead = f"127.0.0.1:{free_port()}"
    client = Client(DOMAIN, [dead, *devmogile.trackers])
    client.store_content("a.txt", CONTENT, "avatar")
    assert counts("tracker_calls_total", tracker=dead, outcome="failed") == 1  # then skipped while dead
    middleware = MogileFSMiddleware(not_found, client=client, path_cache_seconds=0.5, replicating_seconds=0.5)
    app = TestApp(middleware)
    app.get("/mogilefs/a.txt")
    assert counts("dead_tracker_skips_total", tracker=dead) >= 1
    assert counts("tracker_calls_total", tracker=dead) == 1

    client.store_content("a.txt", CONTENT[:10], "avatar")  # the client tells the middleware's cache
    assert counts("path_cache_invalidations_total") == 1
    assert counts("uploads_total", outcome="stored") == 2
    assert counts("uploaded_bytes_total") == len(CONTENT) + 10
    with client.new_file("b.txt", "avatar") as new:
        new.write(b"half")
        new.abort()
    assert counts("uploads_total", outcome="failed") == 1
    assert counts("uploaded_bytes_total") == len(CONTENT) + 10 + 4

    # The node of the first replica the middleware knows stops: the second serves, a failover is counted.
    assert app.get("/mogilefs/a.txt").body == CONTENT[:10]
    first = middleware.locator.locate("a.txt").paths[0]
    next(node for node in devmogile.nodes if f":{node.port}/" in first).stop()
    assert app.get("/mogilefs/a.txt").body == CONTENT[:10]
    assert counts("replica_failovers_total") == 1

    time.sleep(0.6)  # past the paths' time, then every tracker goes away
    devmogile.stop_tracker()
    assert app.get("/mogilefs/a.txt").body == CONTENT[:10]
    assert counts("path_cache_stale_total") == 1


async def _store_content(client: AsyncClient, cls: str) -> None:
    """``store_content`` of :data:`CONTENT` in ``cls``, the client's connections closed after."""
    try:
        await client.store_content("a.txt", CONTENT, cls)
    finally:
        await client.aclose()


@pytest.mark.parametrize("store", [
    pytest.param(lambda trackers: Client(DOMAIN, trackers).store_content("a.txt", CONTENT, "no-such-class"), id="sync"),
    pytest.param(lambda trackers: asyncio.run(_store_content(AsyncClient(DOMAIN, trackers), "no-such-class")),
                 id="asyncio"),
])
@pytest.mark.parametrize("refusal", ["unknown-class", "reply-without-destination", "reply-without-file-number"])
def test_an_upload_the_tracker_refuses_to_open_is_counted_as_failed(devmogile: DevMogileFS, counts: Counts,
                                                                    store: Callable[[list[str]], object],
                                                                    refusal: str) -> None:
    """As when no device can take a file: every upload fails at ``create_open``, and an alert on
    failed uploads must see it."""
    if refusal == "unknown-class":
        with pytest.raises(UnregClassError):
            store(devmogile.trackers)
    else:
        # The asyncio client sent the whole body to the destination before it read the file number.
        reply = (b"OK fid=7\r\n" if refusal == "reply-without-destination"
                 else f"OK devid=1&path={devmogile.nodes[0].url}/dev1/0/000/000/0000000099.fid\r\n".encode())
        tracker = ScriptedTracker(lambda line: reply)
        try:
            # Its only tracker misspoke: no tracker answered (with two, the next one would be asked).
            with pytest.raises(TrackerUnavailableError, match="the tracker's reply has no '(fid|devid)'"):
                store([tracker.tracker])
        finally:
            tracker.stop()
    assert counts("uploads_total", outcome="failed") == 1 and counts("uploaded_bytes_total") == 0


@pytest.mark.parametrize("store", [
    pytest.param(lambda trackers: Client(DOMAIN, trackers).store_content("a.txt", CONTENT, "avatar"), id="client"),
    pytest.param(lambda trackers: Uploader(Client(DOMAIN, trackers)).upload("a.txt", CONTENT, "avatar"),
                 id="uploader"),  # which asks first whether the class keeps checksums
    pytest.param(lambda trackers: asyncio.run(_store_content(AsyncClient(DOMAIN, trackers), "avatar")), id="asyncio"),
])
def test_an_upload_no_tracker_answers_is_counted_as_failed(counts: Counts, store: Callable[[list[str]], object]) -> None:
    with pytest.raises(TrackerUnavailableError):
        store([f"127.0.0.1:{free_port()}"])
    assert counts("uploads_total", outcome="failed") == 1 and counts("uploaded_bytes_total") == 0


def _chunks_then_failure() -> Iterator[bytes]:
    yield from [b"x" * 1024 * 1024] * 3
    raise OSError("the source failed")


async def _async_chunks_then_failure() -> AsyncIterator[bytes]:
    for chunk in _chunks_then_failure():
        yield chunk


async def _store_failing(client: AsyncClient) -> None:
    try:
        await client.store_file("a.txt", _async_chunks_then_failure(), "avatar")
    finally:
        await client.aclose()


@pytest.mark.parametrize("store", [
    pytest.param(lambda trackers: Uploader(Client(DOMAIN, trackers)).upload("a.txt", _chunks_then_failure(), "avatar"),
                 id="sync"),
    pytest.param(lambda trackers: asyncio.run(_store_failing(AsyncClient(DOMAIN, trackers))), id="asyncio"),
])
def test_an_upload_failing_midway_counts_the_bytes_it_sent(devmogile: DevMogileFS, counts: Counts,
                                                           store: Callable[[list[str]], object]) -> None:
    # The asyncio client counted none: uploaded_bytes_total is "the bytes they sent".
    with pytest.raises(OSError, match="the source failed"):
        store(devmogile.trackers)
    assert counts("uploads_total", outcome="failed") == 1
    assert counts("uploaded_bytes_total") == 3 * 1024 * 1024


async def _store_to(client: AsyncClient, source: io.BytesIO) -> None:
    try:
        await client.store_file("a.txt", source, "avatar")
    finally:
        await client.aclose()


@pytest.mark.parametrize("store", [
    pytest.param(lambda trackers, source: Client(DOMAIN, trackers).store_file("a.txt", source, "avatar"), id="sync"),
    pytest.param(lambda trackers, source: asyncio.run(_store_to(AsyncClient(DOMAIN, trackers), source)), id="asyncio"),
])
def test_an_upload_sent_again_then_refused_counts_what_the_last_node_took(
        counts: Counts, dropping_node: str, store: Callable[[list[str], io.BytesIO], object]) -> None:
    """The first node drops the PUT midway, the next refuses it: the asyncio client counted the
    bytes the first took, the blocking one none (it starts again from the first byte)."""
    refusing = socket.create_server(("127.0.0.1", 0))
    refusing_url = f"http://127.0.0.1:{refusing.getsockname()[1]}"
    refusing.close()
    tracker = _scripted_open([dropping_node + "/dev1", refusing_url + "/dev2"])
    try:
        with pytest.raises(UploadError):
            store([tracker.tracker], io.BytesIO(b"x" * 2 * 1024 * 1024))
    finally:
        tracker.stop()
    assert counts("uploads_total", outcome="failed") == 1 and counts("uploaded_bytes_total") == 0


def test_the_asgi_middleware_counts_the_same_events(devmogile: DevMogileFS, counts: Counts) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", CONTENT, "avatar")

    async def app(scope: dict, receive: object, send: object) -> None:
        raise AssertionError("not reached")

    middleware = ASGIMiddleware(app, domain=DOMAIN, trackers=devmogile.trackers)
    for path in ("/mogilefs/a.txt", "/mogilefs/a.txt", "/mogilefs/missing"):
        run(middleware, http_scope(path), [{"type": "http.request"}])
    reproxied = ASGIMiddleware(app, domain=DOMAIN, trackers=devmogile.trackers, reproxy="perlbal")
    for _ in range(3):  # the third is the answer kept for the second request, counted as well
        run(reproxied, http_scope("/mogilefs/a.txt"), [{"type": "http.request"}])

    assert counts("requests_total", mode="serve", status="200") == 2
    assert counts("requests_total", mode="serve", status="404") == 1
    assert counts("requests_total", mode="perlbal", status="200") == 3
    assert counts("served_bytes_total") == 2 * len(CONTENT)
    assert counts("path_cache_hits_total") == 3  # each middleware has its own cache
    assert counts("path_cache_misses_total") == 3
    assert counts("tracker_calls_total", tracker=devmogile.trackers[0], command="get_paths", outcome="error") == 1


def test_a_repeated_asgi_request_counts_one_cache_hit_as_its_location_changes(devmogile: DevMogileFS,
                                                                               counts: Counts) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", CONTENT, "thumb")

    async def app(scope: dict, receive: object, send: object) -> None:
        raise AssertionError("not reached")

    async def scenario() -> None:
        middleware = ASGIMiddleware(app, domain=DOMAIN, trackers=devmogile.trackers, reproxy="perlbal")
        for turn in range(4):
            if turn == 2:  # a new version through the middleware's client: the cached location is dropped
                await middleware.client.store_content("a.txt", CONTENT[::-1], "thumb")
            sent: list[dict] = []

            async def send(message: dict) -> None:
                sent.append(message)

            async def receive() -> dict:
                return {"type": "http.request"}

            await middleware(http_scope("/mogilefs/a.txt"), receive, send)
            assert sent[0]["status"] == 200
        await middleware.client.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    # Looked up, found, looked up anew after the write, found: the last one's answer was kept for
    # the old location, and the cache asked once for it.
    assert counts("path_cache_misses_total") == 2
    assert counts("path_cache_hits_total") == 2
    assert counts("requests_total", mode="perlbal", status="200") == 4


def test_a_key_cached_as_missing_counts_one_hit_per_request_as_in_wsgi(devmogile: DevMogileFS,
                                                                       counts: Counts) -> None:
    # The ASGI middleware counted a hit as it looked for a warm answer, then another as it answered.
    async def app(scope: dict, receive: object, send: object) -> None:
        raise AssertionError("not reached")

    middleware = ASGIMiddleware(app, domain=DOMAIN, trackers=devmogile.trackers)
    for _ in range(3):
        assert run(middleware, http_scope("/mogilefs/missing"), [{"type": "http.request"}])[0]["status"] == 404
    wsgi = TestApp(MogileFSMiddleware(wrapped_app, domain=DOMAIN, trackers=devmogile.trackers))
    for _ in range(3):
        wsgi.get("/mogilefs/missing", status=404)
    assert (counts("path_cache_misses_total"), counts("path_cache_hits_total")) == (2, 4)


def scrape(port: int, path: str = "/metrics") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a ``/metrics`` page: (name, sorted labels) → value."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path)
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/plain")
    text = response.read().decode()
    connection.close()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def get(port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path, headers={"Connection": "close"})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 200, (path, response.status)
    return body


def test_gunicorn_with_two_workers_sums_both_in_every_scrape(devmogile: DevMogileFS, tmp_path: Path) -> None:
    """examples/metrics.ini under examples/gunicorn_metrics.py: the app's /metrics and the master's port."""
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", CONTENT, "avatar")
    multiproc, master_port = tmp_path / "prometheus", free_port()
    multiproc.mkdir()
    (multiproc / "counter_1.db").write_bytes(b"left from an earlier run")  # emptied at start
    env = {"PROMETHEUS_MULTIPROC_DIR": str(multiproc), "METRICS_PORT": str(master_port)}
    args = ["-c", str(REPO / "examples" / "gunicorn_metrics.py"), "--paste", str(REPO / "examples" / "metrics.ini"),
            "--paste-global", f"mogile_domain={DOMAIN}", "--paste-global", f"mogile_trackers={devmogile.trackers[0]}"]
    requests = 40
    with run_gunicorn(env, workers=2, app=None, extra_args=args) as server:
        with ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(lambda _: get(server.port, "/mogilefs/a.txt"), range(requests)))
        assert bodies == [CONTENT] * requests
        counted = {path.name for path in multiproc.glob("counter_*.db")}
        assert len(counted) == 2, f"both workers should have answered: {counted}"  # one file per worker pid
        for samples in (scrape(server.port), scrape(master_port)):
            assert samples[("mogile_middleware_requests_total", (("mode", "serve"), ("status", "200")))] == requests
            assert samples[("mogile_middleware_served_bytes_total", ())] == requests * len(CONTENT)
            hits = samples[("mogile_middleware_path_cache_hits_total", ())]
            misses = samples[("mogile_middleware_path_cache_misses_total", ())]
            assert hits + misses == requests and 1 <= misses <= 2  # one lookup per worker at most
            assert samples[("mogile_middleware_path_cache_entries", ())] == misses  # the live workers' sum
        # A scrape asking for metrics by name: their samples, where prometheus_client's registry
        # knew only the names of the files there as it was made (the master's: none).
        for port in (server.port, master_port):
            assert scrape(port, "/metrics?name[]=mogile_middleware_served_bytes_total") == {
                ("mogile_middleware_served_bytes_total", ()): requests * len(CONTENT)}
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:  # read raw: each header once
            sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: m\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            refused, _ = read_http_reply(sock, "POST")
        names = [name.lower() for name, _ in refused.fields]
        assert (refused.status, refused.headers["allow"], len(names)) == (405, "GET, HEAD", len(set(names)))
        old_workers = set(server.worker_pids())
        os.kill(server.pid, signal.SIGHUP)  # gunicorn reads its settings again and replaces the workers
        deadline = time.monotonic() + 20
        while (old_workers & set(server.worker_pids()) or len(server.worker_pids()) < 2) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert get(server.port, "/mogilefs/a.txt") == CONTENT
        samples = scrape(master_port)
        assert samples[("mogile_middleware_requests_total", (("mode", "serve"), ("status", "200")))] == requests + 1
    assert list(multiproc.glob("counter_*.db"))  # a directory the environment gave stays, with the counts


def test_a_worker_gone_without_gunicorns_hook_leaves_the_path_cache_entries(tmp_path: Path) -> None:
    """A worker uvicorn replaced, or one killed under a server without ``child_exit``, kept its
    path cache entries in the sum for good, and the sum crept up with each."""
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    recorded = "from mogile_middleware.prometheus import PrometheusRecorder; PrometheusRecorder().cache_size({})"
    subprocess.run([sys.executable, "-c", recorded.format(7)], env=env, check=True, timeout=60)  # gone
    with subprocess.Popen([sys.executable, "-c", recorded.format(5) + "; print(flush=True); input()"], env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as living:
        try:
            assert living.stdout is not None and living.stdout.readline() == "\n"  # its gauge is written
            scraped = subprocess.run(
                [sys.executable, "-c", "from prometheus_client import generate_latest; "
                 "from mogile_middleware.prometheus import registry; print(generate_latest(registry()).decode())"],
                env=env, check=True, timeout=60, capture_output=True, text=True).stdout
        finally:
            living.communicate("", timeout=60)
    samples = {sample.name: sample.value for family in text_string_to_metric_families(scraped)
               for sample in family.samples}
    assert samples["mogile_middleware_path_cache_entries"] == 5
    assert len(list(multiproc.glob("gauge_livesum_*.db"))) == 1


def test_a_metrics_directory_gone_drops_the_events_not_the_requests(devmogile: DevMogileFS, tmp_path: Path) -> None:
    """prometheus_client opens a metric's file at its first use in a process: with the directory
    removed (a tmp cleaner) or not writable by the worker (gunicorn --user), the request failed."""
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", b"x" * 100, cls="thumb")
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    script = (
        "import shutil, sys\n"
        "from webtest import TestApp\n"
        "from mogile_middleware import MogileFSMiddleware\n"
        "from mogile_middleware.prometheus import record\n"
        "record()\n"
        "shutil.rmtree(sys.argv[1])\n"
        "app = MogileFSMiddleware(lambda environ, start_response: [], domain=sys.argv[2], trackers=[sys.argv[3]])\n"
        "for _ in range(2):\n"
        "    print(TestApp(app).get('/mogilefs/a.txt').body.decode())\n")
    done = subprocess.run([sys.executable, "-c", script, str(multiproc), DOMAIN, devmogile.trackers[0]],
                          env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "x" * 100 + "\n" + "x" * 100 + "\n"), done.stderr
    assert done.stderr.count("metrics not recorded: FileNotFoundError") == 1  # once a minute at most


def test_a_process_that_cannot_count_says_once_which_directory_it_cannot_write(tmp_path: Path) -> None:
    """Each middleware of a stack (the metrics filter and the file filter) said it again, and
    neither named the directory: ``PermissionError(13, 'Permission denied')`` alone."""
    gone = tmp_path / "prometheus"
    # Made once the process has tried (a worker forked after a cleaner's work was undone): it counts.
    script = ("import os, sys\n"
              "from mogile_middleware.prometheus import record\n"
              "refused = record(), record()\n"
              "os.mkdir(sys.argv[1])\n"
              "child = os.fork()\n"
              "if child == 0:\n"
              "    os._exit(0 if record() is not None else 1)\n"
              "print(*refused, os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), record() is not None)\n")
    done = subprocess.run([sys.executable, "-c", script, str(gone)],
                          env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(gone)}, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout) == (0, "None None 0 True\n"), done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"metrics not recorded by this process: PROMETHEUS_MULTIPROC_DIR={str(gone)!r} cannot "
                           "be written (FileNotFoundError(")


def test_an_empty_metrics_directory_is_refused_not_taken_for_the_working_directory(tmp_path: Path) -> None:
    """prometheus_client takes the variable set, empty too, for its multiprocess mode: each worker
    wrote its files where it ran, and a scrape, which took it for unset, showed one worker's counts."""
    script = ("from mogile_middleware.prometheus import record\n"
              "print(record(), record())\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": ""})
    assert (done.returncode, done.stdout, list(tmp_path.iterdir())) == (0, "None None\n", []), done.stderr
    assert done.stderr.splitlines() == ["metrics not recorded by this process: PROMETHEUS_MULTIPROC_DIR='' cannot be "
                                        "written (NotADirectoryError('set but empty: name a directory, or unset it'))"]


def test_a_worker_started_once_the_metrics_directory_is_gone_serves(devmogile: DevMogileFS, tmp_path: Path) -> None:
    """Its metrics failed as they were made: the worker did not boot, and gunicorn stopped, the
    site down (under uvicorn --workers, the worker was started again and again)."""
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", CONTENT, "avatar")
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(multiproc), "METRICS_PORT": "0"}
    args = ["-c", str(REPO / "examples" / "gunicorn_metrics.py"), "--paste", str(REPO / "examples" / "metrics.ini"),
            "--paste-global", f"mogile_domain={DOMAIN}", "--paste-global", f"mogile_trackers={devmogile.trackers[0]}"]
    with run_gunicorn(env, workers=2, app=None, extra_args=args) as server:
        assert get(server.port, "/mogilefs/a.txt") == CONTENT
        first = set(server.worker_pids())
        shutil.rmtree(multiproc)  # a tmp cleaner
        for pid in first:
            os.kill(pid, signal.SIGKILL)  # replaced, as by --max-requests, a timeout or the OOM killer
        deadline = time.monotonic() + 30
        while len(set(server.worker_pids()) - first) < 2:
            assert time.monotonic() < deadline and server.worker_pids(), "the workers were not replaced"
            time.sleep(0.1)
        for _ in range(4):  # both new workers, most likely
            assert get(server.port, "/mogilefs/a.txt") == CONTENT
        assert scrape(server.port) == {}  # nothing to sum, and no error
        assert server.worker_pids()


def test_the_new_master_of_a_usr2_upgrade_leaves_the_old_workers_counts(tmp_path: Path) -> None:
    """gunicorn starts the new master with its first environment and GUNICORN_PID: the settings
    took it for a first start and emptied the directory the old master's workers still wrote to."""
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    counted = multiproc / "counter_4242.db"
    for upgrade, kept in (({"GUNICORN_PID": "4242"}, True), ({}, False)):
        counted.write_bytes(b"an old worker's counts")
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc), **upgrade}
        env.pop("MOGILE_METRICS_DIR_READY", None)
        if not upgrade:
            env.pop("GUNICORN_PID", None)
        subprocess.run([sys.executable, "-c", "import runpy, sys; runpy.run_path(sys.argv[1])",
                        str(REPO / "examples" / "gunicorn_metrics.py")], env=env, check=True, timeout=60)
        assert counted.exists() is kept


def test_the_metrics_directory_made_for_gunicorn_goes_when_it_exits(devmogile: DevMogileFS, tmp_path: Path) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", CONTENT, "avatar")
    env = {"TMPDIR": str(tmp_path), "METRICS_PORT": "0"}
    args = ["-c", str(REPO / "examples" / "gunicorn_metrics.py"), "--paste", str(REPO / "examples" / "metrics.ini"),
            "--paste-global", f"mogile_domain={DOMAIN}", "--paste-global", f"mogile_trackers={devmogile.trackers[0]}"]
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    with run_gunicorn(env, workers=1, app=None, extra_args=args) as server:
        assert get(server.port, "/mogilefs/a.txt") == CONTENT
        [made] = tmp_path.glob("mogile-metrics-*")
        assert list(made.glob("counter_*.db"))
    assert not made.exists()


def test_a_taken_metrics_port_is_served_once_free_and_gunicorn_serves_meanwhile(devmogile: DevMogileFS,
                                                                                tmp_path: Path) -> None:
    # The master died at start (and a USR2 upgrade always failed: the old master holds the port).
    Client(DOMAIN, devmogile.trackers).store_content("a.txt", CONTENT, "avatar")
    args = ["-c", str(REPO / "examples" / "gunicorn_metrics.py"), "--paste", str(REPO / "examples" / "metrics.ini"),
            "--paste-global", f"mogile_domain={DOMAIN}", "--paste-global", f"mogile_trackers={devmogile.trackers[0]}"]
    taken = socket.create_server(("127.0.0.1", 0))
    metrics_port = taken.getsockname()[1]
    env = {"TMPDIR": str(tmp_path), "METRICS_PORT": str(metrics_port)}
    with taken, run_gunicorn(env, workers=1, app=None, extra_args=args) as server:
        assert get(server.port, "/mogilefs/a.txt") == CONTENT
        taken.close()  # as the old master exits after an upgrade
        deadline = time.monotonic() + 15
        while True:
            try:
                samples = scrape(metrics_port)
                break
            except OSError:
                assert time.monotonic() < deadline, "the metrics port was never served once free"
                time.sleep(0.2)
        assert samples[("mogile_middleware_served_bytes_total", ())] == len(CONTENT)
    assert not list(tmp_path.glob("mogile-metrics-*"))


def test_the_metrics_filter_answers_head_as_get_and_other_methods_405(counts: Counts) -> None:
    from webtest import TestApp

    from mogile_middleware.prometheus import MetricsEndpoint

    app = TestApp(MetricsEndpoint(lambda environ, start_response: []))
    got, head = app.get("/metrics"), app.head("/metrics")
    assert head.status_int == 200 and head.body == b"" and head.headers["Content-Type"] == got.headers["Content-Type"]
    for method in ("POST", "DELETE", "OPTIONS"):  # prometheus_client's answers left HEAD out of Allow
        refused = app.request("/metrics", method=method, expect_errors=True)
        assert (refused.status_int, refused.headers["Allow"]) == (405, "GET, HEAD")


def test_the_django_view_answers_with_the_metrics(devmogile: DevMogileFS, counts: Counts) -> None:
    require_module("django")
    from django.conf import settings

    if not settings.configured:
        settings.configure()
    from django.test import RequestFactory

    from mogile_middleware.contrib.django.metrics import view
    from mogile_middleware.prometheus import record

    record()  # what wsgi.py does: counts in the default registry, which the view shows
    response = view(RequestFactory().get("/metrics"))
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(response.content.decode())}
    assert "mogile_middleware_requests" in names
    named = view(RequestFactory().get("/metrics", {"name[]": ["mogile_middleware_served_bytes_total"]}))
    samples = [sample.name for family in text_string_to_metric_families(named.content.decode())
               for sample in family.samples]
    assert samples == ["mogile_middleware_served_bytes_total"]  # as the filter and the master's port answer
    refused = view(RequestFactory().post("/metrics"))
    assert (refused.status_code, refused["Allow"]) == (405, "GET, HEAD")


@pytest.mark.parametrize("module", ["mogile_middleware.prometheus", "mogile_middleware.contrib.django.metrics"])
def test_without_the_extra_the_import_names_it(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    require_module("django")
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "mogile_middleware.prometheus")
    monkeypatch.delitem(sys.modules, "mogile_middleware.contrib.django.metrics", raising=False)
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install 'mogile_middleware[prometheus]'")):
        importlib.import_module(module)


@pytest.mark.parametrize(("options", "named"), [
    ({"path": "metrics"}, "'metrics'"), ({"path": ""}, "''"), ({"path": "/metrics", "port": "9101"}, "port"),
    ({"path": "/metrics?x=1"}, "x=1"), ({"path": "/métrics"}, "'/métrics'")])
def test_the_metrics_filter_refuses_at_load_what_no_request_could_reach(options: dict[str, str], named: str) -> None:
    from mogile_middleware.prometheus import filter_factory

    with pytest.raises(ValueError, match=named):
        filter_factory({}, **options)


def test_a_global_path_is_the_metrics_filters_path(tmp_path: Path) -> None:
    """PasteDeploy drops a section's own value of a global's name: the filter served /metrics."""
    from paste.deploy import loadfilter

    ini = tmp_path / "metrics.ini"
    ini.write_text("[DEFAULT]\npath = /stats\n[filter:metrics]\nuse = egg:mogile_middleware#metrics\npath = /own\n")
    endpoint = loadfilter(f"config:{ini}", name="metrics")(lambda environ, start_response: [])
    assert endpoint.path == "/stats"
