"""The PasteDeploy filter: examples/pipeline.ini loaded in process and under ``gunicorn --paste``."""

from __future__ import annotations

import functools
import http.client
import inspect
import ipaddress
import operator
import posixpath
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DOMAIN, require_module
from integration._wire_client import free_port
from paste.deploy import loadapp, loadfilter
from webtest import TestApp

from mogile_middleware import Client
from mogile_middleware.devserver import DevMogileFS
from mogile_middleware.memcache import MemcachedBackend
from mogile_middleware.middleware import MogileFSMiddleware
from mogile_middleware.paste import CACHE_BACKEND_OPTIONS, OPTIONS, filter_factory
from mogile_middleware.responders import PerlbalReproxy
from mogile_middleware.signing import URLSigner

REPO = Path(__file__).parent.parent.parent
PIPELINE = "config:examples/pipeline.ini"
BODY = b"Hello from MogileFS\n"


def overrides(devmogile: DevMogileFS) -> dict[str, str]:
    """The global values that point examples/pipeline.ini at the test MogileFS."""
    return {"mogile_domain": DOMAIN, "mogile_trackers": devmogile.trackers[0]}


def load_filter(tmp_path: Path, options: str) -> MogileFSMiddleware:
    """Load a ``[filter:mogile]`` section holding ``options`` and wrap a dummy application."""
    ini = tmp_path / "filter.ini"
    ini.write_text(f"[filter:mogile]\nuse = egg:mogile_middleware\n{options}\n")
    make_filter = loadfilter(f"config:{ini}", name="mogile")
    return make_filter(lambda environ, start_response: [])


@pytest.fixture
def examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    # The ini's [app:app] imports examples.app, as gunicorn does from the repository root.
    monkeypatch.syspath_prepend(str(REPO))


@pytest.mark.usefixtures("examples_importable")
def test_the_example_pipeline_serves_files_and_passes_the_rest(devmogile: DevMogileFS) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("hello.txt", BODY, cls="thumb")
    app = TestApp(loadapp(PIPELINE, relative_to=str(REPO), global_conf=overrides(devmogile)))

    file = app.get("/mogilefs/hello.txt")
    assert file.body == BODY and file.content_type == "text/plain"
    assert file.headers["Cache-Control"] == "public, max-age=3600"
    app.get("/mogilefs/missing.txt", status=404)
    page = app.get("/")
    assert page.content_type == "text/html" and b'href="/mogilefs/hello.txt"' in page.body
    app.get("/elsewhere", status=404)


@pytest.mark.usefixtures("examples_importable")
def test_the_example_defaults_are_the_development_mogilefs() -> None:
    middleware = loadapp(PIPELINE, relative_to=str(REPO))
    assert middleware.client.domain == "media"
    assert middleware.client.pool.addresses == [("127.0.0.1", 7001), ("127.0.0.1", 7002)]
    assert (middleware.prefix, middleware.reproxy) == ("/mogilefs/", None)


GOOD = "domain = media\ntrackers = 127.0.0.1:7001"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(GOOD + "\ncolour = blue", r"colour.*options are: .*cache_control, charset, connect_timeout, content_disposition, dead_seconds, domain", id="unknown-option"),
        pytest.param("trackers = 127.0.0.1:7001", r"option domain is required", id="missing-domain"),
        pytest.param("domain = media", r"option trackers is required", id="missing-trackers"),
        pytest.param("domain = media\ntrackers =", r"option trackers is required", id="empty-trackers"),
        pytest.param(GOOD + "\npath_cache_seconds = soon", r"option path_cache_seconds: .*soon", id="not-a-number"),
        pytest.param(GOOD + "\nretry_after_seconds = 2.5", r"option retry_after_seconds: .*2\.5", id="not-an-integer"),
        pytest.param(GOOD + "\nreproxy = squid", r"option reproxy: 'squid' is not one of", id="unknown-reproxy"),
        pytest.param(GOOD + "\nrequire_proxy_header = maybe", r"option require_proxy_header: .*maybe", id="not-a-bool"),
        pytest.param(GOOD + "\ntrusted_proxies = 10.0.0.300", r"option trusted_proxies: .*10\.0\.0\.300",
                     id="bad-network"),
        pytest.param(GOOD + "\nkey_for_path = posixpath:nowhere", r"option key_for_path: cannot import",
                     id="bad-callable"),
        pytest.param("domain = media\ntrackers = 10.0.0.1:7001,10.0.0.2:port", r"option trackers: .*10\.0\.0\.2:port",
                     id="bad-tracker"),
        pytest.param(GOOD + "\nio_timeout = soon", r"option io_timeout: .*soon", id="bad-timeout"),
        pytest.param(GOOD + "\nsigning_key =", r"option signing_key: no secret", id="empty-signing-key"),
        pytest.param(GOOD + "\nreproxy = perlbal\nsigning_key = s\nperlbal_cache_seconds = 30",
                     r"perlbal_cache_seconds .* signing_key",
                     id="signing-and-perlbal-cache"),
        pytest.param(GOOD + "\nprefix =", r"option prefix: give a URL path", id="empty-prefix"),
        pytest.param(GOOD + "\nstorage_timeout = inf", r"storage_timeout .*inf", id="infinite-timeout"),
        pytest.param(GOOD + "\nmemcached_secret = s3cret", r"memcached_secret .* memcached_servers, which is not set",
                     id="secret-without-memcached"),
        pytest.param(GOOD + "\nmemcached_prefix = staging:", r"memcached_prefix .* memcached_servers, which is not set",
                     id="prefix-without-memcached"),
        pytest.param(GOOD + "\nmemcached_servers = 127.0.0.1:1\nmemcached_prefix = two words",
                     r"option memcached_prefix: prefix 'two words' cannot start a memcached key",
                     id="memcached-prefix-with-a-space"),
        # A template's value left unfilled: keys no writer marking the default prefix would reach.
        pytest.param(GOOD + "\nmemcached_servers = 127.0.0.1:1\nmemcached_prefix =",
                     r"option memcached_prefix: no prefix given", id="empty-memcached-prefix"),
        pytest.param(GOOD + "\nmemcached_servers = 127.0.0.1:1\nmemcached_prefix = none",
                     r"option memcached_prefix: 'none' is no value", id="memcached-prefix-none"),
        pytest.param(GOOD + "\nmemcached_servers = 127.0.0.1:x", r"option memcached_servers: .*127\.0\.0\.1:x",
                     id="memcached-bad-port"),
        pytest.param(GOOD + "\nmemcached_servers = :11211", r"':11211'", id="memcached-without-host"),
        # An empty secret signed nothing, silently: entries anyone could forge.
        pytest.param(GOOD + "\nmemcached_servers = 127.0.0.1:1\nmemcached_secret =",
                     r"option memcached_secret: no secret", id="empty-memcached-secret"),
        pytest.param(GOOD + "\nmemcached_secret =", r"option memcached_secret: no secret",
                     id="empty-memcached-secret-without-memcached"),
        pytest.param(GOOD + "\nbody_cache_file_bytes = -1", r"body_cache_file_bytes", id="negative-body-file-size"),
        pytest.param("domain = media\ntrackers = 10.0.0.1:7001;10.0.0.2:7001", r"option trackers: .*10\.0\.0\.1:7001;",
                     id="trackers-run-together"),
        # asbool's "f" (false) or the prefix "f": as true, "t" trusted every key.
        pytest.param(GOOD + "\ntrusted_files = F", r"option trusted_files: 'F' is ambiguous", id="trusted-files-letter"),
    ],
)
def test_a_bad_configuration_fails_at_load_time_naming_the_option(tmp_path: Path, options: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_filter(tmp_path, options)


def test_options_reach_the_middleware_converted(tmp_path: Path) -> None:
    middleware = load_filter(tmp_path, """
domain = media
trackers =
    10.0.0.1:7001
    10.0.0.2:7001, 10.0.0.3:7001
prefix = /files
reproxy = Perlbal
trusted_proxies = 10.0.0.0/24
    192.168.1.7, ::1
require_proxy_header = yes
key_for_path = posixpath:basename
perlbal_cache_seconds = 30
storage_timeout = 2.5
retry_after_seconds = 9
connect_timeout = 0.25
io_timeout = 3
dead_seconds = 30
body_cache_bytes = 8388608
body_cache_file_bytes = 65536
trusted_files = static/
    themes/
""")
    assert middleware.client.pool.addresses == [("10.0.0.1", 7001), ("10.0.0.2", 7001), ("10.0.0.3", 7001)]
    assert (middleware.prefix, middleware.reproxy, middleware.require_proxy_header) == ("/files/", "perlbal", True)
    assert middleware.trusted_proxies == (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("192.168.1.7"),
                                          ipaddress.ip_network("::1"))  # separated as trackers are
    assert middleware.key_for_path is posixpath.basename
    assert isinstance(middleware.reproxy_responder, PerlbalReproxy)
    assert middleware.reproxy_responder.cache_for_seconds == 30
    assert middleware.storage_timeout == 2.5 and middleware.client.storage_timeout == 2.5
    assert middleware.retry_after_seconds == 9
    pool = middleware.client.pool
    assert (pool.connect_timeout, pool.io_timeout, pool.dead_seconds) == (0.25, 3.0, 30.0)
    assert middleware.bodies is not None
    assert (middleware.bodies.max_bytes, middleware.bodies.max_file_bytes) == (8 * 1024 * 1024, 64 * 1024)
    assert middleware.representation.policy.trusted_prefixes == ("static/", "themes/")


@pytest.mark.parametrize("where", ["default", "global_conf", "set"])
def test_a_global_named_as_an_option_is_that_option(tmp_path: Path, where: str) -> None:
    """PasteDeploy drops a section's own value of a name that is also global ([DEFAULT],
    --paste-global): the filter fell back to its default prefix, the global unread, and a global
    ``domain`` made the section's ``domain`` "required"."""
    ini = tmp_path / "filter.ini"
    default = "[DEFAULT]\nprefix = /static/\ndomain = photos\n" if where == "default" else ""
    own = "set prefix = /static/\nset domain = photos\n" if where == "set" else "prefix = /files/\ndomain = media\n"
    ini.write_text(f"{default}[filter:mogile]\nuse = egg:mogile_middleware\n{own}trackers = 127.0.0.1:7001\n")
    given = {"prefix": "/static/", "domain": "photos"} if where == "global_conf" else None
    middleware = loadfilter(f"config:{ini}", name="mogile", global_conf=given)(lambda environ, start_response: [])
    assert (middleware.prefix, middleware.client.domain) == ("/static/", "photos")


@pytest.mark.parametrize("own", ["prefix = /files/", "get prefix = files_prefix"])
def test_what_the_section_writes_wins_over_a_global_of_the_name_that_pastedeploy_passes_on(
        tmp_path: Path, own: str) -> None:
    """The README said a section's ``set`` beat what the section gives itself; PasteDeploy passes
    both, and the section's own word wins (as a ``get`` of another global does)."""
    ini = tmp_path / "filter.ini"
    ini.write_text(f"[DEFAULT]\nfiles_prefix = /files/\n[filter:mogile]\nuse = egg:mogile_middleware\n"
                   f"set prefix = /static/\n{own}\ndomain = media\ntrackers = 127.0.0.1:7001\n")
    middleware = loadfilter(f"config:{ini}", name="mogile")(lambda environ, start_response: [])
    assert middleware.prefix == "/files/"


def test_an_empty_charset_means_none(tmp_path: Path) -> None:
    middleware = load_filter(tmp_path, GOOD + "\ncharset =")
    assert middleware.representation.policy.charset is None
    # "none", as reproxy spells it, was sent as the charset of every text file: text/plain; charset=none
    assert load_filter(tmp_path, GOOD + "\ncharset = None").representation.policy.charset is None
    assert load_filter(tmp_path, GOOD + "\ncharset = ISO-8859-1").representation.policy.charset == "ISO-8859-1"


@pytest.mark.parametrize("name", ["cache_control", "signing_key", "memcached_secret"])
def test_none_is_refused_where_it_would_be_taken_as_text(tmp_path: Path, name: str) -> None:
    """``Cache-Control: none`` replaced a private file's ``private``; a secret "none" is guessed."""
    with pytest.raises(ValueError, match=f"option {name}: 'none' is no value of it; leave the option out"):
        load_filter(tmp_path, GOOD + f"\nmemcached_servers = 127.0.0.1:1\n{name} = None")


def test_content_disposition_none_is_the_default(tmp_path: Path) -> None:
    """No ini file can write Python's None: "none" was refused, by a message that offered None."""
    assert load_filter(tmp_path, GOOD + "\ncontent_disposition = none").representation.policy.content_disposition is None
    assert load_filter(tmp_path, GOOD + "\ncontent_disposition = attachment").representation.policy.content_disposition \
        == "attachment"


def test_private_file_options_reach_the_middleware(tmp_path: Path) -> None:
    middleware = load_filter(tmp_path, GOOD + """
signing_key = new-secret
    old-secret
authorize = operator:contains
""")
    assert middleware.authorize is operator.contains
    signed = URLSigner("old-secret", "media").query("a.txt", 60)  # the second secret verifies
    assert middleware.key_for({"QUERY_STRING": signed}, "a.txt") == "a.txt"
    only_new = URLSigner("new-secret", "media")  # the first secret signs
    assert only_new.refusal("a.txt", middleware.url_for("a.txt").partition("?")[2]) is None


def test_a_passphrase_is_one_secret_not_one_per_word(tmp_path: Path) -> None:
    """Split at its spaces, each word of it opened every file."""
    middleware = load_filter(tmp_path, GOOD + "\nsigning_key = correct horse battery staple")
    for secret, opens in (("horse", False), ("correct horse battery staple", True)):
        query = URLSigner(secret, "media").query("a.txt", 60)
        assert (middleware.key_for({"QUERY_STRING": query}, "a.txt") == "a.txt") is opens, secret


def test_numbers_and_flags_are_typed_before_the_middleware_sees_them() -> None:
    make_filter = filter_factory(
        {"here": "/ignored"}, domain="media", trackers="127.0.0.1:7001", require_proxy_header="off",
        path_cache_seconds="1.5", stale_seconds="30", perlbal_cache_seconds="60", retry_after_seconds="3",
        storage_timeout="4", cache_control="no-cache", nginx_location="/internal", reproxy="none",
        trusted_files="Yes",
    )
    assert isinstance(make_filter, functools.partial)
    typed = {name: (value, type(value)) for name, value in make_filter.keywords.items()}
    assert typed == {
        "domain": ("media", str), "trackers": (["127.0.0.1:7001"], list), "require_proxy_header": (False, bool),
        "path_cache_seconds": (1.5, float), "stale_seconds": (30.0, float), "perlbal_cache_seconds": (60, int),
        "retry_after_seconds": (3, int), "storage_timeout": (4.0, float), "cache_control": ("no-cache", str),
        "nginx_location": ("/internal", str), "reproxy": (None, type(None)), "trusted_files": (True, bool),
    }


def test_every_string_keyword_of_the_middleware_is_an_option() -> None:
    """All but the ASGI middleware's ``client_timeout``, which a WSGI server makes its own."""
    keywords = set(inspect.signature(MogileFSMiddleware).parameters)
    assert set(OPTIONS) - set(CACHE_BACKEND_OPTIONS) == keywords - {"app", "client", "cache_backend", "client_timeout"}


@pytest.mark.usefixtures("without_pymemcache")
def test_memcached_servers_without_pymemcache_name_the_extra() -> None:
    named = ("mogile_middleware option memcached_servers: mogile_middleware.memcache needs pymemcache: "
             "pip install 'mogile_middleware[memcached]'")
    with pytest.raises(ValueError, match=re.escape(named)):
        filter_factory({}, domain="media", trackers="127.0.0.1:7001", memcached_servers="127.0.0.1:11211")


def test_memcached_servers_build_a_shared_cache_backend() -> None:
    make_filter = filter_factory({}, domain="media", trackers="127.0.0.1:7001",
                                 memcached_servers="10.0.0.5:11211\n  10.0.0.6:11212")
    backend = make_filter.keywords["cache_backend"]
    assert isinstance(backend, MemcachedBackend)
    assert backend.servers == [("10.0.0.5", 11211), ("10.0.0.6", 11212)]
    # Separated by commas, as trackers are: one server "10.0.0.5:11211,10.0.0.6", port 11212, and
    # the shared cache silently off.
    commas = filter_factory({}, domain="media", trackers="127.0.0.1:7001",
                            memcached_servers="10.0.0.5:11211,10.0.0.6:11212").keywords["cache_backend"]
    assert commas.servers == backend.servers
    with pytest.raises(ValueError, match="'10.0.0.5:11211;10.0.0.6:11212' is not host:port"):
        filter_factory({}, domain="media", trackers="127.0.0.1:7001", memcached_servers="10.0.0.5:11211;10.0.0.6:11212")
    empty = filter_factory({}, domain="media", trackers="127.0.0.1:7001", memcached_servers="")
    assert empty.keywords["cache_backend"] is None  # the in-process cache
    none = filter_factory({}, domain="media", trackers="127.0.0.1:7001", memcached_servers="none")
    assert none.keywords["cache_backend"] is None  # not the memcached of host "none"
    signed = filter_factory({}, domain="media", trackers="127.0.0.1:7001", memcached_servers="10.0.0.5:11211",
                            memcached_secret="s3cret").keywords["cache_backend"]
    assert signed._signature(b"x") and not backend._signature(b"x")
    # A value on the line after its name keeps the line break before it: the domain "\nmedia", no
    # request served (502), and a secret no other process signs with.
    below = filter_factory({}, domain="\nmedia", trackers="127.0.0.1:7001", memcached_servers="10.0.0.5:11211",
                           memcached_secret="\ns3cret").keywords
    assert below["domain"] == "media" and below["cache_backend"]._signature(b"x") == signed._signature(b"x")
    # Secrets one per line: the first signs, each verifies (a site changing its secret).
    rotating = filter_factory({}, domain="media", trackers="127.0.0.1:7001", memcached_servers="10.0.0.5:11211",
                              memcached_secret="\nn3w s3cret\ns3cret").keywords["cache_backend"]
    assert rotating._signature(b"x") != signed._signature(b"x")
    assert rotating._decode("k", signed._encode("k", None, 1.0)) == (None, 1.0)
    for spec in ("unix:", "unix: 10.0.0.5:11211"):  # a socket of no path: every lookup failed, naming no server
        with pytest.raises(ValueError, match="'unix:' is not host:port, a \\(host, port\\) pair or a unix socket path"):
            filter_factory({}, domain="media", trackers="127.0.0.1:7001", memcached_servers=spec)


@pytest.fixture
def gunicorn_paste(devmogile: DevMogileFS, tmp_path: Path) -> Iterator[int]:
    """``gunicorn --paste examples/pipeline.ini`` from the repository root; yields its port."""
    require_module("gunicorn")
    port = free_port()
    globals_ = [arg for name, value in overrides(devmogile).items() for arg in ("--paste-global", f"{name}={value}")]
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--paste", "examples/pipeline.ini", "--bind", f"127.0.0.1:{port}",
             "--workers", "1", *globals_],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    try:
        wait_for_http(port, process, log)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def wait_for_http(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Return once the server answers on ``port``; fail with its log if it exits or takes 15 s."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and process.poll() is None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("HEAD", "/")
            connection.getresponse()
            connection.close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"gunicorn --paste did not start: {log.read_text()[-2000:]}")


def test_gunicorn_paste_serves_the_example_pipeline(devmogile: DevMogileFS, gunicorn_paste: int) -> None:
    Client(DOMAIN, devmogile.trackers).store_content("hello.txt", BODY, cls="avatar")
    connection = http.client.HTTPConnection("127.0.0.1", gunicorn_paste, timeout=10)
    try:
        connection.request("GET", "/mogilefs/hello.txt")
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, BODY)
        assert response.headers["Cache-Control"] == "public, max-age=3600"
        connection.request("GET", "/")
        response = connection.getresponse()
        assert response.status == 200 and b"/mogilefs/hello.txt" in response.read()
    finally:
        connection.close()
