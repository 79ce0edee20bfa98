"""What the WSGI and ASGI middlewares share: their options, and every decision that needs no I/O.

A request under the prefix reads one way: the method and the key (or a 405, 400, 404), the
location of the key (the subclass's locator: a thread's or an event loop's), then whether this
client may be sent to the storage nodes (trust, the proxy's own headers, ranges a node gets
wrong) and that answer, or the body served by the subclass. The request is read from a mapping
of CGI names (``REQUEST_METHOD``, ``HTTP_RANGE``, ...): the WSGI environ itself, or one built
from an ASGI scope.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, ClassVar
from urllib.parse import quote, unquote_to_bytes

from . import http
from .bodies import ENTRY_BYTES, BodyCache
from .cache import CacheBackend, is_cache_backend
from .content import ContentPolicy
from .deadline import checked_seconds
from .exceptions import (
    BadKeyError,
    KeyChangingError,
    MogileFSError,
    StorageError,
    TrackerError,
    TrackerUnavailableError,
    UnknownKeyError,
)
from .http import Answer, FileRequest
from .locate import is_clean_url
from .protocol import MAX_KEY_BYTES, check_linked_path, check_url_key, has_control_character, local_link
from .responders import NginxReproxy, PerlbalReproxy, Representation, Reproxy
from .signing import BAD_SIGNATURE, EXPIRED, UNSIGNED, Secret, URLSigner
from .storage import OwnShortageError
from .throttle import ThrottledLog
from .views import FOR_VIEW, NOT_REPROXIED, REPROXIED, SERVE_HEADER_LOWER

log = logging.getLogger("mogile_middleware")

#: A request as CGI names its parts: the WSGI environ, or one made from an ASGI scope.
Environ = Mapping[str, Any]

REPROXY_MODES = (None, "perlbal", "nginx")
#: In ``trusted_proxies``: the peer of a unix socket (an empty ``REMOTE_ADDR``).
UNIX_SOCKET = "unix"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 5.6.2
_NGINX_LOCATION = re.compile(r"/[!-~]*|@[!-~]+")  # a path, or a named location: "@" and a name
_CACHE_DIRECTIVE = rf'{_TOKEN.pattern}(?:=(?:{_TOKEN.pattern}|"(?:[\t !#-\[\]-~]|\\[\t -~])*"))?'
#: A Cache-Control field value (RFC 9111 5.2): directives, each a token with an optional token or
#: quoted-string argument, separated by commas.
_CACHE_CONTROL = re.compile(rf"{_CACHE_DIRECTIVE}(?:[ \t]*,[ \t]*{_CACHE_DIRECTIVE})*")
#: The options that only some reproxy modes use: with another, a warning says they are ignored.
_REPROXY_OPTIONS = {"trusted_proxies": ("perlbal", "nginx"), "require_proxy_header": ("perlbal", "nginx"),
                    "perlbal_cache_seconds": ("perlbal",), "perlbal_fallback_url": ("perlbal",),
                    "nginx_location": ("nginx",)}
_NOT_UTF8 = http.error(400, "The file name is not valid UTF-8.")
_CONTROL = http.error(400, "The file name contains control characters.")
_TOO_LONG = http.error(400, f"The file name is longer than {MAX_KEY_BYTES} bytes.")
#: The length of a file not known yet, as a range is read: past any range a client asks of it.
_ANY_LENGTH = 2 ** 63
_TRACKER_REFUSED = http.error(502, "The tracker refused to look the file up.")
_NO_REPLICA_LISTED = http.error(502, "The trackers list no usable replica of this file.")
_BEING_REPLACED = http.error(503, "The file is being replaced.", [("Retry-After", "1")])
_FORBIDDEN = {reason: http.error(403, reason) for reason in (UNSIGNED, BAD_SIGNATURE, EXPIRED)}
#: Seconds between two lines about requests no tracker answered: an outage fails every request,
#: and the log says so once per this time, counting those it left out, not once per request.
OUTAGE_LOG_INTERVAL = 10.0
#: Seconds a signed link that expired may still open its file for a trusted proxy's request after
#: every replica it was given failed (``examples/nginx.conf`` waits 5 s for each): the client's
#: request came with the link valid.
FALLBACK_GRACE_SECONDS = 60.0


def authorize_answer(allowed: object, middleware: str) -> bool:
    """``authorize``'s answer for ``middleware`` (its name, for the error): one still to await or
    to iterate (a coroutine handed on without ``await``, an async generator) is refused, closed,
    never taken for a yes."""
    if inspect.isawaitable(allowed) or inspect.isasyncgen(allowed):
        raise wrong_answer("authorize", allowed, f"the {middleware} middleware needs a true or false answer")
    return bool(allowed)


def wrong_answer(name: str, answer: object, needs: str) -> TypeError:
    """The error for the answer of the application's function ``name``, not what the middleware
    ``needs``. One still to await or to iterate is closed: no warning says it never was."""
    if inspect.isawaitable(answer) or inspect.isasyncgen(answer):
        getattr(answer, "close", lambda: None)()
    return TypeError(f"{name} answered {type(answer).__name__}: {needs}")


def async_kind(function: Any) -> str | None:
    """``"a coroutine"`` or ``"an async generator"`` if that is what calling ``function`` makes
    (a partial of it, or an object whose ``__call__`` does, too), else ``None``: either, not
    awaited, is a true answer."""
    while isinstance(function, functools.partial):
        function = function.func
    # A class's __call__ is its instances': calling the class makes an instance.
    for candidate in (function, None if isinstance(function, type) else getattr(function, "__call__", None)):
        if inspect.iscoroutinefunction(candidate):
            return "a coroutine"
        if inspect.isasyncgenfunction(candidate):
            return "an async generator"
    return None


class MiddlewareCore:
    """Serve or reproxy files stored in MogileFS under ``prefix``; everything else goes to ``app``.

    The options of both middlewares; a subclass names its ``client_class`` and ``locator_class``.

    :param app: the application to wrap.
    :param client: a client of :attr:`client_class`; or give ``domain`` and ``trackers`` to make one.
    :param prefix: the URL path under which keys are served (``/mogilefs/avatars/42.png`` →
        ``avatars/42.png``), relative to ``SCRIPT_NAME``.
    :param reproxy: ``None`` to serve bodies, ``"perlbal"`` (``X-REPROXY-URL``) or ``"nginx"``
        (``X-Accel-Redirect``).
    :param trusted_proxies: addresses or networks of the front proxies (``"unix"``: a proxy on a
        unix socket); when given, only their requests get reproxy headers and every other client
        gets the body. IPv4-mapped IPv6 addresses are compared as IPv4.
    :param require_proxy_header: also require the proxy's own request header before reproxying
        (Perlbal's ``X-Proxy-Capabilities: reproxy-file``, nginx's ``X-Sendfile-Type``).
    :param key_for_path: turns the URL path after the prefix into a key (or ``None``: 404).
    :param cache_control: a ``Cache-Control`` value for files (e.g. ``"public, max-age=3600"``).
    :param mimetypes: extensions (or name endings) → types, before the standard table.
    :param charset: the charset of text types (``None``: none sent).
    :param trusted_files: the MogileFS holds only the site's own assets (``True``), or does under
        these key prefixes (``["static/"]``): serve HTML, SVG, XML, JavaScript and CSS there as
        they are. Elsewhere, users' files cannot run script on the site: HTML, SVG and XML get
        ``Content-Security-Policy: sandbox``, JavaScript and CSS are sent as text.
    :param content_disposition: ``"attachment"`` or ``"inline"`` with the key's file name
        (RFC 6266), or ``None`` (no header).
    :param path_cache_seconds: how long a key's paths are reused without asking a tracker.
    :param path_cache_entries: how many keys the in-process path cache holds (when full, the
        ones stored longest ago go first); each takes about 550 bytes.
    :param missing_seconds: how long "no such key" is reused (0: every request asks).
    :param replicating_seconds: how long the paths of a file still short of its class's copies
        are reused (a real tracker replicates a new file in the background).
    :param stale_seconds: how much longer they are served while every tracker is down.
    :param cache_backend: a shared path cache (the in-process one by default).
    :param body_cache_bytes: memory for the bodies of small files in serve mode, per process (0:
        none kept): a kept file is answered without a storage node round trip. A fid's bytes
        never change, so a kept body is as fresh as the path cache's answer for its key.
    :param body_cache_file_bytes: the largest file whose body is kept.
    :param nginx_location: the internal nginx location for ``X-Accel-Redirect``.
    :param perlbal_cache_seconds: send ``X-REPROXY-CACHE-FOR`` so Perlbal skips the app for hot
        keys (off by default: Perlbal then forwards suffix ranges, which storage nodes get wrong).
    :param perlbal_fallback_url: the application as Perlbal reaches it (``http://10.0.0.5:8000``):
        sent as the last reproxy URL, so that when every replica fails (the key was overwritten or
        deleted elsewhere) Perlbal asks the application, which looks the key up anew.
    :param storage_timeout: seconds for connects and reads on storage nodes in serve mode.
    :param client_timeout: ASGI: seconds a streamed body may go without a piece read from the
        node or taken by the server (which takes one when the client's socket has room) before
        the transfer ends and its storage connection is closed. A WSGI server writes the body
        itself (gunicorn's ``--timeout`` bounds a sync worker).
    :param connect_timeout: ``io_timeout``, ``dead_seconds``: for the client made from ``domain``
        and ``trackers`` (see :class:`~mogile_middleware.tracker.TrackerPool`; ``None``: its default).
    :param retry_after_seconds: the ``Retry-After`` of a 503 when no tracker answers.
    :param allow_app_reproxy: let the wrapped application send its own reproxy headers
        (``X-REPROXY-*``, ``X-Accel-Redirect``); by default they are removed from its responses,
        so that it cannot be made to fetch internal URLs through the front proxy.
    :param authorize: ``authorize(request, key)`` is asked before any tracker call (``request``:
        the WSGI environ, or the ASGI scope; only an ASGI one may be a coroutine function); false
        answers 403. A site that prefers to hide what exists answers 404 through ``key_for_path``.
    :param signing_key: every request under the prefix must carry a valid, unexpired signature
        for its path, made by :meth:`url_for` (a secret, or a list of them: the first signs, each
        verifies); anything else is a 403 without any tracker call.

    With ``authorize`` or ``signing_key`` and no ``cache_control``, files are sent with
    ``Cache-Control: private``, so that shared caches keep them for no one else; with
    ``authorize``, a ``cache_control`` that lets them is refused.
    """

    #: The client made from ``domain`` and ``trackers``, and the locator over it.
    client_class: ClassVar[Any]
    locator_class: ClassVar[Any]
    #: Whether an ``authorize`` that is a coroutine function is awaited (ASGI).
    awaits_authorize: ClassVar[bool] = False

    def __init__(
        self,
        app: Any,
        *,
        client: Any = None,
        domain: str | None = None,
        trackers: str | Sequence[str] | None = None,
        prefix: str = "/mogilefs/",
        reproxy: str | None = None,
        trusted_proxies: Iterable[str] | None = None,
        require_proxy_header: bool = False,
        key_for_path: Callable[[str], str | None] | None = None,
        cache_control: str | None = None,
        mimetypes: Mapping[str, str] | None = None,
        charset: str | None = "utf-8",
        trusted_files: bool | Sequence[str] = False,
        content_disposition: str | None = None,
        path_cache_seconds: float = 10.0,
        path_cache_entries: int = 10_000,
        missing_seconds: float = 3.0,
        replicating_seconds: float = 2.0,
        stale_seconds: float = 300.0,
        cache_backend: CacheBackend | None = None,
        body_cache_bytes: int = 0,
        body_cache_file_bytes: int = 256 * 1024,
        nginx_location: str = NginxReproxy.DEFAULT_LOCATION,
        perlbal_cache_seconds: int | None = None,
        perlbal_fallback_url: str | None = None,
        storage_timeout: float = 10.0,
        client_timeout: float = 300.0,
        connect_timeout: float | None = None,
        io_timeout: float | None = None,
        dead_seconds: float | None = None,
        retry_after_seconds: int = 5,
        allow_app_reproxy: bool = False,
        authorize: Callable[[Any, str], Any] | None = None,
        signing_key: Secret | Sequence[Secret] | None = None,
    ) -> None:
        if reproxy not in REPROXY_MODES:
            raise ValueError(f"reproxy must be one of {REPROXY_MODES}, not {reproxy!r}")
        _refuse_unusable(cache_control=cache_control, charset=charset, nginx_location=nginx_location,
                         perlbal_cache_seconds=perlbal_cache_seconds, retry_after_seconds=retry_after_seconds,
                         path_cache_entries=path_cache_entries, body_cache_bytes=body_cache_bytes,
                         body_cache_file_bytes=body_cache_file_bytes)
        if not callable(app):
            raise ValueError(f"app must be the application to wrap, not {app!r}")
        _refuse_mistyped(require_proxy_header=require_proxy_header, trusted_files=trusted_files,
                         allow_app_reproxy=allow_app_reproxy, key_for_path=key_for_path, authorize=authorize,
                         cache_backend=cache_backend, mimetypes=mimetypes)
        for name, seconds in [("path_cache_seconds", path_cache_seconds), ("missing_seconds", missing_seconds),
                              ("replicating_seconds", replicating_seconds), ("stale_seconds", stale_seconds)]:
            checked_seconds(name, seconds, zero=True)
        checked_seconds("storage_timeout", storage_timeout)
        checked_seconds("client_timeout", client_timeout)
        private = authorize is not None or signing_key is not None
        if authorize is not None and cache_control and not _kept_from_shared_caches(cache_control):
            raise ValueError(f"cache_control {cache_control!r} lets a shared cache give a file authorize allowed one "
                             "request to every other: add private (or no-cache, or no-store)")
        if private and perlbal_cache_seconds and reproxy == "perlbal":
            raise ValueError("perlbal_cache_seconds lets Perlbal answer repeated requests without asking the "
                             "middleware, which would skip authorize and signing_key")
        if perlbal_fallback_url is not None and not (isinstance(perlbal_fallback_url, str)
                                                     and is_clean_url(perlbal_fallback_url)):
            raise ValueError("perlbal_fallback_url must be an http:// URL of a host (and a port in range), "
                             f"not {perlbal_fallback_url!r}")
        timeouts = {name: value for name, value in [("connect_timeout", connect_timeout), ("io_timeout", io_timeout),
                                                    ("dead_seconds", dead_seconds)] if value is not None}
        if client is None:
            if not domain or not trackers:
                raise ValueError("give a client, or a domain and trackers")
            client = self.client_class(domain, trackers, storage_timeout=storage_timeout, **timeouts)
        elif timeouts or domain or trackers:
            given = [*timeouts, *(["domain"] if domain else []), *(["trackers"] if trackers else [])]
            raise ValueError(f"{', '.join(given)}: the given client has its own; set them on it")
        elif not all(callable(getattr(client, method, None)) for method in ("get_paths", "add_change_listener")) \
                or inspect.iscoroutinefunction(client.get_paths) != \
                inspect.iscoroutinefunction(self.client_class.get_paths):
            raise TypeError(f"{type(self).__module__}.{type(self).__name__} needs a client of class "
                            f"{self.client_class.__name__} (or one with its methods), not {type(client).__name__}")
        self.app = app
        self.client = client
        #: The URL path under which keys are served, as text (percent-escapes decoded), and as a
        #: request's path holds it (PEP 3333: its UTF-8 bytes as latin-1) to be matched against.
        self.prefix, self.path_prefix = url_prefix(prefix)
        _refuse_shadowing(self.prefix, self.path_prefix, app)
        self.trusted_proxies = None if trusted_proxies is None else parse_trusted_proxies(trusted_proxies)
        self._trust_unix_socket = self.trusted_proxies is not None and UNIX_SOCKET in self.trusted_proxies
        # The few proxy addresses recur on every request: decide each once (bounded for the rest).
        self._is_trusted = functools.lru_cache(maxsize=1024)(self._address_is_trusted)
        self.require_proxy_header = require_proxy_header
        if reproxy is not None and trusted_proxies is None:
            log.warning("reproxy=%r without trusted_proxies: every client that reaches the application directly "
                        "gets storage URLs%s", reproxy,
                        ", whatever proxy header it sends" if require_proxy_header else "")
        elif reproxy is not None and not self.trusted_proxies:
            log.warning("reproxy=%r with no trusted proxy: every request is served, none reproxied", reproxy)
        given = {"trusted_proxies": trusted_proxies is not None, "require_proxy_header": require_proxy_header,
                 "perlbal_cache_seconds": bool(perlbal_cache_seconds), "perlbal_fallback_url": bool(perlbal_fallback_url),
                 "nginx_location": nginx_location != NginxReproxy.DEFAULT_LOCATION}
        if unused := [f"{name} (for reproxy={' or '.join(map(repr, _REPROXY_OPTIONS[name]))})"
                      for name, set_ in given.items() if set_ and reproxy not in _REPROXY_OPTIONS[name]]:
            log.warning("reproxy=%r: %s ignored", reproxy, ", ".join(unused))
        if made := async_kind(key_for_path):
            raise TypeError(f"key_for_path must be a plain function: it makes {made}, and the middleware "
                            "calls it without awaiting")
        if (made := async_kind(authorize)) and (made != "a coroutine" or not self.awaits_authorize):
            awaited = "" if self.awaits_authorize else " (the ASGI middleware awaits a coroutine)"
            raise TypeError(f"authorize must be a plain function: it makes {made}, and {type(self).__name__} "
                            f"needs a true or false answer{awaited}")
        # One taking other arguments would fail every request with a 500.
        _refuse_invalid([(name, value, value is None or _takes(value, count), f"a function of {taking}, or None")
                         for name, value, count, taking in [("key_for_path", key_for_path, 1, "the path"),
                                                            ("authorize", authorize, 2, "the request and the key")]])
        self.key_for_path = key_for_path
        self.allow_app_reproxy = allow_app_reproxy
        self.authorize = authorize
        self.signer = None if signing_key is None else URLSigner(signing_key, client.domain)
        self.unavailable = http.service_unavailable(retry_after_seconds)
        self._outage_log = ThrottledLog(log, logging.ERROR, "no tracker answered for %r: %r", OUTAGE_LOG_INTERVAL,
                                        "requests")
        #: Serve mode's requests that no replica answered (a 502), logged as an outage is.
        self.unanswered = ThrottledLog(log, logging.ERROR, "no replica of %r answered: %r", OUTAGE_LOG_INTERVAL,
                                       "requests")
        #: Lookups that failed otherwise (no live replica listed, a tracker's refusal): a file whose
        #: devices all died fails every request for it, logged as an outage is.
        self._lookup_failed = ThrottledLog(log, logging.ERROR, "cannot locate %r: %r", OUTAGE_LOG_INTERVAL, "requests")
        #: Serve mode's requests whose cached replicas failed, asking the trackers again (the file
        #: changed elsewhere, or its nodes are down: then every request for it, logged as one).
        self.asked_again = ThrottledLog(log, logging.INFO, "no replica of %r answered, asking the trackers again: %r",
                                        OUTAGE_LOG_INTERVAL, "requests")
        extra = [("X-Content-Type-Options", "nosniff")]
        if cache_control or private:
            extra.append(("Cache-Control", cache_control or "private"))
        self.reproxy = reproxy
        self.retry_after_seconds = retry_after_seconds
        self.storage_timeout = storage_timeout
        self.client_timeout = client_timeout
        self.bodies = BodyCache(body_cache_bytes, body_cache_file_bytes) if body_cache_bytes else None
        policy = ContentPolicy(mimetypes=mimetypes, charset=charset, trusted_files=trusted_files,
                               content_disposition=content_disposition)
        self.representation = Representation(policy, extra)
        self.reproxy_responder: Reproxy | None = (
            PerlbalReproxy(self.representation, cache_for_seconds=perlbal_cache_seconds,
                           fallback_url=perlbal_fallback_url) if reproxy == "perlbal"
            else NginxReproxy(self.representation, location=nginx_location) if reproxy == "nginx"
            else None
        )
        # Bodies are served whenever some client may not be a trusted proxy: then the length is needed.
        # So it is in a shared cache, whose other sites may serve bodies from the entries stored here.
        with_length = reproxy is None or self.trusted_proxies is not None or cache_backend is not None
        self.locator = self.locator_class(
            client, with_length=with_length, cache_backend=cache_backend,
            path_cache_seconds=path_cache_seconds, path_cache_entries=path_cache_entries,
            missing_seconds=missing_seconds,
            replicating_seconds=replicating_seconds, stale_seconds=stale_seconds,
        )

    def __repr__(self) -> str:
        mode = f"reproxy={self.reproxy!r}" if self.reproxy else "serving bodies"
        return f"<{type(self).__name__} of {self.prefix!r}, {mode}, through {self.client!r}>"

    def key_for(self, environ: Environ, path: str) -> str | Answer:
        """The key of the URL ``path`` after the prefix, or the 405, 400, 404 or 403 (signature) answer."""
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return http.METHOD_NOT_ALLOWED
        decoded = path if path.isascii() else self._decoded(path)
        if self.signer is not None:
            # What the URL names is signed: no signed URL names a path that is not UTF-8.
            fell_back = self._fell_back(environ)
            query = environ.get("QUERY_STRING", "")
            refusal = self.signer.refusal(decoded if isinstance(decoded, str) else "",
                                          self._signed_query(query) if fell_back else query,
                                          grace=FALLBACK_GRACE_SECONDS if fell_back else 0.0)
            if refusal is not None:
                return _FORBIDDEN[refusal]
        return self._key(decoded) if isinstance(decoded, str) else decoded

    def url_for(self, key: str, *, expires_in: float = 3600, path: str | None = None) -> str:
        """The URL path (below the application's root) that serves ``key``, with a query signed for
        ``expires_in`` seconds when there is a ``signing_key``. With ``key_for_path``, give the
        ``path`` after the prefix that it maps to ``key``: the signature covers the path, and so
        the key it maps to."""
        key = check_url_key(key)
        if self.key_for_path is not None and path is None:
            raise ValueError("with key_for_path, url_for needs the path that maps to the key")
        if path is not None and not isinstance(path, str):
            raise TypeError(f"path must be the text of a URL path after the prefix, not {type(path).__name__}")
        named = check_linked_path(key if path is None else path)
        url = local_link(quote(self.prefix + named, safe="/"))
        return url if self.signer is None else f"{url}?{self.signer.query(named, expires_in)}"

    def _signed_query(self, query: str) -> str:
        """The query of a trusted proxy's request after every replica failed as :meth:`url_for`
        made it: without the mark of Perlbal's fallback request (from anyone else, the mark is a
        parameter the signature does not cover)."""
        if isinstance(self.reproxy_responder, PerlbalReproxy) and self.reproxy_responder.fallback_url:
            unmarked = self.reproxy_responder.unmarked(query)
            return query if unmarked is None else unmarked
        return query

    def request_of(self, environ: Environ) -> FileRequest:
        """What of the request decides a file answer served here. Perlbal sends its fallback
        request the client's ``Range`` but not its ``If-Range``, and the part it gets under the
        first answer's ``ETag``: a part of a new version would be joined to the client's copy of
        the old one, so that request gets all of the file."""
        request = file_request(environ)
        if request.range is not None and isinstance(self.reproxy_responder, PerlbalReproxy) \
                and self.reproxy_responder.fell_back(environ):
            return dataclasses.replace(request, range=None)
        return request

    def reproxy_answer(self, environ: Environ, location: Any) -> Answer | None:
        """The answer that sends a trusted proxy to the replicas, or ``None``: serve the body."""
        responder = self.reproxy_responder
        if responder is not None and self._may_reproxy(environ, responder, location):
            return responder.answer(location, environ.get("HTTP_IF_MATCH"), environ.get("HTTP_IF_NONE_MATCH"),
                                    environ.get("HTTP_RANGE"),
                                    self._fallback_target(environ) if responder.wants_target else "")
        return None

    def _fallback_target(self, environ: Environ) -> str:
        """The request target that Perlbal's fallback request asks again, or ``""`` for none. That
        request carries ``Host`` and ``Range`` alone (no cookie): an answer that depends on who
        asks (a view's, or one ``authorize`` allowed) gets none, since the application would judge
        another request, and might answer it with a login page, which Perlbal would send under
        this answer's headers. Nor does a request whose ``If-Match`` names the version it must
        get: the fallback serves the version current then."""
        if FOR_VIEW in environ or self.authorize is not None or "HTTP_IF_MATCH" in environ:
            return ""
        return _request_target(environ)

    def error_answer(self, error: MogileFSError, key: str) -> Answer:
        """The answer for a lookup or a serving that failed: 404, 400, 503 or 502 (logged)."""
        if isinstance(error, UnknownKeyError):
            return http.NOT_FOUND
        if isinstance(error, BadKeyError):  # key_for_path made a key no tracker holds (not UTF-8 text)
            return http.error(400, str(error))
        if isinstance(error, TrackerUnavailableError):
            self._outage_log.event(key, error)
            return self.unavailable
        if isinstance(error, OwnShortageError):  # out of file descriptors, no node failed: come back
            self.unanswered.event(key, error)
            return self.unavailable
        if isinstance(error, KeyChangingError):  # in a second, the writer may have paused
            log.warning("cannot locate %r: %s", key, error)
            return _BEING_REPLACED
        self._lookup_failed.event(key, error)
        if isinstance(error, StorageError):  # no live replica listed: none was asked
            return _NO_REPLICA_LISTED
        # A tracker's refusal (a domain it does not know) is no replica's failure.
        return _TRACKER_REFUSED if isinstance(error, TrackerError) else http.BAD_GATEWAY

    @staticmethod
    def _decoded(raw_path: str) -> str | Answer:
        """The URL path after the prefix, not ASCII, as the characters it names, or the 400 answer
        if not UTF-8."""
        try:
            # PEP 3333 gives PATH_INFO as the raw bytes decoded as latin-1.
            return raw_path.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return _NOT_UTF8

    def _key(self, path: str) -> str | Answer:
        """The key for the (decoded) URL path after the prefix, or the 404 or 400 answer for a bad one."""
        if has_control_character(path):
            return _CONTROL
        if self.key_for_path is not None:
            path = self.key_for_path(path)  # type: ignore[assignment]
            if path and not isinstance(path, str):  # no key, falsy: 404, as None
                raise wrong_answer("key_for_path", path, "the middleware needs a key (str) or None")
        if not path:
            return http.NOT_FOUND
        if (len(path) if path.isascii() else len(path.encode("utf-8"))) > MAX_KEY_BYTES:
            return _TOO_LONG
        return path

    def _fell_back(self, environ: Environ) -> bool:
        """True for a trusted proxy's request after every replica it was given failed."""
        responder = self.reproxy_responder
        return responder is not None and responder.fell_back(environ) and self._from_trusted(environ)

    def _from_trusted(self, environ: Environ) -> bool:
        """True if the request comes from a trusted proxy (from anyone without ``trusted_proxies``)."""
        return self.trusted_proxies is None or self._is_trusted(environ.get("REMOTE_ADDR", ""))

    def _may_reproxy(self, environ: Environ, responder: Reproxy, location: Any) -> bool:
        """True if this request may see storage URLs: from a trusted proxy that can reproxy."""
        if NOT_REPROXIED in environ:
            return False
        ranged = environ.get("HTTP_RANGE")
        if ranged is not None and (environ.get("REQUEST_METHOD") == "HEAD"
                                   or not http.if_range_holds(environ.get("HTTP_IF_RANGE"), location.etag)
                                   or not _node_reads_alike(ranged, location.length)):
            # A HEAD ignores a Range (RFC 9110 14.2), which the proxy would send on to the node;
            # storage nodes check no If-Range: serve those here.
            return False
        if_match = environ.get("HTTP_IF_MATCH")
        if if_match is not None and not http.etag_matches(if_match, location.etag, weak=False):
            return False  # a 412 decided from the cached version: serve mode confirms it first
        if self.require_proxy_header and not responder.proxy_asks(environ.get(responder.request_header, "")):
            return False
        if responder.fell_back(environ):
            return False  # every URL the proxy was given failed: serve it, looking the key up anew
        return self._from_trusted(environ)

    def _address_is_trusted(self, remote_addr: str) -> bool:
        if not remote_addr:  # a unix socket's peer has no address
            return self._trust_unix_socket
        try:
            address = ipaddress.ip_address(remote_addr)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped:  # 127.0.0.1 behind a dual-stack [::] bind
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted_proxies or () if network != UNIX_SOCKET)


def url_prefix(prefix: str) -> tuple[str, str]:
    """``prefix`` with a slash at either end, as text (percent-escapes decoded) and as PEP 3333
    gives a path; a ValueError for what is not a path of this site (a query, a fragment, an empty
    segment: a URL given where a path belongs), whose links clients would change (a ``.`` or
    ``..`` segment, which they remove), that escapes bytes that are not UTF-8, or that holds a
    control character (a tab, a line break: a request's path with one is answered with a 400)."""
    refused = ValueError(f"prefix must be a URL path such as '/mogilefs/', not {prefix!r}")
    if not isinstance(prefix, str) or "?" in prefix or "#" in prefix:
        raise refused
    if not prefix.strip():  # taken for "/", it would leave the application no request
        raise ValueError(f"prefix must be a URL path such as '/mogilefs/' ('/' for every path), not {prefix!r}")
    raw = unquote_to_bytes("/" + prefix.strip("/") + "/" if prefix.strip("/") else "/")
    if b"//" in raw:
        raise refused
    if any(segment in (b".", b"..") for segment in raw.split(b"/")):
        raise ValueError(f"prefix must be a URL path such as '/mogilefs/', not {prefix!r}: clients remove "
                         f"its '.' and '..' segments from a link")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"prefix must be UTF-8 once percent-decoded, not {prefix!r}") from None
    if has_control_character(text):
        raise ValueError(f"prefix must be a URL path such as '/mogilefs/', not {prefix!r}: it holds a control "
                         f"character, and a request's path with one is answered with a 400")
    return text, raw.decode("latin-1")


def _refuse_unusable(*, cache_control: object, charset: object, nginx_location: object,
                     perlbal_cache_seconds: object, retry_after_seconds: object, path_cache_entries: object,
                     body_cache_bytes: object, body_cache_file_bytes: object) -> None:
    """Raise ValueError naming the first option no request could use: a header value that is not
    one (a line break would end the header; a comment after a Cache-Control's directives would
    make caches ignore them), a location nginx would not take, a count below what it counts."""
    checks = [
        ("cache_control", cache_control,
         cache_control is None or isinstance(cache_control, str) and bool(_CACHE_CONTROL.fullmatch(cache_control)),
         "directives such as 'public, max-age=3600' (RFC 9111 5.2)"),
        ("charset", charset, charset is None or isinstance(charset, str) and bool(_TOKEN.fullmatch(charset)),
         "a charset name such as 'utf-8', or None"),
        ("nginx_location", nginx_location,
         isinstance(nginx_location, str) and bool(_NGINX_LOCATION.fullmatch(nginx_location)),
         "an nginx location such as '/reproxy' or '@reproxy'"),
        ("perlbal_cache_seconds", perlbal_cache_seconds,
         perlbal_cache_seconds is None or _is_count(perlbal_cache_seconds, 0), "a whole number of seconds >= 0"),
        ("retry_after_seconds", retry_after_seconds, _is_count(retry_after_seconds, 0),
         "a whole number of seconds >= 0"),
        ("path_cache_entries", path_cache_entries, _is_count(path_cache_entries, 1), "a whole number >= 1"),
        ("body_cache_bytes", body_cache_bytes, _is_count(body_cache_bytes, 0) and not 0 < body_cache_bytes <= ENTRY_BYTES,
         f"0 (none kept) or a whole number of bytes > {ENTRY_BYTES} (each body's entry counts as many)"),
        ("body_cache_file_bytes", body_cache_file_bytes, _is_count(body_cache_file_bytes, 0),
         "a whole number of bytes >= 0"),  # checked even while body_cache_bytes keeps the cache off
    ]
    _refuse_invalid(checks)


def _kept_from_shared_caches(cache_control: str) -> bool:
    """True if a valid ``Cache-Control`` value lets no shared cache answer another request with
    what it stored without asking (RFC 9111 5.2.2): ``private`` or ``no-cache`` without field
    names (``private="Set-Cookie"`` keeps only that field from them), or ``no-store`` without
    ``must-understand`` (which lets a cache that knows the status store it)."""
    directives = [match.group().lower() for match in re.finditer(_CACHE_DIRECTIVE, cache_control)]
    return not {"private", "no-cache"}.isdisjoint(directives) or (
        "no-store" in directives and "must-understand" not in directives)


def _refuse_mistyped(*, require_proxy_header: object, trusted_files: object, allow_app_reproxy: object,
                     key_for_path: object, authorize: object, cache_backend: object, mimetypes: object) -> None:
    """Raise ValueError naming the first option of another kind than it must be: a switch that is
    not True or False (a string "no" would be true), a function that is not one, a cache backend
    without ``get``, ``set`` and ``delete``, types that are not a mapping. Each would otherwise
    fail at every request, or weaken what it guards."""
    checks = [
        *((name, value, isinstance(value, bool), "True or False") for name, value in [
            ("require_proxy_header", require_proxy_header), ("allow_app_reproxy", allow_app_reproxy)]),
        ("trusted_files", trusted_files, isinstance(trusted_files, bool) or (
            isinstance(trusted_files, (list, tuple)) and all(isinstance(prefix, str) and prefix
                                                             for prefix in trusted_files)),
         "True, False or a list of key prefixes such as ['static/'] (True trusts every key)"),
        *((name, value, value is None or callable(value), "a function, or None") for name, value in [
            ("key_for_path", key_for_path), ("authorize", authorize)]),
        ("cache_backend", cache_backend, cache_backend is None or is_cache_backend(cache_backend),
         "an object with get, set and delete (a CacheBackend), or None"),
        ("mimetypes", mimetypes, mimetypes is None or isinstance(mimetypes, Mapping),
         "a mapping of extensions to types, or None"),
    ]
    _refuse_invalid(checks)


def _takes(function: Callable[..., Any], count: int) -> bool:
    """True if ``function`` can be called with ``count`` arguments, or Python cannot tell (a
    builtin without a signature)."""
    try:  # a decorator's wrapper is what is called, not the function it wraps (which may take more)
        signature = inspect.signature(function, follow_wrapped=False)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*range(count))
    except TypeError:
        return False
    return True


def _refuse_invalid(checks: list[tuple[str, object, bool, str]]) -> None:
    """Raise ValueError for the first ``(name, value, valid, expected)`` that is not valid."""
    for name, value, valid, expected in checks:
        if not valid:
            raise ValueError(f"{name} must be {expected}, not {value!r}")


def _is_count(value: object, minimum: int) -> bool:
    """True for a whole number (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def parse_trusted_proxies(proxies: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network | str, ...]:
    """Addresses and networks (``"10.0.0.0/24"``, ``"::1"``), and :data:`UNIX_SOCKET` for the peer of
    a unix socket; raises ``ValueError`` naming a bad one."""
    if isinstance(proxies, (str, bytes, bytearray)):  # each character (each byte's number) taken for an address
        raise ValueError(f"trusted_proxies must be a list of addresses or networks, not the string {proxies!r}")
    if not isinstance(proxies, Iterable):
        raise ValueError(f"trusted_proxies must be a list of addresses or networks, not {type(proxies).__name__}")
    parsed: list[ipaddress.IPv4Network | ipaddress.IPv6Network | str] = []
    for proxy in proxies:
        if not isinstance(proxy, str):  # ip_network() takes a number, or 4 bytes, for an address
            raise ValueError(f"trusted proxy {proxy!r} is not an address, a network or {UNIX_SOCKET!r}: "
                             f"not text but {type(proxy).__name__}")
        try:
            parsed.append(UNIX_SOCKET if proxy == UNIX_SOCKET else _as_ipv4(ipaddress.ip_network(proxy, strict=False)))
        except ValueError as error:
            raise ValueError(
                f"trusted proxy {proxy!r} is not an address, a network or {UNIX_SOCKET!r}: {error}") from None
    return tuple(parsed)


def _as_ipv4(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4-mapped network (``::ffff:10.0.0.1``, as a dual-stack bind shows a peer) as the IPv4
    one: peers are compared as IPv4, so the mapped form would match none."""
    mapped = network.network_address.ipv4_mapped if network.version == 6 and network.prefixlen >= 96 else None
    return network if mapped is None else ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")


def wrapped_middlewares(app: Any) -> Iterator[MiddlewareCore]:
    """The middlewares of this package that ``app`` is or wraps, outermost first: through each
    one's ``app``, and what ``__wrapped__`` names (the metrics endpoint's, Django's lifespan answerer's)."""
    for _ in range(_MAX_WRAPPERS):
        if isinstance(app, MiddlewareCore):
            yield app
            app = app.app
        else:
            try:
                app = getattr(app, "__wrapped__", None)
            except Exception:  # a proxy that reads nothing yet (werkzeug's LocalProxy outside a request)
                return
        if app is None:
            return


#: How deep :func:`wrapped_middlewares` looks: a ``__wrapped__`` may name its own object.
_MAX_WRAPPERS = 64


def _refuse_shadowing(prefix: str, path_prefix: str, app: Any) -> None:
    """A ValueError when ``app`` is or wraps a middleware whose prefix lies under ``prefix``
    (:func:`wrapped_middlewares`): every request of its prefix would be answered here, its
    ``authorize`` and its domain skipped."""
    for inner in wrapped_middlewares(app):
        if inner.path_prefix == path_prefix:
            raise ValueError(f"prefix {prefix!r} is the prefix of the middleware it wraps, which would never be asked")
        if inner.path_prefix.startswith(path_prefix):
            raise ValueError(f"prefix {prefix!r} holds the prefix {inner.prefix!r} of the middleware it wraps, which "
                             "would never be asked: wrap this one in that one (the longer prefix outside)")


def _node_reads_alike(range_header: str, length: int | None) -> bool:
    """True when a storage node answers ``range_header`` as RFC 9110 reads it, with a 206 or a 200.

    Else the request is served here: a suffix range (the node sends the first bytes), one spelled
    otherwise (``BYTES=0-1``: the node sends all of it, which Perlbal refuses as the wrong size),
    an invalid one (its 416, which RFC 9110 lets a server ignore) and, the length known, one past
    the end (the node's 416 would carry the file's headers).
    """
    if range_header.count("=") > 1:  # Range fields joined: nginx sends the node the first alone
        return False
    if len(range_header) > http.MAX_RANGE:  # not read here: the node sends all of a list, which it never reads
        return "," in range_header
    size = _ANY_LENGTH if length is None else length
    status, first, last = http.storage_node_range(range_header, size)
    ours = http.byte_range(range_header, size)
    return ours is None if status == 200 else status == 206 and ours == (first, last)


def file_request(environ: Environ) -> FileRequest:
    """The parts of a request that decide a file answer."""
    return FileRequest(
        environ.get("REQUEST_METHOD", "GET"), environ.get("HTTP_IF_MATCH"), environ.get("HTTP_IF_NONE_MATCH"),
        environ.get("HTTP_RANGE"), environ.get("HTTP_IF_RANGE"),
    )


def _request_target(environ: Environ) -> str:
    """The request's path and query, percent-encoded as a client sends them."""
    path = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/:@!$&'()*+,;=~",
                 encoding="latin-1")
    query = environ.get("QUERY_STRING")
    return f"{path}?{query}" if query else path


def is_reproxy_header(name: str) -> bool:
    """True for the headers only the middleware may send (Perlbal acts on every ``X-REPROXY-*``;
    of nginx's ``X-Accel-*`` only the redirect fetches)."""
    lowered = name.lower()
    return lowered.startswith("x-reproxy") or lowered == "x-accel-redirect"


def mark_reproxied(request: Mapping[str, Any]) -> None:
    """Tell the middlewares around that the reproxy headers of ``request``'s answer (a WSGI
    environ, an ASGI scope) are a middleware's own (see :data:`~mogile_middleware.views.REPROXIED`)."""
    marks = request.get(REPROXIED)
    if marks is not None:
        marks.append(True)


def reproxy_marks(request: MutableMapping[str, Any]) -> list[bool]:
    """The marks of :func:`mark_reproxied` for ``request``, which a middleware is passing on."""
    return request.setdefault(REPROXIED, [])


def is_internal_header(name: str) -> bool:
    """True for the reproxy headers and :data:`~mogile_middleware.views.SERVE_HEADER`: what the
    application's answers are checked for."""
    lowered = name.lower()  # as is_reproxy_header reads it, without a second call for each header passed on
    return lowered.startswith("x-reproxy") or lowered in ("x-accel-redirect", SERVE_HEADER_LOWER)
