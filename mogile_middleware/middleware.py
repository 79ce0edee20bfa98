"""MogileFSMiddleware: answer requests under a URL prefix from MogileFS, pass the rest through.

Example::

    from mogile_middleware import MogileFSMiddleware

    application = MogileFSMiddleware(
        application, domain="media", trackers=["10.0.0.1:7001", "10.0.0.2:7001"],
        prefix="/media/", reproxy="perlbal", trusted_proxies=["10.0.0.0/24"],
    )

``GET /media/avatars/42.png`` is then answered for the key ``avatars/42.png``: Perlbal (or
nginx) gets the replica URLs and fetches the bytes itself, and any other client gets the body
streamed by the middleware. Without ``trusted_proxies`` every request under the prefix gets the
reproxy answer, as the classic Django backend did: then the storage URLs are visible to whoever
can reach the application directly.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import mimetypes
import re
from dataclasses import replace
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from webob.exc import HTTPBadGateway, HTTPBadRequest, HTTPMethodNotAllowed, HTTPNotFound, HTTPServiceUnavailable

from .cache import CacheBackend, PathCache
from .client import Client
from .exceptions import BadKeyError, MogileFSError, StorageError, TrackerUnavailableError, UnknownKeyError
from .protocol import MAX_KEY_BYTES
from .responders import Location, NginxReproxy, PerlbalReproxy, Serve, StartResponse, etag_for, is_suffix_range
from .storage import open_replica

log = logging.getLogger("mogile_middleware")

WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

REPROXY_MODES = (None, "perlbal", "nginx")
_CONTROL_CHARACTERS = frozenset(chr(c) for c in [*range(0x20), 0x7F])
_URL_SAFE = re.compile(r"[!-~]+")  # printable ASCII, no blank


class MogileFSMiddleware:
    """Serve or reproxy files stored in MogileFS under ``prefix``; everything else goes to ``app``.

    :param app: the WSGI application to wrap.
    :param client: a :class:`Client`; or give ``domain`` and ``trackers`` to make one.
    :param prefix: the URL path under which keys are served (``/mogilefs/avatars/42.png`` →
        ``avatars/42.png``), relative to ``SCRIPT_NAME``.
    :param reproxy: ``None`` to serve bodies, ``"perlbal"`` (``X-REPROXY-URL``) or ``"nginx"``
        (``X-Accel-Redirect``).
    :param trusted_proxies: addresses or networks of the front proxies; when given, only their
        requests get reproxy headers and every other client gets the body.
    :param require_proxy_header: also require the proxy's own request header before reproxying
        (Perlbal's ``X-Proxy-Capabilities: reproxy-file``, nginx's ``X-Sendfile-Type``).
    :param key_for_path: turns the URL path after the prefix into a key (or ``None``: 404).
    :param cache_control: a ``Cache-Control`` value for files (e.g. ``"public, max-age=3600"``).
    :param path_cache_seconds: how long a key's paths are reused without asking a tracker.
    :param stale_seconds: how much longer they are served while every tracker is down.
    :param cache_backend: a shared path cache (the in-process one by default).
    :param nginx_location: the internal nginx location for ``X-Accel-Redirect``.
    :param perlbal_cache_seconds: send ``X-REPROXY-CACHE-FOR`` so Perlbal skips the app for hot
        keys (off by default: Perlbal then forwards suffix ranges, which storage nodes get wrong).
    :param storage_timeout: seconds for connects and reads on storage nodes in serve mode.
    :param retry_after_seconds: the ``Retry-After`` of a 503 when no tracker answers.
    :param allow_app_reproxy: let the wrapped application send its own reproxy headers
        (``X-REPROXY-*``, ``X-Accel-Redirect``); by default they are removed from its responses,
        so that it cannot be made to fetch internal URLs through the front proxy.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        client: Client | None = None,
        domain: str | None = None,
        trackers: str | Sequence[str] | None = None,
        prefix: str = "/mogilefs/",
        reproxy: str | None = None,
        trusted_proxies: Iterable[str] | None = None,
        require_proxy_header: bool = False,
        key_for_path: Callable[[str], str | None] | None = None,
        cache_control: str | None = None,
        path_cache_seconds: float = 60.0,
        stale_seconds: float = 300.0,
        cache_backend: CacheBackend | None = None,
        nginx_location: str = "/reproxy",
        perlbal_cache_seconds: int | None = None,
        storage_timeout: float = 10.0,
        retry_after_seconds: int = 5,
        allow_app_reproxy: bool = False,
    ) -> None:
        if reproxy not in REPROXY_MODES:
            raise ValueError(f"reproxy must be one of {REPROXY_MODES}, not {reproxy!r}")
        if client is None:
            if not domain or not trackers:
                raise ValueError("give a client, or a domain and trackers")
            client = Client(domain, trackers, storage_timeout=storage_timeout)
        self.app = app
        self.client = client
        self.prefix = "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"
        self.reproxy = reproxy
        self.trusted_proxies = (
            None if trusted_proxies is None
            else tuple(ipaddress.ip_network(proxy, strict=False) for proxy in trusted_proxies)
        )
        # The few proxy addresses recur on every request: decide each once (bounded for the rest).
        self._is_trusted = functools.lru_cache(maxsize=1024)(self._address_is_trusted)
        self.require_proxy_header = require_proxy_header
        self.key_for_path = key_for_path
        self.retry_after_seconds = retry_after_seconds
        self.allow_app_reproxy = allow_app_reproxy
        self.storage_timeout = storage_timeout
        extra = [("X-Content-Type-Options", "nosniff")]
        if cache_control:
            extra.append(("Cache-Control", cache_control))
        self.reproxy_responder: PerlbalReproxy | NginxReproxy | None = (
            PerlbalReproxy(extra_headers=extra, cache_for_seconds=perlbal_cache_seconds) if reproxy == "perlbal"
            else NginxReproxy(location=nginx_location, extra_headers=extra) if reproxy == "nginx"
            else None
        )
        self.serve = Serve(extra_headers=extra, storage_timeout=storage_timeout, on_failure=self._replicas_failed)
        # Bodies are served whenever some client may not be a trusted proxy: then the length is needed.
        self._needs_length = reproxy is None or self.trusted_proxies is not None
        self.paths = PathCache(self._locate, backend=cache_backend, ttl_seconds=path_cache_seconds,
                               stale_seconds=stale_seconds)
        previous = client.on_change
        client.on_change = self.paths.invalidate if previous is None else _both(previous, self.paths.invalidate)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(self.prefix):
            if self.allow_app_reproxy:
                return self.app(environ, start_response)
            return self.app(environ, _without_reproxy_headers(start_response))
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return HTTPMethodNotAllowed(headers={"Allow": "GET, HEAD"})(environ, start_response)
        key = self._key(path[len(self.prefix):])
        if not isinstance(key, str):
            return (key or HTTPNotFound())(environ, start_response)
        try:
            location, headers = self.paths.get(key)
        except UnknownKeyError:
            return HTTPNotFound()(environ, start_response)
        except BadKeyError as error:  # key_for_path made a key the tracker cannot hold
            return HTTPBadRequest(str(error))(environ, start_response)
        except TrackerUnavailableError as error:
            log.error("no tracker answered for %r: %s", key, error)
            unavailable = HTTPServiceUnavailable(headers={"Retry-After": str(self.retry_after_seconds)})
            return unavailable(environ, start_response)
        except MogileFSError as error:  # garbage from a tracker, no replica answering a HEAD
            log.error("cannot locate %r: %s", key, error)
            return HTTPBadGateway()(environ, start_response)
        if self.reproxy_responder is not None and self._may_reproxy(environ):
            return self.reproxy_responder(environ, start_response, location, headers)
        if location.length is None:  # located for reproxying only, served this once
            try:
                location = replace(location, length=self._length(location.paths))
            except MogileFSError as error:
                self._replicas_failed(location, error)
                return HTTPBadGateway()(environ, start_response)
        return self.serve(environ, start_response, location)

    def _key(self, raw_path: str) -> str | HTTPBadRequest | None:
        """The key for the URL path after the prefix; ``None`` (404) or a 400 for a bad one."""
        try:
            # PEP 3333 gives PATH_INFO as the raw bytes decoded as latin-1.
            path = raw_path.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return HTTPBadRequest("The file name is not valid UTF-8.")
        if not _CONTROL_CHARACTERS.isdisjoint(path):
            return HTTPBadRequest("The file name contains control characters.")
        key = self.key_for_path(path) if self.key_for_path is not None else path
        if not key:
            return None
        if len(key.encode("utf-8")) > MAX_KEY_BYTES:
            return HTTPBadRequest(f"The file name is longer than {MAX_KEY_BYTES} bytes.")
        return key

    def _may_reproxy(self, environ: dict[str, Any]) -> bool:
        """True if this request may see storage URLs: from a trusted proxy that can reproxy."""
        if is_suffix_range(environ):
            return False  # storage nodes answer bytes=-N wrongly: serve it with an absolute range
        if self.require_proxy_header and not self._proxy_header_present(environ):
            return False
        return self.trusted_proxies is None or self._is_trusted(environ.get("REMOTE_ADDR", ""))

    def _address_is_trusted(self, remote_addr: str) -> bool:
        try:
            address = ipaddress.ip_address(remote_addr)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies or ())

    def _proxy_header_present(self, environ: dict[str, Any]) -> bool:
        if self.reproxy == "perlbal":
            return "reproxy-file" in environ.get("HTTP_X_PROXY_CAPABILITIES", "")
        return environ.get("HTTP_X_SENDFILE_TYPE", "").lower() == "x-accel-redirect"

    def _locate(self, key: str) -> tuple[Location, list[tuple[str, str]]]:
        """Ask the trackers (and, if bodies may be served, a storage node for the length)."""
        paths = tuple(path for path in self.client.get_paths(key) if _is_clean_url(path))
        if not paths:
            raise StorageError(f"the tracker knows no live replica of {key!r}")
        length = self._length(paths) if self._needs_length else None
        content_type = mimetypes.guess_type(key, strict=False)[0] or "application/octet-stream"
        location = Location(key, paths, etag_for(paths), content_type, length)
        headers = self.reproxy_responder.headers(location) if self.reproxy_responder else []
        return location, headers

    def _length(self, paths: tuple[str, ...]) -> int | None:
        """The file's length, from a HEAD to the first replica that answers."""
        with open_replica(paths, method="HEAD", timeout=self.storage_timeout) as head:
            return head.length

    def _replicas_failed(self, location: Location, error: Exception) -> None:
        # The cached paths may be outdated (the key was overwritten elsewhere): ask again next time.
        log.error("no replica of %r answered: %s", location.key, error)
        self.paths.invalidate(location.key)


def _is_clean_url(url: str) -> bool:
    """True for an http(s) URL that can go into a header as it is (no blank, no control byte)."""
    if url.startswith(("http://", "https://")) and _URL_SAFE.fullmatch(url):
        return True
    log.warning("ignoring a replica URL that cannot go into a header: %r", url)
    return False


def _is_reproxy_header(name: str) -> bool:
    # Perlbal acts on every X-REPROXY-* header; of nginx's X-Accel-* only the redirect fetches.
    lowered = name.lower()
    return lowered.startswith("x-reproxy") or lowered == "x-accel-redirect"


def _without_reproxy_headers(start_response: StartResponse) -> StartResponse:
    """``start_response`` for the wrapped app, dropping the reproxy headers only we may send."""

    def filtered(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if any(_is_reproxy_header(name) for name, _ in headers):
            headers = [(name, value) for name, value in headers if not _is_reproxy_header(name)]
        return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

    return filtered


def _both(first: Callable[[str], None], second: Callable[[str], None]) -> Callable[[str], None]:
    def call_both(key: str) -> None:
        first(key)
        second(key)
    return call_both
