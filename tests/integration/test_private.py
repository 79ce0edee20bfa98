"""Private files: signed, expiring URLs, ``authorize``, and a key's file answered from a view.

Through gunicorn (the WSGI middleware) and uvicorn (the ASGI one) over the development MogileFS,
every answer read off a real connection; the tracker lookups counted by the test application's
client; then through real Perlbal and nginx. Property tests of the signatures run in process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import http.client
import socket
import string
import subprocess
import sys
import math
import os
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import CLASSES, DOMAIN, require_module
from hypothesis import given, settings
from hypothesis import strategies as st
from integration._gunicorn import run_gunicorn, run_uvicorn
from integration._wire_client import raw_http, read_http_reply
from integration.test_asgi import run
from integration.test_middleware import wrapped_app
from integration.test_proxies import SERVERS, serving
from wiretools import KeptAliveNode, files_tracker

from mogile_middleware import BadKeyError, Client, MogileFSMiddleware, StorageError, serve_header
from mogile_middleware.core import FALLBACK_GRACE_SECONDS
from mogile_middleware.views import served_file
from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.signing import BAD_SIGNATURE, EXPIRED, UNSIGNED, URLSigner

require_module("gunicorn")

SECRET, OLD_SECRET = "signing-secret-2026", "signing-secret-2025"
FILES = {
    "plain.txt": b"plain\n" * 50,
    "with space.txt": b"a name with a space\n" * 50,
    "naïve/résumé.pdf": b"%PDF utf-8 name\n" * 50,
    "a&b=c?.txt": b"ampersand, equals, question mark\n" * 50,
    "100%.txt": b"a percent sign\n" * 50,
    "private/doc.txt": b"no one's but the view's\n" * 50,
}
#: Headers only a file's answer carries.
FILE_HEADERS = ("etag", "content-disposition", "x-reproxy-url", "x-accel-redirect", "accept-ranges")


def signer(secret: str = SECRET, clock: float | None = None) -> URLSigner:
    return URLSigner(secret, DOMAIN, clock=(lambda: clock) if clock is not None else time.time)


def signed_url(key: str, *, secret: str = SECRET, expires_in: float = 300, clock: float | None = None) -> str:
    """The URL :meth:`MogileFSMiddleware.url_for` gives, made here for any secret and time."""
    return f"/mogilefs/{quote(key)}?{signer(secret, clock).query(key, expires_in)}"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class Server:
    """A running application server with the middleware, asked on one kept-alive connection."""

    def __init__(self, port: int, count_file: Path) -> None:
        self.port = port
        self.count_file = count_file
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def get(self, target: str, headers: dict[str, str] | None = None, method: str = "GET") -> Answer:
        self._connection.request(method, target, headers=headers or {})
        response = self._connection.getresponse()
        body = response.read()
        if response.getheader("Connection", "").lower() == "close":
            self._connection.close()
        return Answer(response.status, {name.lower(): value for name, value in response.getheaders()}, body)

    def lookups(self) -> int:
        """Tracker lookups made by the application so far."""
        return len(self.count_file.read_text().splitlines()) if self.count_file.exists() else 0


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevMogileFS]:
    with DevMogileFS(tmp_path_factory.mktemp("mogdata"), domains={DOMAIN: CLASSES}) as mogile:
        client = Client(DOMAIN, mogile.trackers)
        for key, content in FILES.items():
            client.store_content(key, content, "avatar")
        client.close()
        yield mogile


@pytest.fixture(scope="module", params=[*SERVERS, "uvicorn-h11"])
def server(request: pytest.FixtureRequest, stored: DevMogileFS, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    """gunicorn, uvicorn and uvicorn with h11 (its other HTTP parser) in turn, signing with SECRET
    (OLD_SECRET still accepted), refusing private/ keys."""
    count_file = tmp_path_factory.mktemp("count") / "lookups"
    env = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": stored.trackers[0], "MOGILE_SIGNING_KEY": f"{SECRET} {OLD_SECRET}",
           "MOGILE_AUTHORIZE": "1", "MOGILE_COUNT_FILE": str(count_file)}
    if request.param == "gunicorn":
        running_server = run_gunicorn(env)
    else:
        running_server = run_uvicorn(env, extra_args=["--http", "h11"] if request.param == "uvicorn-h11" else [])
    with running_server as running:
        yield Server(running.port, count_file)


def assert_refused(answer: Answer, reason: str | None = None) -> None:
    """A 403 with a short reason, carrying nothing of any file."""
    assert answer.status == 403, answer
    assert not any(name in answer.headers for name in FILE_HEADERS), answer.headers
    assert answer.headers["cache-control"] == "no-store"
    assert not any(content in answer.body for content in FILES.values())
    if reason:
        assert reason.encode() in answer.body


def test_a_signed_url_lasts_at_least_what_was_asked_and_has_one_spelling() -> None:
    url_signer = signer(clock=1_800_000_000.6)
    query = url_signer.query("a.txt", 0.3)  # within the same second: not expired when made
    assert query.startswith("expires=1800000001&") and url_signer.refusal("a.txt", query) is None
    assert url_signer.refusal("a.txt", query.replace("expires=", "expires=0")) is not None  # the same time, spelt again
    with pytest.raises(ValueError, match="latest time a signed URL holds"):
        url_signer.query("a.txt", 1e12)  # a URL nothing would verify
    for never in (0, -1, math.inf, math.nan, None, "600", True):  # True was a link of a second
        with pytest.raises(ValueError, match="expires_in"):
            url_signer.query("a.txt", never)  # type: ignore[arg-type]


def test_url_for_signs_as_the_middleware_checks() -> None:
    middleware = MogileFSMiddleware(lambda e, s: [], domain=DOMAIN, trackers=["127.0.0.1:1"], signing_key=SECRET)
    url = middleware.url_for("with space.txt", expires_in=60)
    assert url.startswith("/mogilefs/with%20space.txt?expires=")
    path, _, query = url.partition("?")
    assert middleware.key_for({"QUERY_STRING": query}, "with space.txt") == "with space.txt"
    plain = MogileFSMiddleware(lambda e, s: [], domain=DOMAIN, trackers=["127.0.0.1:1"])
    assert plain.url_for("a&b=c?.txt") == "/mogilefs/a%26b%3Dc%3F.txt"
    assert plain.url_for("café.txt".encode()) == "/mogilefs/caf%C3%A9.txt"
    for path in (42, b"a.txt"):  # an AttributeError from deep inside
        with pytest.raises(TypeError, match="path must be the text of a URL path"):
            plain.url_for("a.txt", path=path)  # type: ignore[arg-type]


def test_a_url_under_the_prefix_slash_never_names_another_host(stored: DevMogileFS) -> None:
    """The key ``/evil.example/x.png`` under the prefix ``/`` was linked as ``//evil.example/x.png``:
    a browser asks the host ``evil.example`` for it, and for a signed link sends it the token."""
    from webtest import TestApp

    Client(DOMAIN, stored.trackers).store_content("/evil.example/x.png", b"ours", "thumb")
    for signing_key in (None, SECRET):
        middleware = MogileFSMiddleware(lambda e, s: [], domain=DOMAIN, trackers=stored.trackers, prefix="/",
                                        signing_key=signing_key)
        url = middleware.url_for("/evil.example/x.png")
        assert url.startswith("/%2Fevil.example/x.png")
        assert TestApp(middleware).get(url).body == b"ours"


@pytest.mark.parametrize("key", ["x\udcff", b"x\xff"], ids=["surrogate-escaped", "bytes"])
def test_a_key_that_is_not_utf8_is_refused_where_a_url_or_a_view_would_name_it(key: str | bytes) -> None:
    # The middleware answers a path that is not UTF-8 with a 400: no URL serves such a key.
    middleware = MogileFSMiddleware(lambda e, s: [], domain=DOMAIN, trackers=["127.0.0.1:1"], signing_key=SECRET)
    with pytest.raises(BadKeyError, match="not UTF-8: no URL names it"):
        middleware.url_for(key)
    with pytest.raises(BadKeyError, match="not UTF-8: no URL names it"):
        serve_header(key)


def test_no_url_is_given_for_a_path_with_a_dot_segment() -> None:
    """A browser asks for ``/mogilefs/b.txt`` when linked to ``/mogilefs/a/../b.txt``: another key."""
    plain = MogileFSMiddleware(lambda e, s: [], domain=DOMAIN, trackers=["127.0.0.1:1"])
    mapped = MogileFSMiddleware(lambda e, s: [], domain=DOMAIN, trackers=["127.0.0.1:1"], signing_key=SECRET,
                                key_for_path=lambda path: path.upper())
    for named in ("a/../b.txt", "./b.txt", "a/.", ".."):
        with pytest.raises(BadKeyError, match="segment, which clients remove from a URL"):
            plain.url_for(named)
        with pytest.raises(BadKeyError, match="segment, which clients remove from a URL"):
            mapped.url_for("B.TXT", path=named)
    with pytest.raises(BadKeyError, match="control character '\\\\t', which the middleware answers with a 400"):
        plain.url_for("a\tb.txt")  # its link was answered 400
    # A key a view serves needs no URL of its own.
    assert served_file(serve_header("a/../b.txt")[1]) == ("a/../b.txt", None)
    assert plain.url_for("a/.b/c..txt") == "/mogilefs/a/.b/c..txt"
    assert mapped.url_for("A/../B.TXT", path="a.b").startswith("/mogilefs/a.b?")


@pytest.mark.parametrize("key", [key for key in FILES if not key.startswith("private/")])
def test_a_signed_url_serves_its_key(server: Server, key: str) -> None:
    answer = server.get(signed_url(key))
    assert (answer.status, answer.body) == (200, FILES[key])
    assert answer.headers["cache-control"] == "private"  # no shared cache keeps it for others
    assert server.get(signed_url(key, secret=OLD_SECRET)).body == FILES[key]  # the secret before: still valid


def refused_targets(key: str) -> Iterator[tuple[str, str, str]]:
    """(name, request target, reason) of every way a request for ``key`` must be refused."""
    url = signed_url(key)
    path, _, query = url.partition("?")
    yield "unsigned", path, UNSIGNED
    other = "with space.txt" if key == "plain.txt" else "plain.txt"
    yield "another key's", f"{path}?{signed_url(other).partition('?')[2]}", BAD_SIGNATURE
    yield "expired", signed_url(key, expires_in=10, clock=time.time() - 60), EXPIRED
    yield "unknown secret", signed_url(key, secret="a guess"), BAD_SIGNATURE
    yield "extra parameter", f"{url}&download=1", BAD_SIGNATURE
    yield "repeated parameter", f"{url}&{query.split('&')[1]}", BAD_SIGNATURE
    yield "reordered", f"{path}?{'&'.join(reversed(query.split('&')))}", BAD_SIGNATURE
    yield "longer expiry", url.replace("expires=", "expires=1", 1), BAD_SIGNATURE
    # A "?" after the "#" is the fragment's (RFC 3986, 3.5): h11 cuts the target at the "?" first.
    yield "query inside the fragment", f"{path}#x?{query}", UNSIGNED
    for position in range(len("/mogilefs/"), len(url)):
        if url[position] in "?&=":
            continue
        flipped = url[:position] + _other(url[position]) + url[position + 1:]
        yield f"changed at {position}", flipped, ""


def _other(character: str) -> str:
    """Another character of the same kind, so the URL stays well formed."""
    alphabet = string.digits if character.isdigit() else string.ascii_letters
    return alphabet[(alphabet.find(character) + 1) % len(alphabet)] if character.isalnum() else "x"


@pytest.mark.parametrize("key", ["plain.txt", "naïve/résumé.pdf", "a&b=c?.txt"])
def test_anything_but_the_exact_signed_url_is_refused_without_asking_a_tracker(server: Server, key: str) -> None:
    before = server.lookups()
    for name, target, reason in refused_targets(key):
        answer = server.get(target)
        assert answer.status == 403, (name, target)
        assert_refused(answer, reason)
    assert server.lookups() == before


def test_without_a_raw_path_a_link_signed_for_a_key_opens_no_key_with_more_after_a_hash(stored: DevMogileFS) -> None:
    # raw_path is optional in ASGI: a "#" in the decoded path is then a %23, part of the key.
    middleware = ASGIMiddleware(wrapped_app, domain=DOMAIN, trackers=stored.trackers, signing_key=SECRET)
    path, _, query = signed_url("plain.txt").partition("?")
    scope = {"type": "http", "method": "GET", "path": f"{path}#x", "query_string": query.encode(), "root_path": "",
             "client": ("127.0.0.1", 5000), "http_version": "1.1", "scheme": "http", "headers": []}
    assert run(middleware, scope, [{"type": "http.request"}])[0]["status"] == 403
    assert run(middleware, {**scope, "path": path}, [{"type": "http.request"}])[0]["status"] == 200


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_a_link_that_expired_while_the_proxy_tried_the_replicas_opens_its_file_when_it_asks_again(
        stored: DevMogileFS, flavour: str) -> None:
    """nginx asks again with X-Reproxy-Failed once every replica failed (examples/nginx.conf waits
    5 s for each): a link valid when the client asked may have expired meanwhile. That request, from
    a trusted proxy, still opens the file for a while; a client's own request, an untrusted one and
    a link expired longer ago do not."""
    def status(target: str, failed: bool, client: str) -> tuple[int, bytes]:
        path, _, query = target.partition("?")
        headers = [(b"x-reproxy-failed", b"1")] if failed else []
        scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(),
                 "query_string": query.encode(), "root_path": "", "client": (client, 5000), "http_version": "1.1",
                 "scheme": "http", "headers": headers}
        if flavour == "asgi":
            sent = run(ASGIMiddleware(wrapped_app, **options), scope, [{"type": "http.request"}])
            return sent[0]["status"], b"".join(message.get("body", b"") for message in sent[1:])
        from webtest import TestApp

        answer = TestApp(MogileFSMiddleware(wrapped_app, **options)).get(
            target, headers={"X-Reproxy-Failed": "1"} if failed else {}, extra_environ={"REMOTE_ADDR": client},
            expect_errors=True)
        return answer.status_int, answer.body

    options = {"domain": DOMAIN, "trackers": stored.trackers, "signing_key": SECRET, "reproxy": "nginx",
               "trusted_proxies": ["127.0.0.1"]}
    lately = signed_url("plain.txt", expires_in=10, clock=time.time() - 20)
    long_ago = signed_url("plain.txt", expires_in=10, clock=time.time() - 10 - FALLBACK_GRACE_SECONDS - 10)
    assert status(lately, True, "127.0.0.1") == (200, FILES["plain.txt"])
    for target, failed, client in ((lately, False, "127.0.0.1"), (lately, True, "192.0.2.1"),
                                   (long_ago, True, "127.0.0.1")):
        assert status(target, failed, client) == (403, f"403 Forbidden\n{EXPIRED}\n".encode()), (target, failed, client)


@pytest.mark.parametrize("run", [run_gunicorn, run_uvicorn], ids=["gunicorn", "uvicorn"])
def test_a_proxys_request_again_of_a_link_expired_meanwhile_is_answered_through_the_server(
        stored: DevMogileFS, run: Any) -> None:
    """Read off the socket: the file with each header once for the proxy's request again, a
    bare 403 for the client's own."""
    env = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": stored.trackers[0], "MOGILE_SIGNING_KEY": SECRET,
           "MOGILE_REPROXY": "nginx", "MOGILE_TRUSTED_PROXIES": "127.0.0.1"}
    target = signed_url("plain.txt", expires_in=10, clock=time.time() - 20)
    with run(env) as running:
        for mark, status in (("X-Reproxy-Failed: 1\r\n", 200), ("", 403)):
            reply = raw_http(running.port, f"GET {target} HTTP/1.1\r\nHost: media\r\n{mark}Connection: close\r\n\r\n"
                             .encode())
            names = [name for name, _ in reply.fields]
            assert (reply.status, len(names)) == (status, len(set(names))), reply
            if status == 200:
                assert reply.body == FILES["plain.txt"] and reply.headers["cache-control"] == "private"
                assert "x-accel-redirect" not in reply.headers  # asked again: served, not sent back to the replicas
            else:
                assert reply.body == f"403 Forbidden\n{EXPIRED}\n".encode()
                assert not any(name in reply.headers for name in FILE_HEADERS)


def test_head_ranges_and_revalidation_with_a_valid_signature(server: Server) -> None:
    url = signed_url("plain.txt")
    whole = server.get(url)
    head = server.get(url, method="HEAD")
    assert (head.status, head.body, head.headers["content-length"]) == (200, b"", str(len(FILES["plain.txt"])))
    ranged = server.get(url, {"Range": "bytes=6-11"})
    assert (ranged.status, ranged.body) == (206, FILES["plain.txt"][6:12])
    assert server.get(url, {"Range": "bytes=5000-"}).status == 416
    assert server.get(url, {"If-None-Match": whole.headers["etag"]}).status == 304
    assert_refused(server.get(signed_url("plain.txt").partition("?")[0], {"If-None-Match": whole.headers["etag"]}))


def test_authorize_refuses_even_a_valid_signature_without_asking_a_tracker(server: Server) -> None:
    before = server.lookups()
    assert_refused(server.get(signed_url("private/doc.txt")))
    assert server.lookups() == before


def test_paths_outside_the_prefix_are_the_applications(server: Server) -> None:
    assert (server.get("/elsewhere").status, server.get("/elsewhere").body) == (200, b"hello from the app\n")


def test_a_view_serves_a_key_after_its_own_check(server: Server) -> None:
    allowed = {"X-Test-User": "allowed"}
    assert server.get("/view/private/doc.txt").status == 403  # the view's own refusal
    answer = server.get("/view/private/doc.txt", allowed)
    assert (answer.status, answer.body) == (200, FILES["private/doc.txt"])
    assert answer.headers["cache-control"] == "private"
    assert "x-app-header" not in answer.headers and "x-mogile-middleware-serve" not in answer.headers
    assert answer.headers["set-cookie"] == "session=renewed; HttpOnly"  # the view's cookie is kept
    download = server.get(f"/view/{quote('naïve/résumé.pdf')}?download={quote('Résumé 2026.pdf')}", allowed)
    assert download.body == FILES["naïve/résumé.pdf"]
    assert download.headers["content-disposition"] == (
        "attachment; filename=\"R_sum_ 2026.pdf\"; filename*=UTF-8''R%C3%A9sum%C3%A9%202026.pdf")
    head = server.get("/view/plain.txt", allowed, method="HEAD")
    assert (head.status, head.body) == (200, b"")
    ranged = server.get("/view/plain.txt", {**allowed, "Range": "bytes=0-4"})
    assert (ranged.status, ranged.body) == (206, b"plain")
    etag = server.get("/view/plain.txt", allowed).headers["etag"]
    assert server.get("/view/plain.txt", {**allowed, "If-None-Match": etag}).status == 304
    missing = server.get("/view/no/such.txt?download=x.txt", allowed)
    assert missing.status == 404 and not any(name in missing.headers for name in FILE_HEADERS)



@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_view_s_file_arrives_while_the_application_is_still_at_work_after_its_answer(
        stored: DevMogileFS, tmp_path: Path, parser: str) -> None:
    """Off uvicorn's socket: the file went out only once the application returned (after
    Starlette's background tasks); the application here works until the test has read it all."""
    released = tmp_path / "read"
    env = {"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": stored.trackers[0]}
    with run_uvicorn(env, extra_args=["--http", parser]) as running:
        try:
            with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
                sock.sendall(f"GET /view/plain.txt?until={quote(str(released))} HTTP/1.1\r\nHost: t\r\n"
                             "X-Test-User: allowed\r\n\r\n".encode())
                reply, _ = read_http_reply(sock, "GET", timeout=10)
            assert Path(f"{released}.working").exists() and not released.exists()  # the file came meanwhile
        finally:
            released.touch()
    assert (reply.status, reply.body) == (200, FILES["plain.txt"])
    assert [value for name, value in reply.fields if name.lower() == "content-length"] == [str(len(FILES["plain.txt"]))]


def test_a_serve_header_made_elsewhere_is_removed_on_the_socket(server: Server) -> None:
    """An application passing on another server's answer, serve headers and all: its own answer,
    without them, each header once (read off the socket)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /forwarded HTTP/1.1\r\nHost: media\r\nConnection: close\r\n\r\n")
        reply, _ = read_http_reply(sock, "GET")
    names = [name for name, _ in reply.fields]
    assert reply.status == 200 and b"the upstream's page\n" in reply.body  # chunked by uvicorn
    assert FILES["plain.txt"] not in reply.body and FILES["private/doc.txt"] not in reply.body
    assert "x-mogile-middleware-serve" not in names and len(names) == len(set(names)), reply.fields
    assert not any(name in names for name in FILE_HEADERS)


#: Signed as the test runs: a URL signed as the tests are collected would expire in a long run.
SIGNED_AT_RUN = "/mogilefs/plain.txt?signed-at-run"


@pytest.mark.parametrize("target, headers, status", [
    pytest.param(SIGNED_AT_RUN, {}, 200, id="signed"),
    pytest.param("/mogilefs/plain.txt", {}, 403, id="unsigned"),
    pytest.param(f"/view/plain.txt?download={quote('Résumé.txt')}", {"X-Test-User": "allowed"}, 200, id="view"),
    pytest.param("/view/no/such.txt", {"X-Test-User": "allowed"}, 404, id="view-missing"),
])
def test_every_header_arrives_once_off_the_socket(server: Server, target: str, headers: dict[str, str],
                                                   status: int) -> None:
    """Read raw: a header the view sent and the file's answer both carry would show twice here."""
    target = signed_url("plain.txt") if target == SIGNED_AT_RUN else target
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: media\r\nConnection: close\r\n{lines}\r\n".encode())
        reply, _ = read_http_reply(sock, "GET")
    assert reply.status == status
    names = [name.lower() for name, _ in reply.fields]
    repeated = sorted({name for name in names if names.count(name) > 1})
    assert not repeated, reply.fields
    if target.startswith("/view/"):  # the view's cookie, kept whatever the answer
        assert reply.headers["set-cookie"] == "session=renewed; HttpOnly"
    assert reply.headers["cache-control"] == ("private" if status == 200 else "no-store")
    assert "x-mogile-middleware-serve" not in names and "x-app-header" not in names
    if status == 200:
        assert reply.body == FILES["plain.txt"]


@pytest.mark.parametrize("front", ["perlbal", "nginx"])
@pytest.mark.parametrize("server_name", SERVERS)
def test_through_the_front_proxies(stored: DevMogileFS, server_name: str, front: str, tmp_path: Path) -> None:
    with serving(stored, server_name, front, tmp_path, MOGILE_SIGNING_KEY=SECRET, MOGILE_AUTHORIZE="1") as stack:
        url = signed_url("plain.txt")
        answer = stack.get(url)  # fails if the client sees a storage URL or a reproxy header
        assert (answer.status, answer.length) == (200, len(FILES["plain.txt"]))
        assert stack.app_requests(url.partition("?")[0]) == [("200", 0)]  # the proxy fetched the bytes
        for target in (url.partition("?")[0], signed_url("private/doc.txt"), url + "&x=1"):
            refused = stack.get(target)
            assert refused.status == 403 and refused.length < 200, target
        viewed = stack.get("/view/private/doc.txt", {"X-Test-User": "allowed"})
        assert (viewed.status, viewed.length) == (200, len(FILES["private/doc.txt"]))
        assert viewed.headers.get_all("Set-Cookie") == ["session=renewed; HttpOnly"]  # the view's, through the proxy
        assert stack.app_requests("/view/private/doc.txt")[-1] == ("200", 0)
        assert stack.get("/view/private/doc.txt").status == 403


# Property tests: the signature covers exactly the key, the domain and the time.

KEYS = st.text(st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(key=KEYS, expires_in=st.integers(1, 10**8))
def test_any_key_signs_and_verifies(key: str, expires_in: int) -> None:
    url_signer = signer(clock=1_700_000_000)
    assert url_signer.refusal(key, url_signer.query(key, expires_in)) is None


@settings(max_examples=500, deadline=None)
@given(key=KEYS, data=st.data())
def test_no_change_to_a_signed_query_or_key_verifies(key: str, data: st.DataObject) -> None:
    url_signer = signer(clock=1_700_000_000)
    query = url_signer.query(key, 600)
    position = data.draw(st.integers(0, len(query) - 1))
    replacement = data.draw(st.characters(min_codepoint=33, max_codepoint=126).filter(lambda c: c != query[position]))
    changed_query = query[:position] + replacement + query[position + 1:]
    assert url_signer.refusal(key, changed_query) is not None
    other_key = data.draw(KEYS.filter(lambda other: other != key))
    assert url_signer.refusal(other_key, query) is not None
    assert URLSigner(SECRET, "another domain", clock=lambda: 1_700_000_000).refusal(key, query) is not None
    assert url_signer.refusal(key, query + data.draw(st.text(min_size=1, max_size=5))) is not None


# Serving from a view in process: the WSGI respond_with, wrapped or on its own; the ASGI one;
# a Starlette endpoint of examples/starlette.


def test_wsgi_respond_with_answers_alone_or_through_the_middleware_that_wraps_it(stored: DevMogileFS) -> None:
    from webtest import TestApp

    def view(environ: dict, start_response: Any) -> Any:
        return middleware.respond_with(environ, start_response, "private/doc.txt", filename="doc.txt")

    middleware = MogileFSMiddleware(view, domain=DOMAIN, trackers=stored.trackers, reproxy="perlbal",
                                    trusted_proxies=["10.0.0.1"])
    for app in (TestApp(middleware), TestApp(view)):  # the view wrapped by its middleware, then alone
        answer = app.post("/download")  # a view may serve on any method: the file as for a GET
        assert answer.body == FILES["private/doc.txt"]
        # Whole: a POST's Range and preconditions are not the file's (RFC 9110 13.1, 14.2).
        etag = app.get("/download").headers["ETag"]
        for asked in ({"Range": "bytes=0-9"}, {"If-None-Match": etag}, {"If-Match": '"another"'}):
            whole = app.post("/download", headers=asked)
            assert (whole.status_int, whole.body) == (200, FILES["private/doc.txt"])
        # Served to a proxy too: it would send the Range on to the storage node.
        whole = app.post("/download", headers={"Range": "bytes=0-9"}, extra_environ={"REMOTE_ADDR": "10.0.0.1"})
        assert (whole.status_int, whole.body, "X-REPROXY-URL" in whole.headers) == (200, FILES["private/doc.txt"], False)
        assert answer.headers["Content-Disposition"] == 'attachment; filename="doc.txt"'
        assert answer.headers["Cache-Control"] == "private"
        reproxied = app.get("/download", extra_environ={"REMOTE_ADDR": "10.0.0.1"})
        assert reproxied.body == b"" and reproxied.headers["X-REPROXY-URL"].startswith("http://")
        assert app.head("/download").body == b""


def test_a_serve_header_serve_header_did_not_make_serves_nothing(stored: DevMogileFS,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    # An application passing on another server's answer, headers and all (a proxying view),
    # served whatever key that server named; made in another process, the header is not this one's.
    forged = subprocess.run([sys.executable, "-c", "from mogile_middleware import serve_header; "
                             "print(serve_header('private/doc.txt')[1])"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parents[2]).stdout.strip()
    upstream = [("Content-Type", "text/plain"), ("X-Mogile-Middleware-Serve", forged),
                ("X-Mogile-Middleware-Serve", "key=private%2Fdoc.txt")]

    def proxying(environ: dict, start_response: Any) -> list[bytes]:
        start_response("200 OK", list(upstream))
        return [b"the upstream's body"]

    async def proxying_asgi(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(name.lower().encode(), value.encode()) for name, value in upstream]})
        await send({"type": "http.response.body", "body": b"the upstream's body"})

    from webtest import TestApp

    answer = TestApp(MogileFSMiddleware(proxying, domain=DOMAIN, trackers=stored.trackers)).get("/view")
    assert answer.body == b"the upstream's body" and "X-Mogile-Middleware-Serve" not in answer.headers
    status, headers, body = asgi_call(ASGIMiddleware(proxying_asgi, domain=DOMAIN, trackers=stored.trackers), "/view")
    assert (status, body) == (200, b"the upstream's body") and "x-mogile-middleware-serve" not in headers
    assert caplog.text.count("not made by serve_header in this process") == 4


def test_a_wsgi_view_may_start_its_answer_on_its_first_iteration(stored: DevMogileFS) -> None:
    # PEP 3333 lets an application call start_response when its body is first iterated: a view
    # answering with serve_header so got a 500; one answering with its own body streams it, closed.
    from webtest import TestApp

    closed: list[str] = []

    def lazy(environ: dict, start_response: Any) -> Iterator[bytes]:
        try:
            if environ["PATH_INFO"] == "/download":
                start_response("200 OK", [serve_header("private/doc.txt", filename="doc.txt")])
                yield b"the view's own body, replaced"
            else:
                start_response("200 OK", [("Content-Type", "text/plain")])
                yield from (b"one, ", b"two")
        finally:
            closed.append(environ["PATH_INFO"])

    app = TestApp(MogileFSMiddleware(lazy, domain=DOMAIN, trackers=stored.trackers))
    answer = app.get("/download")
    assert (answer.body, answer.headers["Content-Disposition"]) == (FILES["private/doc.txt"], 'attachment; filename="doc.txt"')
    assert app.get("/page").body == b"one, two" and closed == ["/download", "/page"]


class StrictServer:
    """A server's ``start_response`` as gunicorn's: a second call needs ``exc_info``, which is
    raised again once the headers were sent."""

    def __init__(self) -> None:
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if exc_info is None and self.status is not None:
            raise AssertionError("Response headers already set!")
        self.status, self.headers = status, headers
        return lambda data: None

    def get(self, app: Any, path: str) -> tuple[str | None, bytes]:
        body = app({"REQUEST_METHOD": "GET", "PATH_INFO": path, "SERVER_NAME": "localhost", "SERVER_PORT": "80",
                    "REMOTE_ADDR": "10.0.0.9", "wsgi.url_scheme": "http"}, self.start_response)
        try:
            return self.status, b"".join(body)
        finally:
            getattr(body, "close", lambda: None)()


@pytest.mark.parametrize("replaced", ["the file by an error", "an answer by the file"])
def test_a_wsgi_answer_replaced_with_exc_info_is_the_one_sent(stored: DevMogileFS, replaced: str) -> None:
    """PEP 3333: an application calls start_response again, with exc_info, to replace its answer
    before any of it was sent. An error page replacing a file asked for got gunicorn's 500
    ("Response headers already set!"), and the file was sent anyway under a lenient server. A
    file asked for in place of an answer the server was given is refused with an error that
    says so: gunicorn adds a replacing answer's headers to the first one's (two Content-Lengths)."""
    def view(environ: dict, start_response: Any) -> list[bytes]:
        first, then = [serve_header("private/doc.txt")], [("Content-Type", "text/plain")]
        start_response("200 OK", first if replaced == "the file by an error" else then)
        try:
            raise ValueError("the view failed after its answer started")
        except ValueError:
            start_response("503 Service Unavailable", then if replaced == "the file by an error" else first,
                           sys.exc_info())
        return [b"the view's error page"]

    middleware = MogileFSMiddleware(view, domain=DOMAIN, trackers=stored.trackers)
    if replaced == "the file by an error":
        assert StrictServer().get(middleware, "/v") == ("503 Service Unavailable", b"the view's error page")
    else:
        with pytest.raises(RuntimeError, match="must come in the application's first start_response"):
            StrictServer().get(middleware, "/v")


def test_a_wsgi_answer_replaced_with_exc_info_is_read_off_gunicorns_socket(stored: DevMogileFS) -> None:
    """As above, through gunicorn, read off the socket: each header once, and neither the error
    page nor gunicorn's 500 for a file asked for too late carries a header of the file."""
    with run_gunicorn({"MOGILE_DOMAIN": DOMAIN, "MOGILE_TRACKERS": stored.trackers[0]}) as running:
        for path, status in (("/replaced/error/plain.txt", 503), ("/replaced/plain.txt", 500)):
            reply = raw_http(running.port, f"GET {path} HTTP/1.1\r\nHost: media\r\nConnection: close\r\n\r\n".encode())
            names = [name for name, _ in reply.fields]
            assert (reply.status, len(names)) == (status, len(set(names))), reply
            assert not any(name in reply.headers for name in FILE_HEADERS)
            if status == 503:
                assert reply.body == b"the view's own page"


def test_a_lazy_body_whose_iteration_fails_at_once_is_still_closed(stored: DevMogileFS) -> None:
    # PEP 3333: close() is called whatever happened; iter() of the body was outside its guard.
    closed: list[bool] = []

    class Failing:
        def __iter__(self) -> Iterator[bytes]:
            raise RuntimeError("the application failed")

        def close(self) -> None:
            closed.append(True)

    middleware = MogileFSMiddleware(lambda environ, start_response: Failing(), domain=DOMAIN,
                                    trackers=stored.trackers)
    with pytest.raises(RuntimeError, match="the application failed"):
        middleware({"PATH_INFO": "/page", "REQUEST_METHOD": "GET"}, lambda status, headers: None)
    assert closed == [True]


def test_a_worker_forked_from_its_master_makes_its_own_serve_header_proof() -> None:
    # Under gunicorn --preload every worker held the master's proof: a header one worker made,
    # copied into another's answer, was obeyed there.
    parents = serve_header("plain.txt")[1]
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(writer, f"{serve_header('plain.txt')[1]} {served_file(parents) is None}".encode())
        os._exit(0)
    os.close(writer)
    childs, parents_refused = os.read(reader, 4096).decode().split()
    os.waitpid(child, 0)
    os.close(reader)
    assert (served_file(childs), parents_refused, served_file(parents)) == (None, "True", ("plain.txt", None))


def asgi_call(app: Any, path: str, headers: dict[str, str] | None = None,
              method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """``method`` (GET) ``path`` of the ASGI ``app`` on an event loop of its own."""
    scope = {"type": "http", "method": method, "path": path, "raw_path": quote(path).encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5000), "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 8000),
             "headers": [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]}
    sent = run(app, scope, [{"type": "http.request"}])
    head = {name.decode(): value.decode() for name, value in sent[0]["headers"]}
    return sent[0]["status"], head, b"".join(message.get("body", b"") for message in sent[1:])


def test_asgi_respond_with_answers_alone_or_through_the_middleware_that_wraps_it(stored: DevMogileFS) -> None:
    async def view(scope: dict, receive: Any, send: Any) -> None:
        await middleware.respond_with(scope, receive, send, "naïve/résumé.pdf")

    middleware = ASGIMiddleware(view, domain=DOMAIN, trackers=stored.trackers)
    for app in (middleware, view):
        status, headers, body = asgi_call(app, "/download")
        assert (status, body, headers["cache-control"]) == (200, FILES["naïve/résumé.pdf"], "private")
        assert "x-mogile-middleware-serve" not in headers
        for asked in ({"Range": "bytes=0-9"}, {"If-None-Match": headers["etag"]}, {"If-Match": '"another"'}):
            assert asgi_call(app, "/download", asked, "POST")[::2] == (200, FILES["naïve/résumé.pdf"])


def test_an_answer_authorize_allowed_names_no_perlbal_fallback_url(stored: DevMogileFS) -> None:
    """Perlbal's fallback request carries no cookie: the application would judge another request."""
    from webtest import TestApp

    options = {"domain": DOMAIN, "trackers": stored.trackers, "reproxy": "perlbal", "trusted_proxies": ["10.0.0.1"],
               "perlbal_fallback_url": "http://10.0.0.5:8000"}
    fallback = "http://10.0.0.5:8000/mogilefs/plain.txt?mogilefs-fallback"
    for decided_by, named in (({}, True), ({"authorize": lambda request, key: True}, False),
                              ({"key_for_path": lambda path: path}, True)):
        app = TestApp(MogileFSMiddleware(lambda e, s: [], **options, **decided_by),
                      extra_environ={"REMOTE_ADDR": "10.0.0.1"})
        headers = app.get("/mogilefs/plain.txt").headers
        assert (fallback in headers["X-REPROXY-URL"].split()) is named, decided_by
        # Without one, Perlbal is told the length: it passes over a replica cut short.
        assert headers.get("X-REPROXY-EXPECTED-SIZE") == (None if named else str(len(FILES["plain.txt"])))


#: The header a proxy fetches the file by, in each reproxy mode.
REPROXY_HEADER = {"perlbal": "x-reproxy-url", "nginx": "x-accel-redirect"}


@pytest.mark.parametrize("reproxy", sorted(REPROXY_HEADER))
def test_stacked_wsgi_middlewares_let_each_others_reproxy_answers_through(stored: DevMogileFS, reproxy: str) -> None:
    """Two prefixes, each with options of its own, one middleware around the other: the inner
    one's answers and views' files reach the proxy reproxied, not as empty 200s with the file's
    headers; the application's own reproxy headers are still dropped."""
    from webtest import TestApp

    def app(environ: dict, start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/view/inner":
            return inner.respond_with(environ, start_response, "plain.txt")
        if environ["PATH_INFO"] == "/view/outer":  # not the middleware that wraps the view
            return outer.respond_with(environ, start_response, "plain.txt")
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Reproxy-URL", "http://10.0.0.5/secret"),
                                  ("X-Accel-Redirect", "/internal")])
        return [b"app"]

    options = {"domain": DOMAIN, "trackers": stored.trackers, "reproxy": reproxy, "trusted_proxies": ["10.0.0.1"]}
    inner = MogileFSMiddleware(app, prefix="/thumbs/", **options)
    outer = MogileFSMiddleware(inner, prefix="/originals/", **options)
    client = TestApp(outer, extra_environ={"REMOTE_ADDR": "10.0.0.1"})
    for path in ("/thumbs/plain.txt", "/originals/plain.txt", "/view/inner", "/view/outer"):
        answer = client.get(path)
        assert (answer.status_int, answer.body) == (200, b""), path
        assert REPROXY_HEADER[reproxy] in {name.lower() for name in answer.headers}, path
    page = client.get("/page")
    assert page.body == b"app" and not {"x-reproxy-url", "x-accel-redirect"} & {name.lower() for name in page.headers}


@pytest.mark.parametrize("reproxy", sorted(REPROXY_HEADER))
def test_stacked_asgi_middlewares_let_each_others_reproxy_answers_through(stored: DevMogileFS, reproxy: str) -> None:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["path"] == "/view/inner":
            return await inner.respond_with(scope, receive, send, "plain.txt")
        if scope["path"] == "/view/outer":
            return await outer.respond_with(scope, receive, send, "plain.txt")
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/plain"), (b"x-reproxy-url", b"http://10.0.0.5/secret"),
            (b"x-accel-redirect", b"/internal")]})
        await send({"type": "http.response.body", "body": b"app"})

    options = {"domain": DOMAIN, "trackers": stored.trackers, "reproxy": reproxy, "trusted_proxies": ["127.0.0.1"]}
    inner = ASGIMiddleware(app, prefix="/thumbs/", **options)
    outer = ASGIMiddleware(inner, prefix="/originals/", **options)
    # Three times each: looked up, then decided from the path cache (and kept), then (under the
    # prefixes) the kept answer.
    for path in ("/thumbs/plain.txt", "/originals/plain.txt", "/view/inner", "/view/outer") * 3:
        status, headers, body = asgi_call(outer, path)
        assert (status, body, REPROXY_HEADER[reproxy] in headers) == (200, b"", True), path
    status, headers, body = asgi_call(outer, "/page")
    assert body == b"app" and not {"x-reproxy-url", "x-accel-redirect"} & set(headers)


def test_the_asgi_middleware_keeps_no_view_answer_with_its_users_cookies(stored: DevMogileFS) -> None:
    # Each was kept, encoded, among the answers that recur (4096 of them): users' session
    # cookies in memory, and the reproxy answers worth keeping pushed out.
    async def view(scope: dict, receive: Any, send: Any) -> None:
        cookie = f"session=secret-{scope['path'][-1]}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (name.lower().encode(), value.encode()) for name, value in [serve_header("plain.txt")]] + [
            (b"set-cookie", cookie)]})
        await send({"type": "http.response.body", "body": b""})

    middleware = ASGIMiddleware(view, domain=DOMAIN, trackers=stored.trackers, reproxy="perlbal",
                                trusted_proxies=["127.0.0.1"])
    for user in "123":
        status, headers, body = asgi_call(middleware, f"/download/{user}")
        assert (status, headers["set-cookie"], body) == (200, f"session=secret-{user}", b"")
        assert headers["x-reproxy-url"].startswith("http://")
    assert b"secret" not in repr(middleware._encoded_answers._entries).encode()


def test_answers_made_for_one_request_are_not_kept_once_sent(stored: DevMogileFS) -> None:
    """The encoded form of every answer was kept with the answer, recurring or not: 4096 416s
    or 304s (each made for its request) held about 8 MB of a worker for good."""
    import tracemalloc

    middleware = ASGIMiddleware(lambda scope, receive, send: None, domain=DOMAIN, trackers=stored.trackers)

    async def refused(count: int) -> None:
        for number in range(count):
            scope = {"type": "http", "method": "GET", "path": "/mogilefs/plain.txt", "raw_path": b"/mogilefs/plain.txt",
                     "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
                     "headers": [(b"range", f"bytes={10_000 + number}-".encode())]}
            sent: list[dict[str, Any]] = []

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await middleware(scope, lambda: asyncio.sleep(3600), send)
            assert sent[0]["status"] == 416

    async def measured() -> int:
        await refused(50)  # the connections, the location and the recurring answers, made
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await refused(2000)
            return tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()

    assert asyncio.run(measured()) < 400_000  # bytes kept after 2000 answers: it was about 4 MB


@pytest.mark.parametrize("path", ["private/a.txt", "PRIVATE/a.txt", "pr\u00edvate/a.txt", "PR\u00cdVATE/a.txt",
                                  "pri\u0301vate/a.txt", "\uff50rivate/a.txt"])
def test_both_examples_keep_the_private_keys_whatever_the_case_and_accents(
        monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """mogilefsd on MySQL finds "private/a.txt" by any of these paths (utf8mb4_0900_ai_ci)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2]))
    try:
        from examples.djangosite.djangosite.settings import public_key as djangos
        from examples.starlette.app import public_key as starlettes

        assert djangos(path) is None and starlettes(path) is None
        assert djangos("privately/a.txt") == starlettes("privately/a.txt") == "privately/a.txt"
    finally:  # the app was made with this test's environment: a test of it imports it anew
        sys.modules.pop("examples.starlette.app", None)


def test_the_starlette_example_serves_a_private_file_to_its_endpoint(stored: DevMogileFS,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOGILEFS_DOMAIN", DOMAIN)
    monkeypatch.setenv("MOGILEFS_TRACKERS", stored.trackers[0])
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2]))
    from examples.starlette.app import TOKEN, app

    assert asgi_call(app, "/private/doc.txt")[0] == 403
    status, headers, body = asgi_call(app, "/private/doc.txt", {"Authorization": f"Bearer {TOKEN}"})
    assert (status, body) == (200, FILES["private/doc.txt"])
    assert headers["content-disposition"] == 'attachment; filename="doc.txt"'
    assert asgi_call(app, "/private/missing.txt", {"Authorization": f"Bearer {TOKEN}"})[0] == 404
    assert asgi_call(app, "/mogilefs/plain.txt")[2] == FILES["plain.txt"]
    # Nor under the prefix, where no endpoint checks the token.
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
        status, _, body = asgi_call(app, "/mogilefs/private/doc.txt", headers)
        assert status == 404 and FILES["private/doc.txt"] not in body


def _starlette_download(trackers: list[str], key: str, events: list[Any], background: Any, pace: float = 0) -> Any:
    """A Starlette application whose ``/download`` answers with ``key``'s file and runs ``background``
    after, wrapped by the middleware on ``trackers``, called (a coroutine); each message it sends is
    added to ``events``, ``pace`` seconds after it came."""
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import Response
    from starlette.routing import Route

    async def download(request: Any) -> Response:
        return Response(headers=dict([serve_header(key)]), background=BackgroundTask(background))

    app = ASGIMiddleware(Starlette(routes=[Route("/download", download)]), domain=DOMAIN, trackers=trackers,
                         storage_timeout=2)
    scope = {"type": "http", "method": "GET", "path": "/download", "raw_path": b"/download", "query_string": b"",
             "root_path": "", "headers": [], "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    incoming = [{"type": "http.request"}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else await asyncio.sleep(3600)

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(pace)
        events.append(message)

    return app(scope, receive, send)


def test_a_starlette_view_s_file_is_not_held_by_its_background_tasks(stored: DevMogileFS) -> None:
    """The file went out once the whole application returned: after a response's background
    tasks (a slow one held every download; a failing one made it a 500)."""
    events: list[Any] = []

    async def audit_once_the_file_is_sent() -> None:
        while not any(event["type"] == "http.response.body" and not event.get("more_body") for event in events):
            await asyncio.sleep(0.01)  # as a slow task: the file goes out meanwhile
        events.append("background")
        raise RuntimeError("the audit log is down")

    with pytest.raises(RuntimeError, match="the audit log is down"):  # as it reaches the server without the middleware
        asyncio.run(asyncio.wait_for(_starlette_download(stored.trackers, "plain.txt", events,
                                                         audit_once_the_file_is_sent), 10))
    assert events[0]["status"] == 200 and events[-1] == "background"
    assert b"".join(event.get("body", b"") for event in events[1:-1]) == FILES["plain.txt"]


def test_a_transfer_cut_midway_leaves_the_application_s_work_after_its_answer_done() -> None:
    """A replica failing midway raised its error into the application's send: Starlette's
    background tasks (and Django's request_finished) never ran."""
    node = KeptAliveNode(lambda head: b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n01234", closes=True)
    tracker = files_tracker({"cut": (9, 10, [node.url(9)])})
    events: list[Any] = []
    try:
        with pytest.raises(StorageError):  # to the server, which cuts the answer short
            asyncio.run(asyncio.wait_for(_starlette_download([tracker.tracker], "cut", events,
                                                             lambda: events.append("background")), 10))
    finally:
        tracker.stop()
        node.stop()
    assert "background" in events and [event for event in events if event != "background"][0]["status"] == 200


def test_a_request_cancelled_while_its_file_goes_out_after_the_application_failed_ends_cancelled(
        stored: DevMogileFS) -> None:
    """The application's error was raised instead: a server's cancellation (its shutdown, its
    timeout) went unnoticed, and the counts of asyncio.timeout and TaskGroup with it."""
    events: list[Any] = []

    def failing_audit() -> None:
        raise RuntimeError("the audit log is down")

    async def cancelled_midway() -> asyncio.Task[Any]:
        request = asyncio.ensure_future(_starlette_download(stored.trackers, "plain.txt", events, failing_audit,
                                                            pace=0.2))
        while not events:  # the file's head sent, its body 0.2 s away, the application failed
            await asyncio.sleep(0.01)
        request.cancel()
        await asyncio.wait({request}, timeout=10)
        return request

    request = asyncio.run(cancelled_midway())
    assert request.cancelled(), request.exception()


def test_what_a_starlette_router_writes_in_the_scope_reaches_the_middlewares_outside(stored: DevMogileFS) -> None:
    """The application got a copy of the scope: an outer middleware reading the matched route
    (a metrics middleware's label, ``request.state`` under daphne) found nothing."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def item(request: Any) -> PlainTextResponse:
        request.state.user = "alice"
        return PlainTextResponse(request.path_params["number"])

    inner = ASGIMiddleware(Starlette(routes=[Route("/items/{number}", item)]), domain=DOMAIN,
                           trackers=stored.trackers)
    seen: list[Any] = []

    async def outer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await inner(scope, receive, send)
        seen.append((scope.get("path_params"), scope.get("state", {}).get("user"), "mogile_middleware.wrapped_by" in scope))

    status, _, body = asgi_call(outer, "/items/7")
    assert (status, body) == (200, b"7") and seen == [({"number": "7"}, "alice", False)]


def test_perlbals_fallback_request_keeps_its_signature(stored: DevMogileFS) -> None:
    from webtest import TestApp

    middleware = MogileFSMiddleware(lambda e, s: [], domain=DOMAIN, trackers=stored.trackers, reproxy="perlbal",
                                    signing_key=SECRET, perlbal_fallback_url="http://127.0.0.1:8000")
    app = TestApp(middleware)
    url = signed_url("plain.txt")
    fallback = app.get(url).headers["X-REPROXY-URL"].split()[-1]
    assert fallback == f"http://127.0.0.1:8000{url}&mogilefs-fallback"  # what Perlbal asks when every replica failed
    assert app.get(fallback.removeprefix("http://127.0.0.1:8000")).body == FILES["plain.txt"]
    app.get("/mogilefs/plain.txt?mogilefs-fallback", status=403)
    # The mark is Perlbal's alone: from a client, or through Perlbal, it is a parameter the
    # signature does not cover (it was taken off whoever sent it).
    trusting = TestApp(MogileFSMiddleware(lambda e, s: [], domain=DOMAIN, trackers=stored.trackers, reproxy="perlbal",
                                          signing_key=SECRET, perlbal_fallback_url="http://127.0.0.1:8000",
                                          trusted_proxies=["10.0.0.1"]))
    marked = f"{url}&mogilefs-fallback"
    assert trusting.get(marked, extra_environ={"REMOTE_ADDR": "10.0.0.1"}).body == FILES["plain.txt"]
    trusting.get(marked, extra_environ={"REMOTE_ADDR": "192.0.2.7"}, status=403)
    trusting.get(marked, headers={"X-Forwarded-For": "192.0.2.7", "X-Proxy-Capabilities": "reproxy-file"},
                 extra_environ={"REMOTE_ADDR": "10.0.0.1"}, status=403)


def test_an_async_authorize_is_awaited(stored: DevMogileFS) -> None:
    asked: list[tuple[str, str]] = []

    async def authorize(scope: dict, key: str) -> bool:
        asked.append((scope["path"], key))
        return dict(scope["headers"]).get(b"x-test-user") == b"allowed"

    middleware = ASGIMiddleware(wrapped_app, domain=DOMAIN, trackers=stored.trackers, authorize=authorize)
    assert asgi_call(middleware, "/mogilefs/plain.txt")[0] == 403
    assert asgi_call(middleware, "/mogilefs/plain.txt", {"X-Test-User": "allowed"})[2] == FILES["plain.txt"]
    assert asked == [("/mogilefs/plain.txt", "plain.txt")] * 2


class _AsyncCall:
    async def __call__(self, request: Any, key: str) -> bool:
        return False


async def _refuse(request: Any, key: str) -> bool:
    return False


async def _refusing_generator(request: Any, key: str) -> AsyncIterator[bool]:
    yield False


@pytest.mark.parametrize("refuse", [_refuse, _AsyncCall(), functools.partial(_refuse),
                                    functools.partial(_AsyncCall()), _AsyncCall().__call__],
                         ids=["coroutine-function", "async-call", "partial", "partial-of-async-call", "bound-method"])
def test_the_wsgi_middleware_refuses_an_authorize_it_would_not_await(refuse: Any) -> None:
    # Never awaited, the coroutine it made was a true answer: every file was served to everyone.
    with pytest.raises(TypeError, match="authorize must be a plain function: it makes a coroutine, and "
                                        "MogileFSMiddleware needs a true or false answer"):
        MogileFSMiddleware(wrapped_app, domain=DOMAIN, trackers=["127.0.0.1:7001"], authorize=refuse)
    ASGIMiddleware(wrapped_app, domain=DOMAIN, trackers=["127.0.0.1:7001"], authorize=refuse)  # which awaits it
    for middleware in (MogileFSMiddleware, ASGIMiddleware):  # neither awaits key_for_path
        with pytest.raises(TypeError, match="key_for_path must be a plain function: it makes a coroutine"):
            middleware(wrapped_app, domain=DOMAIN, trackers=["127.0.0.1:7001"], key_for_path=refuse)


def test_neither_middleware_takes_an_async_generator_for_an_answer() -> None:
    # Neither a coroutine to await nor a false value: the generator served every file.
    for middleware in (MogileFSMiddleware, ASGIMiddleware):
        with pytest.raises(TypeError, match="authorize must be a plain function: it makes an async generator"):
            middleware(wrapped_app, domain=DOMAIN, trackers=["127.0.0.1:7001"], authorize=_refusing_generator)


class _AsyncInstances:
    def __init__(self, request: Any, key: str) -> None:
        self.key = key

    async def __call__(self) -> bool:
        return False


def test_a_class_whose_instances_are_async_is_a_plain_authorize() -> None:
    # Calling the class makes an instance (a true answer of its own): nothing to await, not refused.
    MogileFSMiddleware(wrapped_app, domain=DOMAIN, trackers=["127.0.0.1:7001"], authorize=_AsyncInstances)


@contextlib.contextmanager
def no_coroutine_left_unawaited() -> Iterator[None]:
    """Fail if a coroutine made in the block is freed unawaited and unclosed (Python warns then)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()  # the coroutine, held by the error's traceback, is freed here
    assert [str(warning.message) for warning in caught if warning.category is RuntimeWarning] == []


def test_a_wsgi_authorize_that_hands_on_a_coroutine_serves_nothing(stored: DevMogileFS) -> None:
    from webtest import TestApp

    def hands_on(environ: dict, key: str) -> Any:
        return _refuse(environ, key)

    def hands_on_a_generator(environ: dict, key: str) -> Any:
        return _refusing_generator(environ, key)

    app = TestApp(MogileFSMiddleware(wrapped_app, domain=DOMAIN, trackers=stored.trackers, authorize=hands_on))
    with no_coroutine_left_unawaited():
        with pytest.raises(TypeError, match="authorize answered coroutine: the WSGI middleware needs"):
            app.get("/mogilefs/plain.txt")
    generated = TestApp(MogileFSMiddleware(wrapped_app, domain=DOMAIN, trackers=stored.trackers,
                                           authorize=hands_on_a_generator))
    with pytest.raises(TypeError, match="authorize answered async_generator"):
        generated.get("/mogilefs/plain.txt")
    with pytest.raises(TypeError, match="authorize answered async_generator: the ASGI middleware needs"):
        asgi_call(ASGIMiddleware(wrapped_app, domain=DOMAIN, trackers=stored.trackers, authorize=hands_on_a_generator),
                  "/mogilefs/plain.txt")


def test_an_async_authorize_that_hands_on_a_coroutine_serves_nothing(stored: DevMogileFS) -> None:
    async def hands_on(scope: dict, key: str) -> Any:
        return _refuse(scope, key)  # an await forgotten: the coroutine it made was a true answer

    with no_coroutine_left_unawaited():
        with pytest.raises(TypeError, match="authorize answered coroutine: the ASGI middleware needs"):
            asgi_call(ASGIMiddleware(wrapped_app, domain=DOMAIN, trackers=stored.trackers, authorize=hands_on),
                      "/mogilefs/plain.txt")


def test_a_key_for_path_that_answers_no_str_is_an_error_naming_it(stored: DevMogileFS) -> None:
    # Bytes for a key got as far as the answer, and failed there with an AttributeError.
    from webtest import TestApp

    def hands_on(path: str) -> Any:
        return _refuse(None, path)

    for key_for_path, kind in ((str.encode, "bytes"), (hands_on, "coroutine")):
        wsgi = TestApp(MogileFSMiddleware(wrapped_app, domain=DOMAIN, trackers=stored.trackers, key_for_path=key_for_path))
        asgi = ASGIMiddleware(wrapped_app, domain=DOMAIN, trackers=stored.trackers, key_for_path=key_for_path)
        with no_coroutine_left_unawaited():
            with pytest.raises(TypeError, match=f"key_for_path answered {kind}: the middleware needs a key"):
                wsgi.get("/mogilefs/plain.txt")
            with pytest.raises(TypeError, match=f"key_for_path answered {kind}: the middleware needs a key"):
                asgi_call(asgi, "/mogilefs/plain.txt")
    # No key, as "avatars/" in path and path[8:] answers: a 404, as None is.
    for nothing in (False, b"", 0):
        wsgi = TestApp(MogileFSMiddleware(wrapped_app, domain=DOMAIN, trackers=stored.trackers,
                                          key_for_path=lambda path, nothing=nothing: nothing))
        assert wsgi.get("/mogilefs/plain.txt", status=404).status_int == 404
        assert asgi_call(ASGIMiddleware(wrapped_app, domain=DOMAIN, trackers=stored.trackers,
                                        key_for_path=lambda path, nothing=nothing: nothing), "/mogilefs/plain.txt")[0] == 404


@pytest.mark.parametrize("server_name", SERVERS)
def test_nginx_asks_again_with_the_signature_when_the_replicas_are_gone(devmogile: DevMogileFS, server_name: str,
                                                                        tmp_path: Path) -> None:
    """Another process overwrites the key: the replicas the middleware gave nginx are gone, so
    nginx asks the application again (the shipped config passes the request URI, query included),
    and the signed request is served the new version."""
    writer = Client(DOMAIN, devmogile.trackers)
    writer.store_content("report.txt", b"version 1\n" * 100, "avatar")
    with serving(devmogile, server_name, "nginx", tmp_path, MOGILE_SIGNING_KEY=SECRET) as stack:
        url = signed_url("report.txt")
        assert stack.get(url).length == len(b"version 1\n" * 100)
        writer.store_content("report.txt", b"version 2, longer\n" * 100, "avatar")  # the old files go at once
        again = stack.get(url)
        assert (again.status, again.length) == (200, len(b"version 2, longer\n" * 100))
        assert stack.get(url.partition("?")[0]).status == 403
