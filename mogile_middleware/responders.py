"""The answers for a located key: serve the body, or let Perlbal or nginx fetch it (reproxy).

Each responder owns its way of answering: the reproxy ones know their proxy's request header
and response headers (plain lists, built once per location since they sit on the hot path);
:class:`Serve` opens a replica before anything is promised, and asks the trackers once more when
the replicas it was given are gone. Every answer is decided here and started by the middleware.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from . import http, metrics
from .content import ContentPolicy
from .exceptions import StorageError
from .bodies import BodyCache
from .http import Answer, FilePlan, FileRequest, Headers
from .locate import Location, Locator, Steps, run_steps
from .protocol import names_a_fid
from .storage import CHUNK_SIZE, OwnShortageError, ResumedReplica, Resumption, open_replica, read_replica
from .throttle import ThrottledLog

log = logging.getLogger("mogile_middleware")

#: The query parameter that marks Perlbal's request of the fallback URL.
FALLBACK_MARK = "mogilefs-fallback"
_URL_SAFE = re.compile(r"[!-~]+")  # printable ASCII, no blank


@dataclass(frozen=True)
class StreamedAnswer:
    """An answer whose body comes from a storage node, already open."""

    status: str
    headers: Headers
    body: ReplicaBody
    #: As :attr:`Answer.reproxy <mogile_middleware.http.Answer>`: the body is this answer's own.
    reproxy: ClassVar[None] = None


class OpenedFile(NamedTuple):
    """What serve mode sends of a file, once decided: the plan's status and headers, and its bytes,
    the body cache's (``resumption`` None) or a replica open, with where to go on if it is cut."""

    key: str
    plan: FilePlan
    body: Any  # bytes, or a replica response of the blocking or the asyncio side
    resumption: Resumption | None


class Representation:
    """The headers that describe a file in every mode: what the content policy says of its key
    (type, sandbox, disposition), its ETag, and the site's own (``nosniff``, ``Cache-Control``)."""

    def __init__(self, policy: ContentPolicy, extra_headers: Headers) -> None:
        self.policy = policy
        self.extra_headers = extra_headers

    def headers(self, location: Location) -> Headers:
        """The headers of ``location`` (built once per location, kept beside it)."""
        memo = location.memo
        headers = None if memo is None else memo.get(self)
        if headers is None:
            headers = location.remember(self, [*self.policy.headers(location.key), ("ETag", f'"{location.etag}"'),
                                               *self.extra_headers])
        return headers


class Reproxy:
    """What both reproxy answers share: 304 answered here, headers built once per location.

    A subclass gives its proxy's ``headers`` for a location and the request headers it reads.
    """

    #: The proxy's name, as the middleware's ``reproxy`` option gives it.
    name = ""
    #: The request header (WSGI name) by which the proxy says it reproxies.
    request_header = ""
    #: True if :meth:`answer` needs the request's target (path and query as the client sent them).
    wants_target = False

    def __init__(self, representation: Representation) -> None:
        self.representation = representation

    @staticmethod
    def proxy_asks(value: str) -> bool:
        """True if the request header's ``value`` says the proxy reproxies."""
        raise NotImplementedError

    def fell_back(self, environ: dict[str, Any]) -> bool:
        """True for the proxy's own request after every URL it was given failed: the key changed
        elsewhere, so this one is served by the middleware, which then looks the key up anew."""
        return False

    def headers(self, location: Location) -> Headers:
        """The response headers for ``location`` (built once per location, not per request)."""
        raise NotImplementedError

    def for_request(self, headers: Headers, location: Location, range_header: str | None, target: str) -> Headers:
        """``headers`` for one request: with a ``Range`` (which the proxy forwards to the node) or
        for the request ``target`` (when :attr:`wants_target`)."""
        return headers

    def answer(self, location: Location, if_match: str | None, if_none_match: str | None,
               range_header: str | None, target: str = "") -> Answer:
        """412 or 304 as the preconditions decide (the proxy checks none), else the answer that
        sends the proxy to the replicas."""
        memo = location.memo
        answer = None if memo is None else memo.get(self)
        if answer is None:  # one answer object per location: the hot path allocates nothing
            answer = location.remember(self, Answer("200 OK", self.headers(location), reproxy=self.name))
        if if_match is not None or if_none_match is not None:
            decided = http.precondition_answer(if_match, if_none_match, location.etag,
                                               self.representation.headers(location))
            if decided is not None:
                return decided
        if range_header is not None or target:
            return Answer("200 OK", self.for_request(answer.headers, location, range_header, target), reproxy=self.name)
        return answer


class PerlbalReproxy(Reproxy):
    """Perlbal reproxy: an empty 200 whose ``X-REPROXY-URL`` lists every replica, in order.

    Perlbal fetches the first URL that answers and passes the client this response's headers,
    without any ``X-REPROXY-*``; it passes on none of the storage node's validators, so ``304``
    is answered here. ``cache_for_seconds`` sends ``X-REPROXY-CACHE-FOR`` so that Perlbal answers
    repeated requests without asking the application at all.

    When every URL fails Perlbal answers 503 itself and never tells the application. With
    ``fallback_url`` (the application as Perlbal reaches it, ``http://10.0.0.5:8000``) the last
    URL is the request itself there, marked with :data:`FALLBACK_MARK`: the middleware serves it
    after looking the key up anew (without ``X-REPROXY-EXPECTED-SIZE``, which would refuse a new
    version of another length). Perlbal sends that body under the first answer's headers.
    """

    name = "perlbal"
    request_header = "HTTP_X_PROXY_CAPABILITIES"

    def __init__(self, representation: Representation, *, cache_for_seconds: int | None = None,
                 fallback_url: str | None = None) -> None:
        super().__init__(representation)
        self.cache_for_seconds = cache_for_seconds
        self.fallback_url = fallback_url.rstrip("/") if fallback_url else None
        self.wants_target = fallback_url is not None

    def fell_back(self, environ: dict[str, Any]) -> bool:
        """True for Perlbal's request of the fallback URL: marked, and without the headers Perlbal
        adds to every request it forwards (its reproxy fetch sends ``Host`` and ``Range`` alone),
        so a client adding the mark through Perlbal does not make the application serve it."""
        return (self.fallback_url is not None and "HTTP_X_FORWARDED_FOR" not in environ
                and "HTTP_X_PROXY_CAPABILITIES" not in environ
                and self.unmarked(environ.get("QUERY_STRING", "")) is not None)

    @staticmethod
    def unmarked(query: str) -> str | None:
        """``query`` without the :data:`FALLBACK_MARK` parameter it ends with, or ``None`` without it."""
        if query == FALLBACK_MARK:
            return ""
        return query.removesuffix("&" + FALLBACK_MARK) if query.endswith("&" + FALLBACK_MARK) else None

    @staticmethod
    def proxy_asks(value: str) -> bool:
        """True if ``X-Proxy-Capabilities`` says Perlbal reproxies."""
        return "reproxy-file" in value

    def headers(self, location: Location) -> Headers:
        """Type, ETag, the replicas, and the length Perlbal should get (when known)."""
        # Accept-Ranges: Perlbal passes on none of the node's headers but its Content-* ones.
        described = [*self.representation.headers(location), ("Accept-Ranges", "bytes")]
        headers = [*described, ("Content-Length", "0"), ("X-REPROXY-URL", location.urls)]
        if self.cache_for_seconds:
            # A cache hit gets only the headers named here: all of the file's (its sandbox, nosniff...).
            names = " ".join(name for name, _ in described)
            headers.append(("X-REPROXY-CACHE-FOR", f"{self.cache_for_seconds}; {names}"))
        if location.length is not None:
            headers.append(("X-REPROXY-EXPECTED-SIZE", str(location.length)))
        return headers

    def for_request(self, headers: Headers, location: Location, range_header: str | None, target: str) -> Headers:
        """For one range, ``X-REPROXY-EXPECTED-SIZE`` of the part the node will send (a range is
        reproxied only when the node reads it as the middleware does); with the fallback URL of
        ``target`` last, when it can go into the header, and then no expected size: Perlbal refuses
        a body of another length, so the fallback could not bring a new version."""
        part = None
        if range_header is not None and location.length is not None:
            part = http.byte_range(range_header, location.length)
        if isinstance(part, tuple):
            size = str(part[1] - part[0] + 1)
            headers = [(name, size if name == "X-REPROXY-EXPECTED-SIZE" else value) for name, value in headers]
        if target and _URL_SAFE.fullmatch(target):
            separator = "&" if "?" in target else "?"
            fallback = f"{self.fallback_url}{target}{separator}{FALLBACK_MARK}"
            headers = [(name, f"{value} {fallback}" if name == "X-REPROXY-URL" else value) for name, value in headers
                       if name != "X-REPROXY-EXPECTED-SIZE"]
        return headers


class NginxReproxy(Reproxy):
    """nginx ``X-Accel-Redirect``: an internal location proxies to ``X-Reproxy-URL``.

    nginx takes one URL per header, so the replicas go in ``X-Reproxy-URL``, ``X-Reproxy-URL-2``,
    ... and the shipped ``examples/nginx.conf`` falls back from the first to the next on error;
    when the last fails too it asks the application again with ``X-Reproxy-Failed``, and the
    middleware then looks the key up anew and serves the body itself.
    """

    name = "nginx"
    request_header = "HTTP_X_SENDFILE_TYPE"
    DEFAULT_LOCATION = "/reproxy"

    def fell_back(self, environ: dict[str, Any]) -> bool:
        """True for nginx's request with ``X-Reproxy-Failed``, sent by ``examples/nginx.conf``."""
        return "HTTP_X_REPROXY_FAILED" in environ

    def __init__(self, representation: Representation, *, location: str = DEFAULT_LOCATION) -> None:
        super().__init__(representation)
        self.location = location

    @staticmethod
    def proxy_asks(value: str) -> bool:
        """True if ``X-Sendfile-Type`` says nginx reproxies."""
        return value.lower() == "x-accel-redirect"

    def headers(self, location: Location) -> Headers:
        """Type, ETag, the internal location and one header per replica, and the request headers
        that chose this answer over the file's body: a cache between nginx and the application
        kept it for nginx's request after every replica failed, which then got it again (an
        empty file), and for a client reaching the cache without nginx (storage URLs). nginx
        drops ``Vary`` at ``X-Accel-Redirect``: clients never see it."""
        urls = [("X-Reproxy-URL" if n == 1 else f"X-Reproxy-URL-{n}", url)
                for n, url in enumerate(location.paths, 1)]
        return [
            *self.representation.headers(location),
            ("Content-Length", "0"),
            ("Vary", "X-Sendfile-Type, X-Reproxy-Failed, Range, If-Range"),
            ("X-Accel-Redirect", self.location),
            *urls,
        ]


class ReplicaBody:
    """The body of an open replica, chunk by chunk; closing it closes the storage connection.

    A transfer cut midway goes on from a replica again (:class:`~.storage.ResumedReplica`: a
    client that took nothing for 30 s had its transfer closed by mogstored); when it cannot, it
    raises, so the server closes the connection short of ``Content-Length`` instead of
    presenting a truncated file as complete.
    """

    def __init__(self, key: str, upstream: ResumedReplica) -> None:
        self._key = key
        self._upstream = upstream

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        try:
            for chunk in self._upstream.iter_chunks(CHUNK_SIZE):
                yield chunk
                sent += len(chunk)
        except (OSError, StorageError) as error:
            log.error("transfer of %r from %r cut midway: %r", self._key, self._upstream.url, error)
            raise
        finally:
            self._upstream.close()
            metrics.recorder.bytes_served(sent)

    def close(self) -> None:
        """Close the storage node connection (servers call this, also when the client left)."""
        self._upstream.close()


class Serve:
    """Serve mode: the body streamed from a storage node, opened before the answer is started.

    304, 412 and 416 ask no storage node, HEAD only asks one whether the file is there (with a
    HEAD, no body; with ``bodies``, a small file not yet kept is read and kept, as for a GET).
    When no replica of a location answers, the trackers
    are asked once more (the key may have been overwritten or deleted by another process, whose
    old files are gone): the new version is served, or a 404; a 502 only when the replicas the
    trackers name now fail too.
    """

    def __init__(self, locator: Locator, representation: Representation, *, storage_timeout: float,
                 unanswered: ThrottledLog, asked_again: ThrottledLog, bodies: BodyCache | None) -> None:
        self.representation = representation
        self.storage_timeout = storage_timeout
        self.unanswered, self.asked_again = unanswered, asked_again
        self.bodies = bodies
        self._serve_step = serve_step_caller(locator, open_replica, read_replica, storage_timeout)

    def answer(self, request: FileRequest, location: Location) -> Answer | StreamedAnswer:
        """The answer to ``request``; raises the locator's errors (no such key, no tracker)."""
        steps = serve_steps(request, location, self.representation, self.unanswered, self.asked_again, self.bodies)
        opened = run_steps(steps, self._serve_step)
        if isinstance(opened, Answer):
            return opened
        if opened.resumption is None:  # kept bytes
            if opened.body:
                metrics.recorder.bytes_served(len(opened.body))  # handed to the server whole
            return Answer(opened.plan.status, opened.plan.headers, opened.body)
        resumed = ResumedReplica(opened.body, opened.resumption, timeout=self.storage_timeout)
        return StreamedAnswer(opened.plan.status, opened.plan.headers, ReplicaBody(opened.key, resumed))


def serve_step_caller(locator: Any, open_replica: Callable[..., Any], read_replica: Callable[..., Any],
                      timeout: float) -> Callable[..., Any]:
    """What carries out :func:`serve_steps`' steps with one side's functions (blocking, or asyncio
    ones whose calls are awaited): ask ``locator``, or open or read a replica."""
    def call(name: str, *args: Any) -> Any:
        if name == "open_replica":
            paths, method, byte_range, size = args
            return open_replica(paths, method=method, byte_range=byte_range, size=size, timeout=timeout)
        if name == "read_replica":
            paths, length = args
            return read_replica(paths, length=length, timeout=timeout)
        return getattr(locator, name)(*args)
    return call


#: The refusals that name the version they were decided for: 412 (``If-Match``) and 416 (its length).
_NAMING_THE_VERSION = ("412", "416")


def _planned(request: FileRequest, location: Location, representation: Representation) -> Answer | FilePlan:
    """:func:`http.file_plan <mogile_middleware.http.file_plan>` for the version at ``location``."""
    assert location.length is not None
    return http.file_plan(request, location.etag, location.length, representation.headers(location))


def serve_steps(request: FileRequest, location: Location, representation: Representation, unanswered: ThrottledLog,
                asked_again: ThrottledLog, bodies: BodyCache | None) -> Steps[Any]:
    """Serve mode's decisions, for both middlewares (driven by :func:`~mogile_middleware.locate.run_steps`
    or ``arun_steps``): the replica open before anything is sent, and the trackers asked once more
    when its replicas are gone, or before a 412 or a 416 decided from the cached version. Returns
    a complete :class:`Answer` (a HEAD's too), or an :class:`OpenedFile`: the open replica, or
    instead of it the planned bytes of a file ``bodies`` keeps (read whole from a replica the
    first time). A replica that failed is not tried again: when the trackers name no other, the
    answer is a 502 at once, not after another storage timeout, told to ``unanswered`` (a node
    down fails every request for its files: one line per interval, not one per request); asking
    again is told to ``asked_again``, as often."""
    failed: set[str] = set()
    error: StorageError | None = None
    for attempt in range(2):
        if attempt:
            location = yield ("relocate", location)
        location = yield ("with_length_of", location)
        plan = _planned(request, location, representation)
        if not attempt and isinstance(plan, Answer) and plan.status[:3] in _NAMING_THE_VERSION:
            # Decided from a cached version: the trackers confirm it first. (Not a 304, as often
            # asked as a file is: one for up to path_cache_seconds after a change.)
            location = yield ("confirmed", location)
            plan = _planned(request, location, representation)
        if isinstance(plan, Answer):
            return plan
        paths = [path for path in location.paths if path not in failed]
        if not paths:
            break
        try:
            body = None
            if bodies is not None and bodies.keeps(location.etag, location.length):
                body = bodies.get(location.etag)
                if body is None and bodies.claim(location.etag):  # else read by another request: streamed
                    try:
                        body = yield ("read_replica", paths, location.length)
                    finally:
                        bodies.release(location.etag)
                    bodies.put(location.etag, body)
            if body is not None:
                if request.method == "HEAD":
                    return Answer(plan.status, plan.headers)
                if plan.byte_range is not None:
                    body = body[plan.byte_range[0]:plan.byte_range[1] + 1]
                return OpenedFile(location.key, plan, body, None)
            upstream = yield ("open_replica", paths, request.method, plan.byte_range, location.length)
        except StorageError as failure:
            failed.update(paths)
            error = failure
            if not attempt:  # the file may have been overwritten or deleted elsewhere, its old files gone
                asked_again.event(location.key, failure)
            continue
        if request.method == "HEAD":  # the file is there: that is all a HEAD asks
            upstream.close()
            return Answer(plan.status, plan.headers)
        same_bytes = names_a_fid(location.paths)
        return OpenedFile(location.key, plan, upstream,
                          Resumption(location.paths, plan.byte_range, location.length, same_bytes=same_bytes))
    if isinstance(error, OwnShortageError):
        raise error  # no node failed: the middleware's 503
    unanswered.event(location.key, error or "the trackers name none")
    return http.BAD_GATEWAY
