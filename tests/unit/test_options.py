"""Options no request could use are refused where they are given, naming the option: not a 500,
a 503 or a broken header at every request."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import pytest

from mogile_middleware import Admin, AsyncClient, Client, MemoryCache, MogileFSMiddleware
from mogile_middleware.asgi import MogileFSMiddleware as ASGIMiddleware
from mogile_middleware.async_tracker import AsyncTrackerPool
from mogile_middleware.deadline import MAX_SECONDS
from mogile_middleware.tracker import TrackerPool

BAD_OPTIONS = [
    pytest.param({"cache_control": "public\r\nSet-Cookie: a=b"}, "cache_control", id="cache-control-line-break"),
    pytest.param({"cache_control": 3600}, "cache_control", id="cache-control-number"),
    # An ini file has no comments after a value: caches would take the directives for invalid.
    pytest.param({"cache_control": "public, max-age=3600   # one hour"}, "cache_control", id="cache-control-comment"),
    pytest.param({"cache_control": "public; max-age=60"}, "cache_control", id="cache-control-semicolons"),
    pytest.param({"charset": "utf-8\n"}, "charset", id="charset-line-break"),
    pytest.param({"mimetypes": {".txt": "text/plain\r\nX: y"}}, "mimetypes", id="mimetype-line-break"),
    pytest.param({"reproxy": "nginx", "nginx_location": "reproxy"}, "nginx_location", id="nginx-location-relative"),
    pytest.param({"reproxy": "nginx", "nginx_location": "/re proxy"}, "nginx_location", id="nginx-location-blank"),
    pytest.param({"reproxy": "nginx", "nginx_location": "@"}, "nginx_location", id="nginx-location-unnamed"),
    pytest.param({"reproxy": "perlbal", "perlbal_cache_seconds": -30}, "perlbal_cache_seconds",
                 id="perlbal-cache-negative"),
    pytest.param({"reproxy": "perlbal", "perlbal_cache_seconds": 1.5}, "perlbal_cache_seconds",
                 id="perlbal-cache-fraction"),
    pytest.param({"retry_after_seconds": -1}, "retry_after_seconds", id="retry-after-negative"),
    pytest.param({"path_cache_entries": 0}, "path_cache_entries", id="no-cache-entries"),
    pytest.param({"body_cache_bytes": -1}, "body_cache_bytes", id="body-cache-negative"),
    # Each body's entry counts 100 bytes: a cache this small keeps nothing at all.
    pytest.param({"body_cache_bytes": 100}, "body_cache_bytes", id="body-cache-too-small-to-keep-any"),
    pytest.param({"body_cache_file_bytes": -1}, "body_cache_file_bytes", id="body-cache-file-negative-while-off"),
    pytest.param({"trackers": "127.0.0.1:7001;127.0.0.1:7002"}, "127.0.0.1:7001;127.0.0.1:7002",
                 id="trackers-run-together"),
    pytest.param({"path_cache_seconds": -1}, "path_cache_seconds", id="path-cache-negative"),
    pytest.param({"missing_seconds": "3"}, "missing_seconds", id="missing-seconds-text"),
    pytest.param({"stale_seconds": float("nan")}, "stale_seconds", id="stale-nan"),
    pytest.param({"storage_timeout": 0}, "storage_timeout", id="storage-timeout-zero"),
    pytest.param({"storage_timeout": float("inf")}, "storage_timeout", id="storage-timeout-infinite"),
    pytest.param({"client_timeout": 0}, "client_timeout", id="client-timeout-zero"),
    pytest.param({"io_timeout": 1e10}, "io_timeout", id="io-timeout-past-the-clocks"),
    pytest.param({"path_cache_seconds": float("inf")}, "path_cache_seconds", id="path-cache-infinite"),
    pytest.param({"io_timeout": 0}, "io_timeout", id="io-timeout-zero"),
    pytest.param({"connect_timeout": -1}, "connect_timeout", id="connect-timeout-negative"),
    pytest.param({"dead_seconds": -5}, "dead_seconds", id="dead-seconds-negative"),
    pytest.param({"trackers": ["127.0.0.1:99999"]}, "127.0.0.1:99999", id="tracker-port-out-of-range"),
    pytest.param({"trackers": "127.0.0.1:0"}, "127.0.0.1:0", id="tracker-port-zero"),
    pytest.param({"trackers": "http://127.0.0.1:7001"}, "http://127.0.0.1:7001", id="tracker-url"),
    # Digits and dots are an address to the resolver, never a name: no host answers this one.
    pytest.param({"trackers": "999.1.1.1:7001"}, "999.1.1.1:7001", id="tracker-no-ipv4-address"),
    pytest.param({"prefix": "/files/?a=1"}, "prefix", id="prefix-with-a-query"),
    pytest.param({"prefix": "/files#top/"}, "prefix", id="prefix-with-a-fragment"),
    pytest.param({"prefix": "/%FF/"}, "prefix", id="prefix-escaping-no-utf8"),
    # A path holding a control character is answered with a 400: no request would reach the files.
    pytest.param({"prefix": "/media/\n/photos/"}, "prefix", id="prefix-two-lines"),
    pytest.param({"prefix": "/a%09b/"}, "prefix", id="prefix-escaped-tab"),
    # Each lookup would be refused by the tracker: a 502 at every request.
    pytest.param({"domain": "media\n"}, "domain", id="domain-line-break"),
    # A URL where a path belongs (as a PasteDeploy ini may have it) is a prefix no request matches.
    pytest.param({"prefix": "http://media.example.com/m/"}, "prefix", id="prefix-url"),
    pytest.param({"prefix": "/m/%2F/"}, "prefix", id="prefix-empty-segment-escaped"),
    # Clients remove dot segments from a URL: no link under it reaches the middleware.
    pytest.param({"prefix": "/a/../"}, "clients remove its '.' and '..' segments", id="prefix-dot-dot-segment"),
    pytest.param({"prefix": "/%2e/"}, "clients remove its '.' and '..' segments", id="prefix-dot-segment-escaped"),
    # A switch given as text ("no" is true) weakened what it guards; the others failed at every request.
    pytest.param({"trusted_files": "no"}, "trusted_files", id="trusted-files-text"),
    pytest.param({"trusted_files": "static/"}, "trusted_files", id="trusted-files-one-prefix-as-text"),
    pytest.param({"trusted_files": ["static/", ""]}, "trusted_files", id="trusted-files-empty-prefix"),
    pytest.param({"trusted_files": [b"static/"]}, "trusted_files", id="trusted-files-bytes"),
    pytest.param({"allow_app_reproxy": "no"}, "allow_app_reproxy", id="allow-app-reproxy-text"),
    pytest.param({"require_proxy_header": 1}, "require_proxy_header", id="require-proxy-header-number"),
    pytest.param({"key_for_path": "site.urls:key_for"}, "key_for_path", id="key-for-path-text"),
    pytest.param({"authorize": "site.auth:allows"}, "authorize", id="authorize-text"),
    # A function taking other arguments loaded, then failed every request with a 500.
    pytest.param({"key_for_path": lambda environ, path: path}, "key_for_path must be a function of the path",
                 id="key-for-path-of-two"),
    pytest.param({"authorize": lambda request: True}, "authorize must be a function of the request and the key",
                 id="authorize-of-one"),
    pytest.param({"authorize": lambda request, key, user: True}, "authorize", id="authorize-of-three"),
    pytest.param({"authorize": lambda *, request, key: True}, "authorize", id="authorize-keyword-only"),
    pytest.param({"cache_backend": "127.0.0.1:11211"}, "cache_backend", id="cache-backend-address"),
    pytest.param({"mimetypes": [".txt", "text/plain"]}, "mimetypes", id="mimetypes-list"),
]


@pytest.mark.parametrize("middleware", [MogileFSMiddleware, ASGIMiddleware], ids=["wsgi", "asgi"])
@pytest.mark.parametrize(("options", "named"), BAD_OPTIONS)
def test_a_middleware_refuses_an_option_no_request_could_use(middleware: type, options: dict[str, Any],
                                                             named: str) -> None:
    with pytest.raises(ValueError, match=named):
        middleware(lambda *args: None, **{"domain": "media", "trackers": "127.0.0.1:7001", **options})


@pytest.mark.parametrize("client", [Client, AsyncClient])
@pytest.mark.parametrize("options", [{"storage_timeout": 0}, {"io_timeout": -1}, {"connect_timeout": 0},
                                     {"dead_seconds": -1}])
def test_a_client_refuses_a_timeout_no_request_could_use(client: type, options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        client("media", "127.0.0.1:7001", **options)


def test_usable_edge_values_are_taken() -> None:
    middleware = MogileFSMiddleware(lambda *args: None, domain="media", trackers=[("127.0.0.1", 65535)],
                                    reproxy="nginx", nginx_location="@mogilefs", path_cache_seconds=0,
                                    stale_seconds=MAX_SECONDS, storage_timeout=MAX_SECONDS,
                                    missing_seconds=0, retry_after_seconds=0, dead_seconds=0,
                                    cache_control="public, max-age=60", charset=None)
    assert middleware.client.pool.addresses == [("127.0.0.1", 65535)]


@pytest.mark.parametrize("cache_control", ['no-cache="Set-Cookie, Set-Cookie2"', "public,max-age=60",
                                           "private, max-age=0, must-revalidate", 'x-note="a \\"b\\""'])
def test_every_form_of_cache_control_directives_is_taken(cache_control: str) -> None:
    made = MogileFSMiddleware(lambda *args: None, domain="media", trackers="127.0.0.1:7001", cache_control=cache_control)
    assert ("Cache-Control", cache_control) in made.representation.extra_headers


@pytest.mark.parametrize("middleware", [MogileFSMiddleware, ASGIMiddleware], ids=["wsgi", "asgi"])
@pytest.mark.parametrize(("options", "ignored"), [
    ({"perlbal_cache_seconds": 30}, "reproxy=None: perlbal_cache_seconds (for reproxy='perlbal') ignored"),
    ({"reproxy": "nginx", "trusted_proxies": ["10.0.0.1"], "perlbal_fallback_url": "http://10.0.0.1/"},
     "reproxy='nginx': perlbal_fallback_url (for reproxy='perlbal') ignored"),
    ({"reproxy": "perlbal", "trusted_proxies": ["10.0.0.1"], "nginx_location": "@files"},
     "reproxy='perlbal': nginx_location (for reproxy='nginx') ignored"),
    ({"trusted_proxies": ["10.0.0.1"], "require_proxy_header": True},
     "reproxy=None: trusted_proxies (for reproxy='perlbal' or 'nginx'), require_proxy_header (for reproxy='perlbal' "
     "or 'nginx') ignored"),
])
def test_an_option_of_another_reproxy_mode_is_said_to_be_ignored(middleware: type, options: dict[str, Any],
                                                                 ignored: str, caplog: pytest.LogCaptureFixture) -> None:
    middleware(lambda *args: None, domain="media", trackers="127.0.0.1:7001", **options)
    assert [record.getMessage() for record in caplog.records] == [ignored]


def test_perlbal_cache_seconds_ignored_in_another_mode_is_no_hole_in_private_files() -> None:
    """Refused with signing_key or authorize in every mode, though only Perlbal's answers use it:
    one settings file could not serve a site in serve mode and one behind Perlbal."""
    for reproxy in (None, "nginx"):
        made = MogileFSMiddleware(lambda *args: None, domain="media", trackers="127.0.0.1:7001", reproxy=reproxy,
                                  trusted_proxies=["10.0.0.1"] if reproxy else None, perlbal_cache_seconds=30,
                                  signing_key="s3cret")
        assert made.signer is not None
    with pytest.raises(ValueError, match="perlbal_cache_seconds lets Perlbal answer"):
        MogileFSMiddleware(lambda *args: None, domain="media", trackers="127.0.0.1:7001", reproxy="perlbal",
                           perlbal_cache_seconds=30, signing_key="s3cret")


@pytest.mark.parametrize("middleware", [MogileFSMiddleware, ASGIMiddleware], ids=["wsgi", "asgi"])
@pytest.mark.parametrize("cache_control", ["public, max-age=60", "max-age=60", 'private="Set-Cookie", max-age=60',
                                           'no-cache="Set-Cookie"', 'private="Set-Cookie,no-store,X-A", max-age=60',
                                           'ext="a, no-cache, b", public', "must-understand, no-store, max-age=600"])
def test_authorize_refuses_a_cache_control_that_lets_shared_caches_keep_its_files(middleware: type,
                                                                                  cache_control: str) -> None:
    """A shared cache would answer every other request with the file one request was allowed."""
    with pytest.raises(ValueError, match="lets a shared cache give a file authorize allowed one request to every other"):
        middleware(lambda *args: None, domain="media", trackers="127.0.0.1:7001", cache_control=cache_control,
                   authorize=lambda request, key: True)


@pytest.mark.parametrize("cache_control", ["private, max-age=60", "PRIVATE", "no-store", "public, no-cache",
                                           'no-store, private="Set-Cookie"', 'x-note="a, b",private'])
def test_authorize_takes_a_cache_control_that_keeps_its_files_from_shared_caches(cache_control: str) -> None:
    made = MogileFSMiddleware(lambda *args: None, domain="media", trackers="127.0.0.1:7001",
                              cache_control=cache_control, authorize=lambda request, key: True)
    assert ("Cache-Control", cache_control) in made.representation.extra_headers


def test_signed_urls_may_be_kept_by_shared_caches() -> None:
    """A shared cache keys what it keeps by the URL, signature included: a site may let its CDN
    keep signed files (for their max-age, past the link's expiry: see the README)."""
    made = MogileFSMiddleware(lambda *args: None, domain="media", trackers="127.0.0.1:7001",
                              cache_control="public, max-age=60", signing_key="s3cret")
    assert ("Cache-Control", "public, max-age=60") in made.representation.extra_headers


def test_options_of_the_reproxy_mode_given_are_not_said_to_be_ignored(caplog: pytest.LogCaptureFixture) -> None:
    MogileFSMiddleware(lambda *args: None, domain="media", trackers="127.0.0.1:7001", reproxy="perlbal",
                       trusted_proxies=["10.0.0.1"], require_proxy_header=True, perlbal_cache_seconds=30,
                       perlbal_fallback_url="http://10.0.0.1/", nginx_location="/reproxy")
    MogileFSMiddleware(lambda *args: None, domain="media", trackers="127.0.0.1:7001", reproxy="nginx",
                       trusted_proxies=["10.0.0.1"], nginx_location="@files", perlbal_cache_seconds=0)
    assert caplog.records == []


class _Allows:
    def __call__(self, request: object, key: str, *rest: object) -> bool:
        return True


@pytest.mark.parametrize("middleware", [MogileFSMiddleware, ASGIMiddleware], ids=["wsgi", "asgi"])
def test_functions_that_take_their_arguments_are_taken_however_they_spell_them(middleware: type) -> None:
    def of_any(*args: object, **kwargs: object) -> bool:
        return True

    def as_user(check: Callable[[object, str, str], bool]) -> Callable[[object, str], bool]:
        @functools.wraps(check)  # the wrapper is what is called: the signature of the function is more
        def wrapper(request: object, key: str) -> bool:
            return check(request, key, "alice")
        return wrapper

    @as_user
    def allowed_for(request: object, key: str, user: str) -> bool:
        return True

    for key_for_path, authorize in [(str.lower, _Allows()), (lambda path, prefix="": path, of_any),
                                    (functools.partial(lambda scheme, path: path, "s"), lambda request, key=None: True),
                                    (str.strip, allowed_for)]:
        made = middleware(lambda *args: None, domain="media", trackers="127.0.0.1:7001", key_for_path=key_for_path,
                          authorize=authorize)
        assert made.key_for_path is key_for_path and made.authorize is authorize


@pytest.mark.parametrize("middleware", [MogileFSMiddleware, ASGIMiddleware], ids=["wsgi", "asgi"])
def test_a_client_given_with_a_domain_or_trackers_is_refused_naming_them(middleware: type) -> None:
    client = Client("media", "127.0.0.1:7001") if middleware is MogileFSMiddleware else AsyncClient(
        "media", "127.0.0.1:7001")
    with pytest.raises(ValueError, match="domain, trackers: the given client has its own"):
        middleware(lambda *args: None, client=client, domain="other", trackers="10.0.0.1:7001")


@pytest.mark.parametrize("middleware", [MogileFSMiddleware, ASGIMiddleware], ids=["wsgi", "asgi"])
@pytest.mark.parametrize(("outer", "inner", "error"), [
    ("/media/", "/media/private/", "prefix '/media/' holds the prefix '/media/private/' of the middleware it wraps"),
    ("/", "/thumbs/", "prefix '/' holds the prefix '/thumbs/'"),
    ("/media/", "/media/", "prefix '/media/' is the prefix of the middleware it wraps"),
])
def test_a_middleware_refuses_to_wrap_one_it_would_answer_for(middleware: type, outer: str, inner: str,
                                                              error: str) -> None:
    """Its requests would all be answered outside: the inner one's ``authorize`` skipped, and
    the outer one's domain asked for its keys."""
    options = {"domain": "media", "trackers": "127.0.0.1:7001"}
    private = middleware(lambda *args: None, prefix=inner, authorize=lambda request, key: False, **options)
    with pytest.raises(ValueError, match=re.escape(error)):
        middleware(private, prefix=outer, **options)
    between = middleware(private, prefix="/other/", **options)
    with pytest.raises(ValueError, match="of the middleware it wraps, which would never be asked"):
        middleware(between, prefix=outer, **options)
    assert middleware(middleware(lambda *args: None, prefix=outer, **options), prefix=inner + "more/",
                      **options).app.prefix == outer  # the longer prefix outside

    class Unbound:  # as werkzeug's LocalProxy outside a request: every attribute an error
        def __call__(self, *args: Any) -> None:
            pass

        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("working outside of request context")

    assert middleware(Unbound(), prefix=outer, **options).prefix == outer


@pytest.mark.parametrize("client", [Client, AsyncClient, Admin])
def test_a_pool_given_with_trackers_or_timeouts_is_refused_naming_them(client: type) -> None:
    pool = AsyncTrackerPool("127.0.0.1:7001") if client is AsyncClient else TrackerPool("127.0.0.1:7001")
    arguments, options, named = ((), {}, "trackers") if client is Admin else (
        ("media",), {"io_timeout": 0.5}, "trackers, io_timeout")
    with pytest.raises(ValueError, match=f"{named}: the given pool has its own"):
        client(*arguments, "10.0.0.1:7001", pool=pool, **options)
    assert client(*arguments, pool=pool).pool is pool
    if client is not Admin:  # given, if at the default, it would be ignored as well
        with pytest.raises(ValueError, match="io_timeout: the given pool has its own"):
            client(*arguments, pool=pool, io_timeout=5.0)
    with pytest.raises(ValueError, match="pool must be a"):
        client(*arguments, pool="127.0.0.1:7001")


@pytest.mark.parametrize("max_entries", [0, -1, "10", True])
def test_a_memory_cache_holds_at_least_one_entry(max_entries: object) -> None:
    with pytest.raises(ValueError, match="max_entries must be a whole number >= 1"):
        MemoryCache(max_entries=max_entries)  # type: ignore[arg-type]
