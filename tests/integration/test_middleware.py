"""MogileFSMiddleware through WebTest (lint on) over the embedded MogileFS."""

from __future__ import annotations

import gc
import threading
import time
import warnings
from urllib.parse import quote, unquote_to_bytes

import pytest
from conftest import DOMAIN
from webtest import TestApp

from mogile_middleware import Client
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.middleware import MogileFSMiddleware

BODY = b"0123456789abcdefghijklmnopqrstuvwxyz\n"
KEYS = ["plain.txt", "with space.png", "100%.jpg", "a+b.gif", "x&y=z.txt", "café/日本.csv", "dir/sub/file"]


def wrapped_app(environ, start_response):
    """The application behind the middleware: echoes the path, streams in two pieces."""
    start_response("201 Created", [("Content-Type", "text/x-app"), ("X-App", "yes")])
    return [b"app:", environ["PATH_INFO"].encode("latin-1")]


class CountingClient(Client):
    """A Client that counts its get_paths calls (the tracker round trips of the middleware)."""

    def __init__(self, *args, delay: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.get_paths_calls = 0
        self.delay = delay

    def get_paths(self, key, *args, **kwargs):
        self.get_paths_calls += 1
        time.sleep(self.delay)
        return super().get_paths(key, *args, **kwargs)


@pytest.fixture
def client(devmogile: DevMogileFS) -> Client:
    client = Client(DOMAIN, devmogile.trackers)
    for key in KEYS:
        client.store_content(key, BODY, cls="avatar")
    return client


def make(devmogile: DevMogileFS, **options) -> tuple[TestApp, MogileFSMiddleware, CountingClient]:
    counting = CountingClient(DOMAIN, devmogile.trackers, dead_seconds=1)
    middleware = MogileFSMiddleware(wrapped_app, client=counting, **options)
    return TestApp(middleware, lint=True), middleware, counting


def url(key: str) -> str:
    return "/mogilefs/" + quote(key)


MODES = [pytest.param(None, id="serve"), pytest.param("perlbal", id="perlbal"), pytest.param("nginx", id="nginx")]


def test_a_middleware_dropped_unclosed_closes_its_tracker_connections_unwarned(devmogile: DevMogileFS) -> None:
    """An application made for each test (Flask's app factory) leaves its middleware to the
    collector: its idle tracker connections warned of an unclosed socket each, which a suite with
    ``filterwarnings = error`` fails on."""
    gc.collect()  # what earlier tests left is collected, and warned of, before
    gc.disable()  # a middleware is in cycles of its own: the collector, not the reference count, drops it
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for number in range(5):  # a key not found: the tracker is asked each time
                middleware = MogileFSMiddleware(wrapped_app, domain=DOMAIN, trackers=devmogile.trackers)
                assert TestApp(middleware).get(f"/mogilefs/missing{number}", status=404)
                del middleware
            gc.collect()
    finally:
        gc.enable()
    assert [str(warning.message)[:40] for warning in caught if warning.category is ResourceWarning] == []


@pytest.mark.parametrize("key", KEYS)
def test_serve_mode_returns_the_bytes(devmogile: DevMogileFS, client: Client, key: str) -> None:
    app, _, _ = make(devmogile)
    response = app.get(url(key))
    assert response.body == BODY
    assert response.headers["Content-Length"] == str(len(BODY))
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["ETag"].startswith('"fid-')


@pytest.mark.parametrize(
    ("key", "content_type"),
    [("with space.png", "image/png"), ("café/日本.csv", "text/csv; charset=utf-8"),
     ("dir/sub/file", "application/octet-stream")],
)
def test_content_type_comes_from_the_extension(devmogile: DevMogileFS, client: Client, key: str,
                                               content_type: str) -> None:
    app, _, _ = make(devmogile)
    assert app.get(url(key)).headers["Content-Type"] == content_type


@pytest.mark.parametrize("reproxy", MODES)
def test_other_paths_pass_through_untouched(devmogile: DevMogileFS, reproxy: str | None) -> None:
    app, _, counting = make(devmogile, reproxy=reproxy)
    for path in ("/", "/mogilefs", "/other/mogilefs/x", "/MOGILEFS/x"):
        response = app.post(path, status=201)
        assert response.body == b"app:" + path.encode()
        assert response.headers["X-App"] == "yes" and response.headers["Content-Type"] == "text/x-app"
    assert counting.get_paths_calls == 0


def test_mounted_under_a_script_name(devmogile: DevMogileFS, client: Client) -> None:
    app, _, _ = make(devmogile, prefix="/media")
    response = app.get("/site/media/plain.txt", extra_environ={"SCRIPT_NAME": "/site", "PATH_INFO": "/media/plain.txt"})
    assert response.body == BODY


def test_head_sends_headers_without_a_body(devmogile: DevMogileFS, client: Client) -> None:
    app, _, _ = make(devmogile)
    response = app.head(url("plain.txt"))
    assert response.body == b"" and response.headers["Content-Length"] == str(len(BODY))


@pytest.mark.parametrize(
    ("range_header", "status", "content_range", "body"),
    [
        pytest.param("bytes=0-9", 206, "bytes 0-9/37", BODY[:10], id="first-ten"),
        pytest.param("bytes=10-", 206, "bytes 10-36/37", BODY[10:], id="open-end"),
        pytest.param("bytes=-5", 206, "bytes 32-36/37", BODY[-5:], id="suffix"),
        pytest.param("bytes=100-200", 416, "bytes */37", None, id="past-the-end"),
    ],
)
def test_ranges(devmogile: DevMogileFS, client: Client, range_header: str, status: int, content_range: str,
                body: bytes | None) -> None:
    app, _, _ = make(devmogile)
    response = app.get(url("plain.txt"), headers={"Range": range_header}, status=status)
    assert response.headers["Content-Range"] == content_range
    if body is not None:
        assert response.body == body


@pytest.mark.parametrize("reproxy", ["perlbal", "nginx"])
def test_a_suffix_range_is_served_not_reproxied(devmogile: DevMogileFS, client: Client, reproxy: str) -> None:
    # Storage nodes answer bytes=-N with the first N+1 bytes: the middleware sends an absolute range.
    app, _, _ = make(devmogile, reproxy=reproxy)
    response = app.get(url("plain.txt"), headers={"Range": "bytes=-5"}, status=206)
    assert response.body == BODY[-5:] and response.headers["Content-Range"] == "bytes 32-36/37"
    assert not any(name.upper().startswith(("X-REPROXY", "X-ACCEL")) for name in response.headers)


@pytest.mark.parametrize("reproxy", ["perlbal", "nginx"])
def test_a_range_past_the_end_of_a_known_length_is_416_here(devmogile: DevMogileFS, client: Client,
                                                             reproxy: str) -> None:
    app, _, _ = make(devmogile, reproxy=reproxy, trusted_proxies=["10.0.0.1"])
    proxy = {"REMOTE_ADDR": "10.0.0.1"}
    for past in ("bytes=37-", "bytes=100-200"):
        response = app.get(url("plain.txt"), headers={"Range": past}, extra_environ=proxy, status=416)
        assert response.headers["Content-Range"] == "bytes */37"
        assert not any(name.upper().startswith(("X-REPROXY", "X-ACCEL")) for name in response.headers)
    inside = app.get(url("plain.txt"), headers={"Range": "bytes=36-"}, extra_environ=proxy)
    assert any(name.upper().startswith(("X-REPROXY", "X-ACCEL")) for name in inside.headers)


@pytest.mark.parametrize("reproxy", MODES)
def test_if_none_match_gives_304(devmogile: DevMogileFS, client: Client, reproxy: str | None) -> None:
    app, _, _ = make(devmogile, reproxy=reproxy)
    etag = app.get(url("plain.txt")).headers["ETag"]
    for header in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        response = app.get(url("plain.txt"), headers={"If-None-Match": header}, status=304)
        assert response.headers["ETag"] == etag
        assert not any(name.upper().startswith(("X-REPROXY", "X-ACCEL")) for name in response.headers)
    app.get(url("plain.txt"), headers={"If-None-Match": '"fid-0"'}, status=200)


@pytest.mark.parametrize("reproxy", MODES)
def test_if_match_of_another_version_gives_412_in_every_mode(devmogile: DevMogileFS, client: Client,
                                                             reproxy: str | None) -> None:
    # Neither proxy checks If-Match, and a storage node does not know the fid's ETag.
    app, _, _ = make(devmogile, reproxy=reproxy)
    etag = app.get(url("plain.txt")).headers["ETag"]
    for method in ("GET", "HEAD"):
        for header in ('"fid-0"', f"W/{etag}", '"other", W/' + etag):
            response = app.request(url("plain.txt"), method=method, headers={"If-Match": header}, status=412)
            assert "ETag" not in response.headers
            assert not any(name.upper().startswith(("X-REPROXY", "X-ACCEL")) for name in response.headers)
        for header in (etag, f'"other", {etag}', "*"):
            app.request(url("plain.txt"), method=method, headers={"If-Match": header}, status=200)


def test_overwrite_gives_a_new_etag(devmogile: DevMogileFS, client: Client) -> None:
    app, middleware, _ = make(devmogile)
    first = app.get(url("plain.txt")).headers["ETag"]
    middleware.client.store_content("plain.txt", b"new content", cls="thumb")  # drops the cached paths
    response = app.get(url("plain.txt"))
    assert response.body == b"new content" and response.headers["ETag"] != first


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_get_405(devmogile: DevMogileFS, client: Client, method: str) -> None:
    app, _, counting = make(devmogile)
    response = app.request(url("plain.txt"), method=method, status=405)
    assert response.headers["Allow"] == "GET, HEAD"
    assert counting.get_paths_calls == 0


@pytest.mark.parametrize("path", ["/mogilefs/missing.png", "/mogilefs/"])
def test_unknown_and_empty_keys_get_404(devmogile: DevMogileFS, path: str) -> None:
    app, _, _ = make(devmogile)
    app.get(path, status=404)


@pytest.mark.parametrize(
    "raw_path",
    [
        pytest.param("/mogilefs/a%00b", id="nul"),
        pytest.param("/mogilefs/a%0D%0Ab", id="crlf"),
        pytest.param("/mogilefs/a%1Bb", id="escape"),
        pytest.param("/mogilefs/a%7Fb", id="del"),
        pytest.param("/mogilefs/caf%C3%A9%01", id="after-utf8"),
        pytest.param("/mogilefs/caf%E9", id="latin-1"),
        pytest.param("/mogilefs/%FF%FE", id="invalid-utf8"),
        pytest.param("/mogilefs/" + "k" * 256, id="256-bytes"),
        pytest.param("/mogilefs/" + "%C3%A9" * 128, id="256-utf8-bytes"),
    ],
)
def test_bad_keys_get_400_without_a_tracker_call(devmogile: DevMogileFS, raw_path: str) -> None:
    app, _, counting = make(devmogile)
    response = app.get(raw_path, status=400)
    assert b"Traceback" not in response.body
    assert counting.get_paths_calls == 0


@pytest.mark.parametrize("key", ["no\u00a0break", "line\u2028separator", "soft\u00adhyphen", "\u200b"])
def test_keys_of_unprintable_text_without_control_characters_are_served(devmogile: DevMogileFS, client: Client,
                                                                         key: str) -> None:
    client.store_content(key, BODY, cls="thumb")
    app, _, _ = make(devmogile)
    assert app.get(url(key)).body == BODY


def test_a_255_byte_key_is_served(devmogile: DevMogileFS, client: Client) -> None:
    client.store_content("é" * 127 + "k", BODY, cls="thumb")
    app, _, _ = make(devmogile)
    assert app.get(url("é" * 127 + "k")).body == BODY


@pytest.mark.parametrize("mode", MODES)
def test_a_domain_the_tracker_does_not_know_is_a_502_that_says_the_tracker_refused(
        devmogile: DevMogileFS, client: Client, mode: str | None, caplog: pytest.LogCaptureFixture) -> None:
    app = TestApp(MogileFSMiddleware(wrapped_app, domain="misspelt", trackers=devmogile.trackers, reproxy=mode))
    response = app.get(url("plain.txt"), status=502)
    assert response.text == "502 Bad Gateway\nThe tracker refused to look the file up.\n"
    assert "UnregDomainError" in caplog.text


def test_trackers_down_gives_503_with_retry_after(devmogile: DevMogileFS) -> None:
    app, _, _ = make(devmogile)
    devmogile.stop_tracker()
    started = time.monotonic()
    response = app.get(url("plain.txt"), status=503)
    assert response.headers["Retry-After"] == "5"
    assert time.monotonic() - started < 2


def test_stale_paths_are_served_while_the_tracker_is_down(devmogile: DevMogileFS, client: Client) -> None:
    app, _, counting = make(devmogile, path_cache_seconds=0.05, stale_seconds=60)
    assert app.get(url("plain.txt")).body == BODY
    devmogile.stop_tracker()
    time.sleep(0.1)
    assert app.get(url("plain.txt")).body == BODY
    assert counting.get_paths_calls == 2  # it did ask, and fell back to the stale paths
    app.get(url("a+b.gif"), status=503)  # never cached: nothing to fall back to
    devmogile.start_tracker()
    time.sleep(1.1)  # the dead time of the make() client
    assert app.get(url("a+b.gif")).body == BODY


def _node_of(devmogile: DevMogileFS, path: str):
    return next(node for node in devmogile.nodes if f":{node.port}/" in path)


def test_failover_when_the_first_replica_is_down(devmogile: DevMogileFS, client: Client) -> None:
    app, middleware, _ = make(devmogile)
    app.get(url("plain.txt"))
    location = middleware.locator.locate("plain.txt")
    assert len(location.paths) == 2
    _node_of(devmogile, location.paths[0]).stop()
    assert app.get(url("plain.txt")).body == BODY
    assert app.get(url("plain.txt"), headers={"Range": "bytes=1-2"}, status=206).body == BODY[1:3]


def test_every_replica_down_gives_502(devmogile: DevMogileFS, client: Client) -> None:
    app, _, _ = make(devmogile)
    app.get(url("plain.txt"))
    for node in devmogile.nodes:
        node.stop()
    assert app.get(url("plain.txt"), status=502).headers["Content-Type"].startswith("text/plain")
    app.get(url("plain.txt"), headers={"Range": "bytes=0-1"}, status=502)
    app.get(url("x&y=z.txt"), status=502)  # not cached: the length cannot be had either


def test_perlbal_answer(devmogile: DevMogileFS, client: Client) -> None:
    app, _, _ = make(devmogile, reproxy="perlbal", cache_control="public, max-age=60")
    response = app.get(url("with space.png"))
    paths = client.get_paths("with space.png")
    assert response.body == b""
    assert sorted(response.headers["X-REPROXY-URL"].split(" ")) == sorted(paths)
    assert response.headers["Content-Type"] == "image/png"
    assert response.headers["Content-Length"] == "0"
    assert response.headers["Cache-Control"] == "public, max-age=60"
    assert "X-REPROXY-CACHE-FOR" not in response.headers


def test_perlbal_cache_for_and_expected_size(devmogile: DevMogileFS, client: Client) -> None:
    app, _, _ = make(devmogile, reproxy="perlbal", perlbal_cache_seconds=30, trusted_proxies=["127.0.0.1"])
    response = app.get(url("plain.txt"), extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    assert response.headers["X-REPROXY-CACHE-FOR"] == "30; Content-Type ETag X-Content-Type-Options Accept-Ranges"
    assert response.headers["X-REPROXY-EXPECTED-SIZE"] == str(len(BODY))
    # One range of a known length: the size of the part, so that Perlbal refuses a short replica.
    for header, expected in [("bytes=0-1", "2"), ("bytes=30-", str(len(BODY) - 30)), ("bytes=3-9999", str(len(BODY) - 3))]:
        ranged = app.get(url("plain.txt"), headers={"Range": header}, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
        assert ranged.headers.getall("X-REPROXY-EXPECTED-SIZE") == [expected], header
    # Ignored by the node as here: all of it (a list too long to read is a list to the node too).
    for header in ("bytes=0-1,4-5", "lines=1-2", "bytes=" + ",".join(["0-1"] * 400)):
        ranged = app.get(url("plain.txt"), headers={"Range": header}, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
        assert ranged.headers.getall("X-REPROXY-EXPECTED-SIZE") == [str(len(BODY))], header


@pytest.mark.parametrize("mode", ["perlbal", "nginx"])
@pytest.mark.parametrize(("header", "status", "body"), [
    ("BYTES=0-1", 206, BODY[:2]), ("bytes= 0-1", 206, BODY[:2]), ("bytes =3-4", 206, BODY[3:5]),
    ("bytes=-2", 206, BODY[-2:]), ("bytes=5-2", 200, BODY), ("bytes=99-", 416, b""),
    ("bytes=" + "0" * 1100 + "1-2", 200, BODY)])  # too long to read here: the node reads it
def test_a_range_a_storage_node_reads_otherwise_is_served_here(devmogile: DevMogileFS, client: Client, mode: str,
                                                               header: str, status: int, body: bytes) -> None:
    """mogstored reads only ``bytes=a-b`` so spelled (RFC 9110 14.1 lets the unit be any case and
    blanks surround the ``=``), a suffix as the first bytes, and answers an invalid range or one
    past the end with its 416 under the file's headers: through the proxy, Perlbal would refuse
    the node's whole file as the wrong size, or the client would get the wrong bytes."""
    app, _, _ = make(devmogile, reproxy=mode, trusted_proxies=["127.0.0.1"])
    ranged = app.get(url("plain.txt"), headers={"Range": header}, extra_environ={"REMOTE_ADDR": "127.0.0.1"},
                     status="*")
    assert not {"X-REPROXY-URL", "X-Accel-Redirect"} & set(ranged.headers)
    assert (ranged.status_int, ranged.body if status != 416 else b"") == (status, body)


@pytest.mark.parametrize("mode", MODES)
def test_a_head_ignores_its_range_in_every_mode(devmogile: DevMogileFS, client: Client, mode: str | None) -> None:
    """RFC 9110 14.2: no range for a HEAD. A proxy would send it on to the node with the HEAD."""
    app, _, _ = make(devmogile, reproxy=mode, trusted_proxies=["127.0.0.1"])
    response = app.head(url("plain.txt"), headers={"Range": "bytes=0-1"}, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    assert response.status_int == 200 and response.headers["Content-Length"] == str(len(BODY))
    assert not {"Content-Range", "X-REPROXY-URL", "X-Accel-Redirect"} & set(response.headers)


def test_perlbal_fallback_url_comes_last_and_its_request_is_served(devmogile: DevMogileFS, client: Client) -> None:
    app, _, _ = make(devmogile, reproxy="perlbal", trusted_proxies=["127.0.0.1"],
                     perlbal_fallback_url="http://10.0.0.5:8000/")
    proxy = {"REMOTE_ADDR": "127.0.0.1"}
    response = app.get(url("café/日本.csv") + "?v=2", extra_environ=proxy)
    *replicas, fallback = response.headers["X-REPROXY-URL"].split(" ")
    assert sorted(replicas) == sorted(client.get_paths("café/日本.csv"))
    assert fallback == "http://10.0.0.5:8000" + url("café/日本.csv") + "?v=2&mogilefs-fallback"
    assert "X-REPROXY-EXPECTED-SIZE" not in response.headers  # it would refuse a new version's length
    served = app.get(fallback[len("http://10.0.0.5:8000"):], extra_environ=proxy)
    assert served.body == BODY and "X-REPROXY-URL" not in served.headers
    for query in ("?xmogilefs-fallback", "?v=2&amogilefs-fallback"):  # another parameter: reproxied
        assert "X-REPROXY-URL" in app.get(url("café/日本.csv") + query, extra_environ=proxy).headers
    for wrong in ("10.0.0.5:8000", "http://[::1", "http://::1:8000", "http://10.0.0.5:80000"):  # sent to Perlbal as given
        with pytest.raises(ValueError, match=r"perlbal_fallback_url must be an http:// URL of a host \(and a port in range\)"):
            make(devmogile, reproxy="perlbal", perlbal_fallback_url=wrong)


def test_a_request_naming_its_version_with_if_match_gets_no_perlbal_fallback_url(devmogile: DevMogileFS,
                                                                                 client: Client) -> None:
    """The fallback serves the version current then, under this answer's ETag: once an overwrite's
    old files were gone, an If-Match naming the old version got the new bytes (RFC 9110, 13.1.1:
    a 412). Without the fallback, Perlbal answers 503, and the client asks again."""
    app, _, _ = make(devmogile, reproxy="perlbal", trusted_proxies=["127.0.0.1"],
                     perlbal_fallback_url="http://10.0.0.5:8000/")
    proxy = {"REMOTE_ADDR": "127.0.0.1"}
    etag = app.get(url("plain.txt"), extra_environ=proxy).headers["ETag"]
    for if_match in (etag, f'"other", {etag}'):
        response = app.get(url("plain.txt"), headers={"If-Match": if_match}, extra_environ=proxy)
        assert sorted(response.headers["X-REPROXY-URL"].split(" ")) == sorted(client.get_paths("plain.txt"))
        assert response.headers["X-REPROXY-EXPECTED-SIZE"] == str(len(BODY))
    assert "8000" in app.get(url("plain.txt"), headers={"If-None-Match": '"other"'}, extra_environ=proxy).headers[
        "X-REPROXY-URL"]  # any version but that one will do


def test_a_client_marking_its_request_as_perlbals_fallback_is_still_reproxied(devmogile: DevMogileFS,
                                                                              client: Client) -> None:
    """Perlbal adds X-Forwarded-For and X-Proxy-Capabilities to every request it forwards, and
    neither to its own fetch of a reproxy URL: a client's mark would make the application stream
    the file itself, holding a worker for as long as the client cares to read."""
    app, _, _ = make(devmogile, reproxy="perlbal", trusted_proxies=["127.0.0.1"],
                     perlbal_fallback_url="http://10.0.0.5:8000/")
    forwarded = {"X-Forwarded-For": "203.0.113.9", "X-Proxy-Capabilities": "reproxy-file"}
    for headers in (forwarded, {"X-Forwarded-For": "203.0.113.9"}, {"X-Proxy-Capabilities": "reproxy-file"}):
        response = app.get(url("plain.txt") + "?mogilefs-fallback", headers=headers,
                           extra_environ={"REMOTE_ADDR": "127.0.0.1"})
        assert "X-REPROXY-URL" in response.headers and response.body == b"", headers


def test_perlbals_fallback_request_gets_all_of_the_file_whatever_its_range(devmogile: DevMogileFS,
                                                                          client: Client) -> None:
    """Perlbal sends its fallback request the client's Range without its If-Range, and the answer
    under the first answer's ETag: a part would join the new version to the client's old copy."""
    app, _, _ = make(devmogile, reproxy="perlbal", trusted_proxies=["127.0.0.1"],
                     perlbal_fallback_url="http://10.0.0.5:8000/")
    served = app.get(url("plain.txt") + "?mogilefs-fallback", headers={"Range": "bytes=5-9"},
                     extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    assert (served.status_int, served.body) == (200, BODY) and "Content-Range" not in served.headers


@pytest.mark.parametrize("mode", ["perlbal", "nginx"])
def test_range_fields_joined_are_served_here(devmogile: DevMogileFS, client: Client, mode: str) -> None:
    """Two Range fields reach the application joined; nginx would send the node the first alone."""
    app, _, _ = make(devmogile, reproxy=mode, trusted_proxies=["127.0.0.1"])
    response = app.get(url("plain.txt"), headers={"Range": "bytes=0-0, bytes=5-9"},
                       extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    assert (response.status_int, response.body) == (200, BODY)
    assert not {"X-REPROXY-URL", "X-Accel-Redirect"} & set(response.headers)


def test_nginx_fallback_request_is_served(devmogile: DevMogileFS, client: Client) -> None:
    app, _, _ = make(devmogile, reproxy="nginx")
    assert app.get(url("plain.txt")).headers["X-Accel-Redirect"] == "/reproxy"
    served = app.get(url("plain.txt"), headers={"X-Reproxy-Failed": "1"})
    assert served.body == BODY and "X-Accel-Redirect" not in served.headers


def test_nginx_answer(devmogile: DevMogileFS, client: Client) -> None:
    app, _, _ = make(devmogile, reproxy="nginx", nginx_location="/internal-reproxy")
    response = app.get(url("café/日本.csv"))
    assert response.headers["X-Accel-Redirect"] == "/internal-reproxy"
    urls = [response.headers["X-Reproxy-URL"], response.headers["X-Reproxy-URL-2"]]
    assert sorted(urls) == sorted(client.get_paths("café/日本.csv"))
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    # A cache between nginx and the application keeps it for these alone: never for nginx's
    # request after every replica failed (it got the empty answer again), nor for another client.
    assert response.headers["Vary"] == "X-Sendfile-Type, X-Reproxy-Failed, Range, If-Range"


@pytest.mark.parametrize("reproxy", ["perlbal", "nginx"])
def test_reproxy_headers_are_withheld_from_untrusted_clients(devmogile: DevMogileFS, client: Client,
                                                            reproxy: str) -> None:
    app, _, _ = make(devmogile, reproxy=reproxy, trusted_proxies=["10.0.0.0/8", "192.168.1.7"])
    for address in ("127.0.0.1", "10.1.1.1", "192.168.1.7"):
        response = app.get(url("plain.txt"), extra_environ={"REMOTE_ADDR": address})
        reproxied = any(name.upper().startswith(("X-REPROXY", "X-ACCEL")) for name in response.headers)
        assert reproxied == (address != "127.0.0.1")
        assert response.body == (b"" if reproxied else BODY)
        assert b"http://" not in response.body


def test_require_proxy_header(devmogile: DevMogileFS, client: Client) -> None:
    app, _, _ = make(devmogile, reproxy="perlbal", trusted_proxies=["127.0.0.1"], require_proxy_header=True)
    trusted = {"REMOTE_ADDR": "127.0.0.1"}
    assert app.get(url("plain.txt"), extra_environ=trusted).body == BODY
    response = app.get(url("plain.txt"), extra_environ=trusted, headers={"X-Proxy-Capabilities": "reproxy-file"})
    assert "X-REPROXY-URL" in response.headers


def test_key_for_path_maps_urls_to_keys(devmogile: DevMogileFS, client: Client) -> None:
    client.store_content("avatar:42", BODY, cls="thumb")
    app, _, _ = make(devmogile, prefix="/avatars/",
                     key_for_path=lambda path: f"avatar:{path[:-4]}" if path.endswith(".png") else None)
    assert app.get("/avatars/42.png").body == BODY
    app.get("/avatars/42.gif", status=404)


def test_a_hot_key_costs_one_tracker_call(devmogile: DevMogileFS, client: Client) -> None:
    app, _, counting = make(devmogile, reproxy="perlbal")
    for _ in range(50):
        app.get(url("plain.txt"))
    assert counting.get_paths_calls == 1


def test_concurrent_first_requests_make_one_tracker_call(devmogile: DevMogileFS, client: Client) -> None:
    counting = CountingClient(DOMAIN, devmogile.trackers, delay=0.2)
    app = TestApp(MogileFSMiddleware(wrapped_app, client=counting), lint=True)
    barrier = threading.Barrier(20)
    bodies: list[bytes] = []

    def request() -> None:
        barrier.wait(5)
        bodies.append(app.get(url("plain.txt")).body)

    threads = [threading.Thread(target=request) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert bodies == [BODY] * 20
    assert counting.get_paths_calls == 1


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="reproxy"):
        MogileFSMiddleware(wrapped_app, domain="d", trackers=["127.0.0.1:7001"], reproxy="squid")
    with pytest.raises(ValueError, match="client, or a domain and trackers"):
        MogileFSMiddleware(wrapped_app, domain="d")
    with pytest.raises(ValueError, match="io_timeout: the given client has its own"):
        MogileFSMiddleware(wrapped_app, client=Client("d", ["127.0.0.1:7001"]), io_timeout=2)


@pytest.mark.parametrize(("option", "named"), [
    ({"domain": 123}, "domain must be"), ({"trackers": 7001}, "trackers must be"),
    ({"signing_key": 5}, "signing_key must be"), ({"mimetypes": {5: "image/heic"}}, "mimetypes maps"),
    ({"mimetypes": {b".heic": "image/heic"}}, "mimetypes maps"),
    # A mapping's keys, or a set's members in no order, were taken for the secrets (the first signs).
    ({"signing_key": {"s3cret": 1}}, "signing_key must be .* not dict"),
    ({"signing_key": {"new", "old"}}, "signing_key must be .* not set"),
    ({"signing_key": ["s3cret", 5]}, "^signing_key must be .* not a list holding int$"),  # the list, secret and all, was shown
    # An AttributeError or a TypeError naming none; a number or 4 bytes was taken for an address.
    ({"reproxy": "perlbal", "perlbal_fallback_url": 8000}, "perlbal_fallback_url must be an http:// URL"),
    ({"prefix": ""}, r"prefix must be a URL path such as '/mogilefs/' \('/' for every path\), not ''"),
    ({"trusted_proxies": 10}, "trusted_proxies must be a list of addresses or networks, not int"),
    ({"trusted_proxies": "10.0.0.1"}, "trusted_proxies must be .* not the string '10.0.0.1'"),
    ({"trusted_proxies": [5]}, "trusted proxy 5 is not an address.*not text"),
    ({"trusted_proxies": [b"abcd"]}, "trusted proxy b'abcd' is not an address.*not text"),
], ids=["domain", "trackers", "signing_key", "mimetypes-number", "mimetypes-bytes", "signing_key-dict",
        "signing_key-set", "signing_key-list-holding-a-number", "perlbal_fallback_url-number", "prefix-empty",
        "trusted_proxies-number", "trusted_proxies-string", "trusted_proxies-number-item",
        "trusted_proxies-bytes-item"])
def test_an_option_of_another_kind_is_a_value_error_naming_it(option: dict[str, object], named: str) -> None:
    """Not a TypeError from deep inside, nor (a domain that is a number) a 502 at every request."""
    from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware

    for middleware in (MogileFSMiddleware, ASGIMiddleware):
        with pytest.raises(ValueError, match=named):
            middleware(wrapped_app, **{"domain": "d", "trackers": ["127.0.0.1:7001"], **option})  # type: ignore[arg-type]


def test_an_application_that_is_none_is_refused_at_once() -> None:
    """It failed at the first request outside the prefix: a TypeError naming nothing."""
    from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware

    for middleware in (MogileFSMiddleware, ASGIMiddleware):
        with pytest.raises(ValueError, match="app must be the application to wrap, not None"):
            middleware(None, domain="d", trackers=["127.0.0.1:7001"])  # type: ignore[arg-type]


@pytest.mark.parametrize("client", [object(), "127.0.0.1:7001"], ids=["object", "address"])
def test_a_client_that_is_no_client_is_a_type_error_naming_what_it_needs(client: object) -> None:
    """An AttributeError from inside the locator: no get_paths answered as a blocking client would."""
    with pytest.raises(TypeError, match="needs a client of class Client .* not (object|str)"):
        MogileFSMiddleware(wrapped_app, client=client)  # type: ignore[arg-type]


def test_a_mapped_key_the_tracker_cannot_hold_is_a_400(devmogile: DevMogileFS) -> None:
    app, _, counting = make(devmogile, key_for_path=lambda path: "x" * 200 + path)
    app.get("/mogilefs/" + "y" * 100, status=400)
    assert counting.get_paths_calls == 0


def _established_to(port: int) -> int:
    """Established TCP connections whose server side is ``port`` (from /proc/net/tcp)."""
    count = 0
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "01" and int(local.split(":")[1], 16) == port:
            count += 1
    return count


def test_closing_the_response_midway_closes_the_storage_connection(devmogile: DevMogileFS, client: Client) -> None:
    client.store_content("big.bin", b"x" * (4 * 1024 * 1024), cls="thumb")
    middleware = MogileFSMiddleware(wrapped_app, client=client)
    node = _node_of(devmogile, client.get_paths("big.bin")[0])
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/mogilefs/big.bin", "SERVER_NAME": "x", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http", "wsgi.input": None}
    result = middleware(environ, lambda status, headers, exc_info=None: None)
    chunks = iter(result)
    assert len(next(chunks)) > 0
    assert _established_to(node.port) == 1
    result.close()  # what a server does when the client goes away
    deadline = time.monotonic() + 5
    while _established_to(node.port) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _established_to(node.port) == 0


def test_if_range_sends_the_range_only_while_the_etag_matches(devmogile: DevMogileFS, client: Client) -> None:
    app, _, _ = make(devmogile)
    etag = app.get(url("plain.txt")).headers["ETag"]
    same = app.get(url("plain.txt"), headers={"Range": "bytes=0-3", "If-Range": etag}, status=206)
    assert same.body == BODY[:4]
    changed = app.get(url("plain.txt"), headers={"Range": "bytes=0-3", "If-Range": '"fid-0"'}, status=200)
    assert changed.body == BODY


@pytest.mark.parametrize("reproxy", [None, "perlbal", "nginx"])
def test_a_server_changing_the_header_list_changes_no_later_answer(devmogile: DevMogileFS, client: Client,
                                                                   reproxy: str | None) -> None:
    """PEP 3333 lets a server change the list given to start_response in any way it likes."""
    _, middleware, _ = make(devmogile, reproxy=reproxy)

    def vandal(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
        answers.append((status, list(headers)))
        headers.clear()

    for path in (url("plain.txt"), url("plain.txt"), url("missing"), url("missing"), "/mogilefs/%ff", "/mogilefs/%ff"):
        answers: list[tuple[str, list[tuple[str, str]]]] = []
        for _ in range(2):
            body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": path}, vandal)
            getattr(body, "close", lambda: None)()
        assert answers[0] == answers[1] and answers[0][1], path


@pytest.mark.parametrize("prefix", ["/médias/", "/m%C3%A9dias/", "médias"])
def test_a_prefix_beyond_ascii_serves_the_paths_clients_send(devmogile: DevMogileFS, client: Client,
                                                              prefix: str) -> None:
    """Given as text or percent-encoded, it matches the path a browser sends (UTF-8, percent-encoded),
    in both middlewares, and url_for gives that path."""
    from integration.test_asgi import Recorder, http_scope, run
    from integration.test_hostile import call

    from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware

    sent = "/m%C3%A9dias/plain.txt"
    wsgi = MogileFSMiddleware(wrapped_app, client=client, prefix=prefix)
    status, _, body = call(wsgi, "GET", unquote_to_bytes(sent).decode("latin-1"), {})  # PATH_INFO, as PEP 3333
    assert (status, body) == (200, BODY) and wsgi.url_for("plain.txt") == sent
    messages = run(ASGIMiddleware(Recorder(), domain=DOMAIN, trackers=devmogile.trackers, prefix=prefix),
                   http_scope(sent), [])
    assert (messages[0]["status"], messages[1]["body"]) == (200, BODY)
