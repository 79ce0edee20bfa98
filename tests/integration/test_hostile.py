"""Hostile input under the prefix: every answer is documented, never a 500, never a leak."""

from __future__ import annotations

import re
from typing import Any

import pytest
from conftest import DOMAIN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from integration.test_middleware import BODY, CountingClient, wrapped_app
from webtest import TestApp
from wiretools import TEN, KeptAliveNode, ScriptedTracker, files_tracker, honest

from mogile_middleware import Client, StorageError
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.locate import is_replica_url
from mogile_middleware.middleware import MogileFSMiddleware
from mogile_middleware.storage import Target

OK, MISSING, BAD = {200}, {404}, {400}
RANGED = {200, 206, 416}
NOT_ALLOWED = {405}

# (id, method, PATH_INFO as a server gives it (percent-decoded bytes as latin-1), headers, statuses)
HOSTILE: list[tuple[str, str, str, dict[str, str], set[int]]] = [
    ("dotdot", "GET", "/mogilefs/../etc/passwd", {}, MISSING),
    ("encoded-dotdot", "GET", "/mogilefs/%2e%2e/secret", {}, MISSING),
    ("decoded-dotdot", "GET", "/mogilefs/a/../../b", {}, MISSING),
    ("encoded-slash", "GET", "/mogilefs/a%2Fb", {}, MISSING),
    ("backslashes", "GET", "/mogilefs/..\\..\\windows", {}, MISSING),
    ("double-slash", "GET", "/mogilefs//etc/passwd", {}, MISSING),
    ("absolute-url-key", "GET", "/mogilefs/http://169.254.169.254/latest", {}, MISSING),
    ("nul", "GET", "/mogilefs/plain.txt\x00.png", {}, BAD),
    ("cr", "GET", "/mogilefs/plain.txt\r", {}, BAD),
    ("lf", "GET", "/mogilefs/plain.txt\n", {}, BAD),
    ("crlf-header-injection", "GET", "/mogilefs/a\r\nX-REPROXY-URL: http://evil/", {}, BAD),
    ("crlf-location-injection", "GET", "/mogilefs/a\r\nLocation: http://evil/", {}, BAD),
    ("tab", "GET", "/mogilefs/a\tb", {}, BAD),
    ("escape", "GET", "/mogilefs/a\x1b[31m", {}, BAD),
    ("del", "GET", "/mogilefs/a\x7f", {}, BAD),
    ("c1-next-line", "GET", "/mogilefs/a\xc2\x85b", {}, BAD),  # U+0085 in UTF-8
    ("c1-csi", "GET", "/mogilefs/a\xc2\x9b31m", {}, BAD),
    ("overlong-256", "GET", "/mogilefs/" + "k" * 256, {}, BAD),
    ("overlong-10000", "GET", "/mogilefs/" + "k" * 10000, {}, BAD),
    ("invalid-utf8-ff", "GET", "/mogilefs/\xff", {}, BAD),
    ("invalid-utf8-truncated", "GET", "/mogilefs/\xc3", {}, BAD),
    ("invalid-utf8-overlong-slash", "GET", "/mogilefs/\xc0\xaf", {}, BAD),
    ("invalid-utf8-surrogate", "GET", "/mogilefs/\xed\xa0\x80", {}, BAD),
    ("invalid-utf8-5-byte", "GET", "/mogilefs/\xf8\x88\x80\x80\x80", {}, BAD),
    ("latin1-byte", "GET", "/mogilefs/caf\xe9", {}, BAD),
    ("range-empty-suffix", "GET", "/mogilefs/plain.txt", {"Range": "bytes=-"}, RANGED),
    ("range-letters", "GET", "/mogilefs/plain.txt", {"Range": "bytes=abc"}, RANGED),
    ("range-reversed", "GET", "/mogilefs/plain.txt", {"Range": "bytes=5-1"}, RANGED),
    ("range-many", "GET", "/mogilefs/plain.txt", {"Range": "bytes=" + ",".join(f"{n}-{n}" for n in range(500))}, RANGED),
    ("range-huge-start", "GET", "/mogilefs/plain.txt", {"Range": "bytes=99999999999999999999999-"}, RANGED),
    ("range-huge-end", "GET", "/mogilefs/plain.txt", {"Range": "bytes=0-18446744073709551616"}, RANGED),
    ("range-zero-suffix", "GET", "/mogilefs/plain.txt", {"Range": "bytes=-0"}, RANGED),
    ("range-huge-suffix", "GET", "/mogilefs/plain.txt", {"Range": "bytes=-99999999999999999999"}, RANGED),
    # More digits than any length, in serve mode and in the reproxy modes' 416 check.
    ("range-500-digits", "GET", "/mogilefs/plain.txt", {"Range": "bytes=" + "9" * 500 + "-"}, {416}),
    ("range-500-digit-suffix", "GET", "/mogilefs/plain.txt", {"Range": "bytes=-" + "9" * 500}, RANGED),
    # Past Python's 4300 digits of int(), and over 1 KiB: not read, all of the file.
    ("range-5000-digits", "GET", "/mogilefs/plain.txt", {"Range": "bytes=" + "9" * 5000 + "-"}, {200}),
    ("range-5000-digit-suffix", "GET", "/mogilefs/plain.txt", {"Range": "bytes=-" + "9" * 5000}, RANGED),
    ("range-other-unit", "GET", "/mogilefs/plain.txt", {"Range": "items=0-1"}, RANGED),
    ("range-spaces", "GET", "/mogilefs/plain.txt", {"Range": "bytes = 0 - 1"}, RANGED),
    ("range-negative", "GET", "/mogilefs/plain.txt", {"Range": "bytes=-5-10"}, RANGED),
    ("range-empty", "GET", "/mogilefs/plain.txt", {"Range": ""}, RANGED),
    ("head-bogus-range", "HEAD", "/mogilefs/plain.txt", {"Range": "bytes=x-y"}, RANGED),
    ("if-none-match-empty", "GET", "/mogilefs/plain.txt", {"If-None-Match": ""}, {200}),
    ("if-none-match-garbage", "GET", "/mogilefs/plain.txt", {"If-None-Match": "garbage"}, {200}),
    ("if-none-match-unterminated", "GET", "/mogilefs/plain.txt", {"If-None-Match": '"fid-1'}, {200, 304}),
    ("if-none-match-bare-weak", "GET", "/mogilefs/plain.txt", {"If-None-Match": "W/"}, {200}),
    ("if-none-match-stars", "GET", "/mogilefs/plain.txt", {"If-None-Match": "*,*"}, {200, 304}),
    ("if-none-match-long-list", "GET", "/mogilefs/plain.txt",
     {"If-None-Match": ", ".join(f'"fid-{n}0000"' for n in range(2000))}, {200}),
    ("if-range-garbage", "GET", "/mogilefs/plain.txt", {"If-Range": "\x01garbage", "Range": "bytes=0-1"}, RANGED),
    ("if-modified-since-garbage", "GET", "/mogilefs/plain.txt", {"If-Modified-Since": "yesterday"}, {200}),
    ("huge-user-agent", "GET", "/mogilefs/plain.txt", {"User-Agent": "x" * 65536}, {200}),
    ("huge-cookie", "GET", "/mogilefs/plain.txt", {"Cookie": "a=" + "b" * 65536}, {200}),
    ("proxy-capabilities-spoof", "GET", "/mogilefs/plain.txt", {"X-Proxy-Capabilities": "reproxy-file"}, {200}),
    ("sendfile-type-spoof", "GET", "/mogilefs/plain.txt", {"X-Sendfile-Type": "X-Accel-Redirect"}, {200}),
    ("forwarded-for-spoof", "GET", "/mogilefs/plain.txt", {"X-Forwarded-For": "10.0.0.1"}, {200}),
    ("post", "POST", "/mogilefs/plain.txt", {}, NOT_ALLOWED),
    ("put", "PUT", "/mogilefs/plain.txt", {}, NOT_ALLOWED),
    ("delete", "DELETE", "/mogilefs/plain.txt", {}, NOT_ALLOWED),
    ("patch", "PATCH", "/mogilefs/plain.txt", {}, NOT_ALLOWED),
    ("options", "OPTIONS", "/mogilefs/plain.txt", {}, NOT_ALLOWED),
    ("trace", "TRACE", "/mogilefs/plain.txt", {}, NOT_ALLOWED),
    ("connect", "CONNECT", "/mogilefs/plain.txt", {}, NOT_ALLOWED),
    ("lower-case-get", "get", "/mogilefs/plain.txt", {}, NOT_ALLOWED),
    ("made-up-method", "GETX", "/mogilefs/plain.txt", {}, NOT_ALLOWED),
    ("empty-key", "GET", "/mogilefs/", {}, MISSING),
    ("query-injection", "GET", "/mogilefs/plain.txt", {}, OK),
]

MODES = {
    "serve": {},
    "perlbal-untrusted": {"reproxy": "perlbal", "trusted_proxies": ["10.9.9.9"]},
    "nginx-untrusted": {"reproxy": "nginx", "trusted_proxies": ["10.9.9.9"]},
    "perlbal-trusted": {"reproxy": "perlbal", "trusted_proxies": ["127.0.0.1"]},
    "nginx-trusted": {"reproxy": "nginx", "trusted_proxies": ["127.0.0.1"]},
}


def call(app: Any, method: str, path_info: str, headers: dict[str, str], query: str = "") -> tuple[int, list, bytes]:
    """Call ``app`` as a WSGI server would, with a raw PATH_INFO; return status, headers, body."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method, "PATH_INFO": path_info, "QUERY_STRING": query, "SCRIPT_NAME": "",
        "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http", "wsgi.input": None, "wsgi.errors": None, "wsgi.version": (1, 0),
        "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False,
    }
    environ.update({"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()})
    started: list[Any] = []

    def start_response(status: str, response_headers: list, exc_info: Any = None) -> None:
        started[:] = [status, response_headers]

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return int(started[0].split()[0]), started[1], body


@pytest.fixture
def stored(devmogile: DevMogileFS) -> Client:
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content("plain.txt", BODY, cls="avatar")
    return client


@pytest.mark.parametrize("mode", list(MODES))
def test_hostile_requests_get_documented_answers(devmogile: DevMogileFS, stored: Client, mode: str) -> None:
    counting = CountingClient(DOMAIN, devmogile.trackers)
    app = MogileFSMiddleware(wrapped_app, client=counting, **MODES[mode])
    storage_ports = [str(node.port) for node in devmogile.nodes]
    trusted = mode.endswith("-trusted")
    failures = []
    for name, method, path_info, headers, statuses in HOSTILE:
        query = "x=%0D%0ASet-Cookie:+a" if name == "query-injection" else ""
        status, response_headers, body = call(app, method, path_info, headers, query)
        if status not in statuses:
            failures.append(f"{name}: {status}, expected {sorted(statuses)}")
        for header, value in response_headers:
            if any(c in header + value for c in "\r\n\x00"):
                failures.append(f"{name}: control character in {header}: {value!r}")
        if not trusted:
            leaked = [h for h, v in response_headers if h.upper().startswith(("X-REPROXY", "X-ACCEL"))
                      or any(port in v for port in storage_ports)]
            if leaked or any(port.encode() in body for port in storage_ports):
                failures.append(f"{name}: internal URL or reproxy header leaked: {leaked}")
        if b"Traceback" in body:
            failures.append(f"{name}: traceback in the body")
    assert failures == []
    assert len(HOSTILE) >= 50


def test_bad_keys_never_reach_the_tracker(devmogile: DevMogileFS) -> None:
    counting = CountingClient(DOMAIN, devmogile.trackers)
    app = MogileFSMiddleware(wrapped_app, client=counting)
    for _, method, path_info, headers, statuses in HOSTILE:
        if statuses in (BAD, NOT_ALLOWED):
            call(app, method, path_info, headers)
    assert counting.get_paths_calls == 0


@pytest.mark.parametrize(
    "header",
    ["X-REPROXY-URL", "X-Reproxy-URL", "x-reproxy-url-2", "X-REPROXY-FILE", "X-REPROXY-SERVICE",
     "X-REPROXY-CACHE-FOR", "X-Accel-Redirect", "x-accel-redirect"],
)
def test_the_wrapped_app_cannot_send_reproxy_headers(devmogile: DevMogileFS, header: str) -> None:
    def sneaky(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), (header, "http://10.0.0.5:7500/secret"),
                                  ("X-Accel-Buffering", "no")])
        return [b"sneaky"]

    for reproxy in (None, "perlbal", "nginx"):
        blocked = TestApp(MogileFSMiddleware(sneaky, domain=DOMAIN, trackers=devmogile.trackers, reproxy=reproxy))
        response = blocked.get("/page")
        assert header.lower() not in {name.lower() for name in response.headers}
        assert response.headers["X-Accel-Buffering"] == "no" and response.body == b"sneaky"
    allowed = TestApp(MogileFSMiddleware(sneaky, domain=DOMAIN, trackers=devmogile.trackers, allow_app_reproxy=True))
    assert allowed.get("/page").headers[header] == "http://10.0.0.5:7500/secret"


def test_replica_urls_no_proxy_could_fetch_are_dropped(devmogile: DevMogileFS, stored: Client) -> None:
    class Hostile(Client):
        def get_paths(self, key, *args, **kwargs):
            return ["http://10.0.0.5:7500/a\r\nX-Evil: 1", "http://x/ y", "http://10.0.0.5:99999/1.fid",
                    "http://10.0.0.5:abc/1.fid", "http://10.0.0.5:0/1.fid", "http://[::1/1.fid", "http:///1.fid",
                    "https://10.0.0.5/1.fid", *super().get_paths(key)]

    app = TestApp(MogileFSMiddleware(wrapped_app, client=Hostile(DOMAIN, devmogile.trackers), reproxy="perlbal"))
    urls = app.get("/mogilefs/plain.txt").headers["X-REPROXY-URL"].split(" ")
    assert sorted(urls) == sorted(stored.get_paths("plain.txt"))


# Keys a site may hold: any text without control characters, at most 255 bytes of UTF-8.
valid_keys = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=60
).filter(lambda key: len(key.encode()) <= 255)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=valid_keys, data=st.binary(min_size=0, max_size=2000))
def test_every_valid_key_round_trips(devmogile: DevMogileFS, key: str, data: bytes) -> None:
    client = Client(DOMAIN, devmogile.trackers)
    client.store_content(key, data, cls="thumb")
    path_info = "/mogilefs/" + key.encode().decode("latin-1")
    served = call(MogileFSMiddleware(wrapped_app, client=client), "GET", path_info, {})
    assert served[0] == 200 and served[2] == data
    status, headers, body = call(MogileFSMiddleware(wrapped_app, client=client, reproxy="perlbal"), "GET", path_info, {})
    reproxy = dict(headers)
    assert status == 200 and body == b""
    assert reproxy["ETag"] == dict(served[1])["ETag"] and reproxy["Content-Type"] == dict(served[1])["Content-Type"]
    assert sorted(reproxy["X-REPROXY-URL"].split(" ")) == sorted(client.get_paths(key))


invalid_keys = st.one_of(
    st.text(min_size=0, max_size=20).flatmap(
        lambda prefix: st.sampled_from([chr(c) for c in [*range(0x20), 0x7F]]).map(lambda bad: prefix + bad)
    ).map(lambda key: key.encode("utf-8", "surrogatepass").decode("latin-1")),
    st.binary(min_size=1, max_size=20).filter(lambda raw: not _is_utf8(raw)).map(lambda raw: raw.decode("latin-1")),
    st.text(st.characters(min_codepoint=0x80, max_codepoint=0x7FF), min_size=128, max_size=140).map(
        lambda key: key.encode().decode("latin-1")),
)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw_key=invalid_keys)
def test_every_invalid_key_is_a_400_without_a_tracker_call(devmogile: DevMogileFS, raw_key: str) -> None:
    counting = CountingClient(DOMAIN, devmogile.trackers)
    status, _, _ = call(MogileFSMiddleware(wrapped_app, client=counting), "GET", "/mogilefs/" + raw_key, {})
    assert status == 400
    assert counting.get_paths_calls == 0


# Any key a site may hold, URL-like ones too: never a 500, every header value latin-1 without
# control characters, whatever the mode and the content policy.
url_like_keys = st.one_of(
    valid_keys,
    st.tuples(st.sampled_from(["data:text/html,", "data:text/€,", "javascript:", "http://evil/", "//x/", "?a=",
                               "#", "../", "%2e%2e/", "file:///"]), valid_keys).map("".join),
).filter(lambda key: len(key.encode()) <= 255)
HEADER_SAFE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def assert_headers_are_safe(headers: list[tuple[str, str]]) -> None:
    for name, value in headers:
        assert HEADER_SAFE.fullmatch(value), (name, value)
        value.encode("latin-1")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=url_like_keys, stored=st.booleans())
def test_any_key_gets_safe_headers_in_every_mode(devmogile: DevMogileFS, key: str, stored: bool) -> None:
    client = Client(DOMAIN, devmogile.trackers)
    if stored:
        client.store_content(key, b"bytes", cls="thumb")
    path_info = "/mogilefs/" + key.encode().decode("latin-1")
    for options in ({}, {"reproxy": "perlbal"}, {"reproxy": "nginx"}, {"content_disposition": "attachment"},
                    {"trusted_files": True, "reproxy": "perlbal", "content_disposition": "inline"}):
        status, headers, _ = call(MogileFSMiddleware(wrapped_app, client=client, **options), "GET", path_info, {})
        assert status in ((200,) if stored else (404,)), (options, status)
        assert_headers_are_safe(headers)
    if stored:
        client.delete(key)


def test_a_trackers_text_cannot_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """An error text that decodes to CR/LF is logged escaped, on the line of the error."""
    forged = b"ERR failure oops%0D%0A2026-12-01+INFO+forged+line\r\n"
    tracker = ScriptedTracker(lambda line: forged)
    try:
        middleware = MogileFSMiddleware(wrapped_app, client=Client(DOMAIN, [tracker.tracker]))
        status, _, _ = call(middleware, "GET", "/mogilefs/any.txt", {})
    finally:
        tracker.stop()
    assert status == 502
    messages = [record.getMessage() for record in caplog.records]
    assert any("forged" in message for message in messages)
    assert not any("\n" in message or "\r" in message for message in messages)


def _answer_of(tracker: ScriptedTracker, node: KeptAliveNode, path: str, **options: Any) -> Any:
    """The answer to a GET of ``path``, from a trusted proxy, of a middleware asking ``tracker``;
    the tracker and the node stopped after."""
    try:
        app = TestApp(MogileFSMiddleware(wrapped_app, client=Client(DOMAIN, [tracker.tracker]), **options))
        proxy = {"X-Proxy-Capabilities": "reproxy-file", "X-Sendfile-Type": "X-Accel-Redirect"}
        return app.get(path, headers=proxy, expect_errors=True)
    finally:
        tracker.stop()
        node.stop()


@pytest.mark.parametrize("mode", ["perlbal", "nginx", None])
def test_a_tracker_listing_more_replicas_than_asked_for_is_read_for_two(mode: str | None) -> None:
    """mogilefsd lists as many as asked for (two): 1,000 from a misspeaking tracker went into
    the reproxy headers (53 KB, or 1,000 headers), and serve mode tried each (a storage_timeout
    each when silent, until gunicorn killed the worker: a 500)."""
    node = KeptAliveNode(lambda head: b"HTTP/1.0 500 Oops\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
    urls = [f"http://127.0.0.1:{node.port}/dev{n}/0/000/000/0000000001.fid" for n in range(1, 1001)]
    reply = _answer_of(files_tracker({"k": (1, 10, urls)}), node, "/mogilefs/k", reproxy=mode)
    if mode == "perlbal":
        assert reply.headers["X-REPROXY-URL"].split() == urls[:2]
    elif mode == "nginx":
        assert [reply.headers.get(name) for name in ("X-Reproxy-URL", "X-Reproxy-URL-2", "X-Reproxy-URL-3")] == \
            [*urls[:2], None]
    else:
        assert reply.status_int == 502 and len(node.requests) == 2


@pytest.mark.parametrize("listed", [
    pytest.param(["/0000000001.fid", "/0000000002.fid"], id="another-fid-listed-second"),
    pytest.param(["/0000000002.fid#/0000000001.fid"], id="a-fid-in-the-fragment"),
    pytest.param(["/0000000002.fid?/0000000001.fid"], id="a-fid-in-the-query"),
])
def test_a_replica_of_another_file_is_never_served_under_the_first_ones_etag(listed: list[str]) -> None:
    """The ETag was read from the first URL alone, and from its query or fragment too, which no
    node reads: fid 2's bytes were served under ETag "fid-1", and a later If-None-Match "fid-1"
    got a 304 for them."""
    node = KeptAliveNode(lambda head: b"HTTP/1.0 500 Oops\r\nContent-Length: 0\r\n\r\n" if b"0000000001.fid" in
                         head.split(b"?")[0] else b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n9876543210")
    tracker = files_tracker({"k": (1, 10, [f"http://127.0.0.1:{node.port}/dev1/0/000/000{path}" for path in listed])})
    reply = _answer_of(tracker, node, "/mogilefs/k")
    assert b"9876543210" not in reply.body and reply.status_int in (502, 503)


@pytest.mark.parametrize(("answered_for", "status"), [("other.txt", 503), ("fid:2", 200)],
                         ids=["another-key", "the-filepaths-plugins-name"])
def test_a_file_info_about_another_key_is_not_taken_for_the_keys(answered_for: str, status: int) -> None:
    """A tracker answering another request (or a proxy in front of it mixing them up): the key
    was served with the other file's ETag and bytes. The FilePaths plugin names every key
    ``fid:<fid>`` in file_info's answer: that one is the key's."""
    node = KeptAliveNode(honest)
    url = f"http://127.0.0.1:{node.port}/dev1/0/000/000/0000000002.fid"
    knowing_the_other = files_tracker({answered_for: (2, 10, [url])})
    knowing_the_other.stop()  # its script answers through the tracker below
    asked, told = b"key=asked.txt", f"key={answered_for}".encode()
    tracker = ScriptedTracker(lambda line: knowing_the_other.script(line.replace(asked, told)))
    reply = _answer_of(tracker, node, "/mogilefs/asked.txt")
    assert reply.status_int == status and (reply.body == TEN) is (status == 200)
    assert ("ETag" in reply.headers) is (status == 200)


@pytest.mark.parametrize(("url", "usable"), [
    ("http://10.0.0.1:7500/dev1/0/000/000/0000000001.fid", True),
    ("http://[fe80::1%25eth0]:7500/dev1/0/000/000/0000000001.fid", True),
    ("http://lb/@store1/dev1/0/000/000/0000000001.fid", True),  # an @ in the path names no user
    ("http://10.0.0.1:7500/dev1/0/000/000/0000000001.fid?signature=abc", True),
    ("http://user@10.0.0.1:7500/dev1/0/000/000/0000000001.fid", False),
    ("http://10.0.0.1:7500/dev1/0/000/000/0000000002.fid#/0000000001.fid", False),
    ("http://10.0.0.1:7500/" + "d" * 2048 + "/0000000001.fid", False),
    ("http://[::1]:7500/dev1/0/000/000/0000000001.fid", True),
    # Read by urlsplit as the host ::1 port 7500, which they do not name (nginx refuses them).
    ("http://[::1]x:7500/dev1/0/000/000/0000000001.fid", False),
    ("http://[::1]]:7500/dev1/0/000/000/0000000001.fid", False),
    ("http://[v1.example]:7500/dev1/0/000/000/0000000001.fid", False),
    ("http://::1:7500/dev1/0/000/000/0000000001.fid", False),  # mogilefsd's own, of a host stored as ::1
])
def test_replica_urls_as_storage_nodes_give_them_are_usable(url: str, usable: bool) -> None:
    assert is_replica_url(url) is usable
    if not usable and "[" in url:  # nor is it read by the clients, which would ask ::1
        with pytest.raises(StorageError, match="bad storage URL"):
            Target(url)
