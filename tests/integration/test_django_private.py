"""The example site's private files end to end: ``examples/djangosite`` (its ``wsgi.py``, so
``wrap_wsgi``) under gunicorn, Debian's Perlbal in front, raw HTTP from outside.

``/private/<name>`` is ``gallery.views.private_file``: ``@login_required``, then ``serve()``. The
anonymous client is sent to the login page; once logged in, it gets the file, which Perlbal
fetched from the storage node itself (the access log shows the application sent no body). Straight
to gunicorn, a client on another loopback address is no trusted proxy: the middleware streams it
the bytes. No client of Perlbal ever sees a storage URL or a reproxy header.

The database is a SQLite file, migrated and given a user by the example's ``manage.py`` before
gunicorn starts; the settings are the example's, changed by ``_djangosite_settings``.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from conftest import CLASSES, DOMAIN, require_module, require_program
from integration._gunicorn import HERE, REPO, run_gunicorn
from integration._proxies import run_perlbal_front
from integration._wire_client import HTTPReply, read_http_reply

from mogile_middleware import Client
from mogile_middleware.devserver import DevMogileFS

require_module("gunicorn")

EXAMPLE = REPO / "examples" / "djangosite"
#: Seconds for each ``manage.py`` command.
MANAGE_SECONDS = 60
USERNAME, PASSWORD = "ada", "analytical engine 1843"
#: A private file: a space and non-ASCII in its name, larger than a chunk of any server or proxy.
KEY = "private/reports/Q3 résumé.pdf"
CONTENT = random.Random(1843).randbytes(300_000)
PATH = "/private/" + quote(KEY.removeprefix("private/"))
LOGIN_URL = "/accounts/login/"
PUBLIC_KEY = "avatars/public.png"
#: The client address, status, body bytes sent and request line of each request gunicorn answered.
ACCESS_LOG_FORMAT = "%(h)s %(s)s %(B)s %(r)s"
#: What no client of Perlbal may see (compared in lower case): reproxy headers, the view's header
#: to the middleware, a storage node's file name.
INTERNAL_MARKERS = ("x-reproxy", "x-accel", "x-mogile-middleware", ".fid")


def exchange(port: int, method: str, target: str, headers: Mapping[str, str] | None = None, body: bytes = b"",
             source: str = "127.0.0.1") -> HTTPReply:
    """One request on a new connection from ``source`` to ``127.0.0.1:port``, read off the socket
    (every header line kept, ``Set-Cookie`` too)."""
    fields = {"Host": "127.0.0.1", "Connection": "close", **(headers or {})}
    if body:
        fields["Content-Length"] = str(len(body))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        reply, _ = read_http_reply(sock, method)
    return reply


def cookies(reply: HTTPReply) -> dict[str, str]:
    """The cookies set by ``reply``, by name."""
    jar: SimpleCookie = SimpleCookie()
    for name, value in reply.fields:
        if name == "set-cookie":
            jar.load(value)
    return {name: morsel.value for name, morsel in jar.items()}


@dataclass(frozen=True)
class Site:
    """The example site under gunicorn (one sync worker), Perlbal in front, a MogileFS behind."""

    proxy_port: int
    app_port: int
    storage_ports: tuple[int, ...]
    access_log: Path

    def get(self, target: str, headers: Mapping[str, str] | None = None, method: str = "GET",
            body: bytes = b"") -> HTTPReply:
        """A request through Perlbal; fails if the answer shows a reproxy header or a storage URL."""
        reply = exchange(self.proxy_port, method, target, headers, body)
        self.assert_hidden(reply)
        return reply

    def direct(self, target: str, headers: Mapping[str, str] | None = None, source: str = "127.0.0.1",
               method: str = "GET") -> HTTPReply:
        """A request straight to gunicorn from the loopback address ``source``."""
        return exchange(self.app_port, method, target, headers, source=source)

    def assert_hidden(self, reply: HTTPReply) -> None:
        """Fail if ``reply`` shows a reproxy header or a storage URL, in its head or its body."""
        head = "\n".join(f"{name}: {value}" for name, value in reply.fields)
        text = f"{head}\n{reply.body.decode('latin-1')}".lower()
        markers = (*INTERNAL_MARKERS, *(f"127.0.0.1:{port}" for port in self.storage_ports))
        exposed = [marker for marker in markers if marker in text]
        assert not exposed, f"the client saw {exposed}: {head}"

    def app_requests(self, target: str) -> list[tuple[str, str, int]]:
        """The requests for ``target`` that reached gunicorn: ``(client address, status, body bytes sent)``."""
        # One sync worker logs a request before it accepts the next: once this one is answered,
        # every earlier line is in the file.
        self.direct(LOGIN_URL)
        requests = []
        for line in self.access_log.read_text().splitlines():
            address, status, sent, _, logged, _ = line.split(" ")
            if logged == target:
                requests.append((address, status, int(sent)))
        return requests


def manage(env: dict[str, str], *arguments: str) -> None:
    """Run the example's ``manage.py`` with ``arguments`` in a process of its own."""
    environment = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    done = subprocess.run([sys.executable, str(EXAMPLE / "manage.py"), *arguments], env=environment,
                          capture_output=True, text=True, timeout=MANAGE_SECONDS)
    assert done.returncode == 0, f"manage.py {arguments[0]} failed:\n{done.stderr[-2000:]}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The example site with its database and user ready and a private and a public file stored."""
    require_program("perlbal", "perlbal")
    tmp = tmp_path_factory.mktemp("djangosite")
    with DevMogileFS(tmp / "mogdata", domains={DOMAIN: CLASSES}) as mogile:
        client = Client(DOMAIN, mogile.trackers)
        try:
            client.store_content(KEY, CONTENT)
            client.store_content(PUBLIC_KEY, b"public pixels", cls="avatar")
        finally:
            client.close()
        env = {"DJANGO_SETTINGS_MODULE": "_djangosite_settings", "DJANGOSITE_DATABASE": str(tmp / "db.sqlite3"),
               "MOGILEFS_DOMAIN": DOMAIN, "MOGILEFS_TRACKERS": mogile.trackers[0]}
        manage(env, "migrate", "--verbosity", "0")
        manage(env, "shell", "--command",
               f"from django.contrib.auth.models import User; User.objects.create_user({USERNAME!r}, "
               f"password={PASSWORD!r})")
        assert mogile.store is not None
        storage_ports = tuple(device.http_port for device in mogile.store.devices())
        access_log = tmp / "access.log"
        arguments = ["--pythonpath", str(EXAMPLE), "--access-logfile", str(access_log),
                     "--access-logformat", ACCESS_LOG_FORMAT]
        with run_gunicorn(env, app="djangosite.wsgi:application", extra_args=arguments) as app, \
                run_perlbal_front(app.port) as proxy:
            yield Site(proxy.port, app.port, storage_ports, access_log)


def log_in(site: Site, next_path: str) -> tuple[HTTPReply, str]:
    """Log in through Perlbal as a browser does: the login page (its CSRF cookie and token), then
    the form posted. The answer to the post, and the ``Cookie`` header of the session."""
    page = site.get(f"{LOGIN_URL}?{urlencode({'next': next_path})}")
    assert page.status == 200, page
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page.body)
    assert token, page.body
    csrf = cookies(page)["csrftoken"]
    form = urlencode({"username": USERNAME, "password": PASSWORD, "next": next_path,
                      "csrfmiddlewaretoken": token[1].decode()}).encode()
    answer = site.get(LOGIN_URL, {"Cookie": f"csrftoken={csrf}",
                                  "Content-Type": "application/x-www-form-urlencoded"}, "POST", form)
    session = cookies(answer).get("sessionid")
    assert session, answer
    return answer, f"csrftoken={csrf}; sessionid={session}"


@pytest.fixture(scope="module")
def cookie(site: Site) -> str:
    """The ``Cookie`` header of a logged-in user's session."""
    return log_in(site, "/")[1]


def assert_is_the_private_file(reply: HTTPReply) -> None:
    assert (reply.status, len(reply.body), hashlib.md5(reply.body).hexdigest()) == (
        200, len(CONTENT), hashlib.md5(CONTENT).hexdigest())
    assert reply.headers["content-type"] == "application/pdf"
    assert reply.headers["cache-control"] == "private"
    assert "content-disposition" not in reply.headers


def assert_sent_to_log_in(reply: HTTPReply) -> None:
    assert reply.status == 302, reply
    assert reply.headers["location"] == f"{LOGIN_URL}?{urlencode({'next': PATH}, safe='/')}"
    assert CONTENT[:32] not in reply.body


# -- through Perlbal ------------------------------------------------------------------------------


def test_the_anonymous_client_is_sent_to_log_in_then_back_to_the_file(site: Site) -> None:
    assert_sent_to_log_in(site.get(PATH))
    answer, session = log_in(site, PATH)
    assert (answer.status, answer.headers["location"]) == (302, PATH)
    assert_is_the_private_file(site.get(PATH, {"Cookie": session}))


def test_the_logged_in_client_gets_the_file_perlbal_fetched(site: Site, cookie: str) -> None:
    target = f"{PATH}?through-perlbal"
    assert_is_the_private_file(site.get(target, {"Cookie": cookie}))
    assert site.app_requests(target) == [("127.0.0.1", "200", 0)]  # Perlbal asked; the view sent no body


def test_a_wrong_password_gets_no_session(site: Site) -> None:
    page = site.get(LOGIN_URL)
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page.body)
    assert token, page.body
    csrf = cookies(page)["csrftoken"]
    form = urlencode({"username": USERNAME, "password": "wrong", "csrfmiddlewaretoken": token[1].decode()})
    answer = site.get(LOGIN_URL, {"Cookie": f"csrftoken={csrf}",
                                  "Content-Type": "application/x-www-form-urlencoded"}, "POST", form.encode())
    assert answer.status == 200 and "sessionid" not in cookies(answer)


def test_download_names_the_file(site: Site, cookie: str) -> None:
    reply = site.get(f"{PATH}?download=1", {"Cookie": cookie})
    assert (reply.status, reply.body) == (200, CONTENT)
    assert reply.headers["content-disposition"] == (
        """attachment; filename="Q3 r_sum_.pdf"; filename*=UTF-8''Q3%20r%C3%A9sum%C3%A9.pdf""")
    assert reply.headers["cache-control"] == "private"


@pytest.mark.parametrize(("first", "last"), [
    pytest.param(0, 0, id="first-byte"),
    pytest.param(65_530, 131_080, id="across-chunks"),
    pytest.param(299_990, 299_999, id="last-bytes"),
])
def test_a_range_gets_206_and_those_bytes(site: Site, cookie: str, first: int, last: int) -> None:
    reply = site.get(PATH, {"Cookie": cookie, "Range": f"bytes={first}-{last}"})
    assert (reply.status, reply.body) == (206, CONTENT[first:last + 1])
    assert reply.headers["content-range"] == f"bytes {first}-{last}/{len(CONTENT)}"
    assert reply.headers["cache-control"] == "private"


def test_head_sends_the_headers_only(site: Site, cookie: str) -> None:
    reply = site.get(PATH, {"Cookie": cookie}, method="HEAD")
    assert (reply.status, reply.body) == (200, b"")
    assert reply.headers["content-length"] == str(len(CONTENT))
    assert reply.headers["content-type"] == "application/pdf"
    assert reply.headers["cache-control"] == "private"
    assert_sent_to_log_in(site.get(PATH, method="HEAD"))


def test_the_etag_revalidates_to_304(site: Site, cookie: str) -> None:
    etag = site.get(PATH, {"Cookie": cookie}).headers["etag"]
    reply = site.get(PATH, {"Cookie": cookie, "If-None-Match": etag})
    assert (reply.status, reply.body) == (304, b"")


def test_a_missing_private_file_is_a_404(site: Site, cookie: str) -> None:
    assert site.get("/private/reports/none.pdf", {"Cookie": cookie}).status == 404
    assert site.get("/private/reports/none.pdf").status == 302  # who asks is checked before what exists


def test_private_files_are_not_under_media(site: Site, cookie: str) -> None:
    """The middleware answers ``/media/`` itself, before any view: the example's ``public_key``
    keeps the private keys out of it."""
    for headers in ({}, {"Cookie": cookie}):
        reply = site.get("/media/" + quote(KEY), headers)
        assert reply.status == 404 and CONTENT[:32] not in reply.body
    public = site.get("/media/" + PUBLIC_KEY)
    assert (public.status, public.body, public.headers["cache-control"]) == (
        200, b"public pixels", "public, max-age=3600")


# -- straight to gunicorn -------------------------------------------------------------------------


def test_an_untrusted_address_gets_the_bytes_streamed(site: Site, cookie: str) -> None:
    target = f"{PATH}?direct"
    assert_sent_to_log_in(site.direct(PATH, source="127.0.0.2"))
    reply = site.direct(target, {"Cookie": cookie}, source="127.0.0.2")
    assert_is_the_private_file(reply)
    assert not [name for name, _ in reply.fields if name.startswith("x-reproxy")]
    assert site.app_requests(target) == [("127.0.0.2", "200", len(CONTENT))]


def test_the_trusted_address_gets_the_reproxy_answer(site: Site, cookie: str) -> None:
    """127.0.0.1 is where Perlbal asks from: a client there is taken for it, as the settings say."""
    assert_sent_to_log_in(site.direct(PATH))
    reply = site.direct(PATH, {"Cookie": cookie})
    assert (reply.status, reply.body) == (200, b"")
    urls = reply.headers["x-reproxy-url"].split()
    assert urls and all(url.startswith("http://127.0.0.1:") for url in urls)
    assert reply.headers["cache-control"] == "private"
