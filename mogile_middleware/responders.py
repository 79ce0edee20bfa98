"""The answers for a located key: serve the body, or let Perlbal or nginx fetch it (reproxy).

A :class:`Location` is what the path cache keeps for a key: its replica URLs in tracker order,
a strong ETag (MogileFS gives every overwrite a new fid, so the fid names a version), the
Content-Type, and the length when it was asked for. Each responder turns a request and a
:class:`Location` into a WSGI response; the reproxy ones build plain header lists, since they
sit on the hot path.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from webob import Response
from webob.byterange import Range
from webob.etag import ETagMatcher
from webob.exc import HTTPBadGateway

from .exceptions import StorageError
from .storage import CHUNK_SIZE, ReplicaResponse, open_replica

log = logging.getLogger("mogile_middleware")

StartResponse = Callable[..., Any]
Headers = list[tuple[str, str]]

_FID_PATH = re.compile(r"/0*(\d+)\.fid$")


@dataclass(frozen=True)
class Location:
    """Where a key's bytes are, and the headers that describe them."""

    key: str
    paths: tuple[str, ...]
    etag: str
    content_type: str
    length: int | None = None


def etag_for(paths: tuple[str, ...]) -> str:
    """A strong ETag naming this version of the file: its fid, read from a replica's path."""
    match = _FID_PATH.search(paths[0]) if paths else None
    if match:
        return f"fid-{match.group(1)}"
    # Paths not shaped like mogstored's: name the version by the set of its URLs.
    return "paths-" + hashlib.sha1(" ".join(sorted(paths)).encode()).hexdigest()[:16]


def not_modified(environ: dict[str, Any], etag: str) -> bool:
    """True if the request's ``If-None-Match`` (weak comparison, lists, ``*``) names ``etag``."""
    header = environ.get("HTTP_IF_NONE_MATCH")
    return bool(header) and etag in ETagMatcher.parse(header, strong=False)


def is_suffix_range(environ: dict[str, Any]) -> bool:
    """True for ``Range: bytes=-N``, which storage nodes answer wrongly (with the first N+1 bytes)."""
    value = environ.get("HTTP_RANGE", "")
    return value.replace(" ", "").lower().startswith("bytes=-")


def _parsable_range(header: str | None) -> bool:
    try:
        Range.parse(header)
    except ValueError:
        return False
    return True


def _not_modified_response(location: Location, extra: Headers, start_response: StartResponse) -> list[bytes]:
    start_response("304 Not Modified", [("ETag", f'"{location.etag}"'), *extra])
    return []


class PerlbalReproxy:
    """Perlbal reproxy: an empty 200 whose ``X-REPROXY-URL`` lists every replica, in order.

    Perlbal fetches the first URL that answers and passes the client this response's headers,
    without any ``X-REPROXY-*``; it passes on none of the storage node's validators, so ``304``
    is answered here. ``cache_for_seconds`` sends ``X-REPROXY-CACHE-FOR`` so that Perlbal answers
    repeated requests without asking the application at all.
    """

    def __init__(self, *, extra_headers: Headers, cache_for_seconds: int | None = None) -> None:
        self.extra_headers = extra_headers
        self.cache_for = f"{cache_for_seconds}; Content-Type ETag" if cache_for_seconds else None

    def headers(self, location: Location) -> Headers:
        """The response headers for ``location`` (built once per lookup, not per request)."""
        headers = [
            ("Content-Type", location.content_type),
            ("ETag", f'"{location.etag}"'),
            ("Content-Length", "0"),
            ("X-REPROXY-URL", " ".join(location.paths)),
            *self.extra_headers,
        ]
        if self.cache_for:
            headers.append(("X-REPROXY-CACHE-FOR", self.cache_for))
        return headers

    def __call__(self, environ: dict[str, Any], start_response: StartResponse, location: Location,
                 headers: Headers) -> list[bytes]:
        if not_modified(environ, location.etag):
            return _not_modified_response(location, self.extra_headers, start_response)
        if location.length is not None and "HTTP_RANGE" not in environ:
            headers = [*headers, ("X-REPROXY-EXPECTED-SIZE", str(location.length))]
        start_response("200 OK", list(headers))
        return []


class NginxReproxy:
    """nginx ``X-Accel-Redirect``: an internal location proxies to ``X-Reproxy-URL``.

    nginx takes one URL per header, so the replicas go in ``X-Reproxy-URL``, ``X-Reproxy-URL-2``,
    ... and the shipped ``examples/nginx.conf`` falls back from the first to the next on error.
    """

    def __init__(self, *, location: str = "/reproxy", extra_headers: Headers) -> None:
        self.location = location
        self.extra_headers = extra_headers

    def headers(self, location: Location) -> Headers:
        """The response headers for ``location`` (built once per lookup, not per request)."""
        urls = [("X-Reproxy-URL" if n == 1 else f"X-Reproxy-URL-{n}", url)
                for n, url in enumerate(location.paths, 1)]
        return [
            ("Content-Type", location.content_type),
            ("ETag", f'"{location.etag}"'),
            ("Content-Length", "0"),
            ("X-Accel-Redirect", self.location),
            *urls,
            *self.extra_headers,
        ]

    def __call__(self, environ: dict[str, Any], start_response: StartResponse, location: Location,
                 headers: Headers) -> list[bytes]:
        if not_modified(environ, location.etag):
            return _not_modified_response(location, self.extra_headers, start_response)
        start_response("200 OK", list(headers))
        return []


class ReplicaBody:
    """A WSGI body streamed from the first replica that answers; WebOb asks it for ranges.

    Nothing is fetched until the body is iterated (so HEAD and 304 cost no transfer). A range is
    sent to the storage node as an absolute ranged GET, never read and discarded. If no replica
    answers before the first byte, the response becomes a 502 (through ``start_response`` with
    ``exc_info``); a transfer cut midway raises, so the server closes the connection short of
    ``Content-Length`` instead of presenting a truncated file as complete.
    """

    def __init__(self, location: Location, start_response: StartResponse, *, timeout: float,
                 on_failure: Callable[[Location, Exception], None]) -> None:
        self.location = location
        self._start_response = start_response
        self._timeout = timeout
        self._on_failure = on_failure
        self._upstream: ReplicaResponse | None = None

    def _open(self, byte_range: tuple[int, int] | None) -> ReplicaResponse:
        self._upstream = open_replica(self.location.paths, byte_range=byte_range, timeout=self._timeout)
        expected = self.location.length if byte_range is None else byte_range[1] - byte_range[0] + 1
        if self._upstream.length != expected:
            self.close()
            raise StorageError(f"{self.location.key!r}: replica length {self._upstream.length}, expected {expected}")
        return self._upstream

    def __iter__(self) -> Iterator[bytes]:
        try:
            upstream = self._open(None)
        except StorageError as error:
            self._on_failure(self.location, error)
            body = b"Bad Gateway: no replica of this file answered\n"
            self._start_response("502 Bad Gateway", [("Content-Type", "text/plain"),
                                                     ("Content-Length", str(len(body)))], sys.exc_info())
            return iter([body])
        return self._stream(upstream)

    def app_iter_range(self, start: int, stop: int) -> Iterator[bytes]:
        """The bytes ``start`` to ``stop - 1``, fetched as a ranged GET (called before headers go out)."""
        return self._stream(self._open((start, stop - 1)))

    def _stream(self, upstream: ReplicaResponse) -> Iterator[bytes]:
        try:
            yield from upstream.iter_chunks(CHUNK_SIZE)
        except (OSError, StorageError) as error:
            log.error("transfer of %r from %s cut midway: %s", self.location.key, upstream.url, error)
            raise
        finally:
            upstream.close()

    def close(self) -> None:
        """Close the storage node connection (WSGI servers call this, also when the client left)."""
        if self._upstream is not None:
            self._upstream.close()


class Serve:
    """Serve mode: stream the body from a storage node, with HEAD, ranges and 304 done by WebOb."""

    def __init__(self, *, extra_headers: Headers, storage_timeout: float,
                 on_failure: Callable[[Location, Exception], None]) -> None:
        self.extra_headers = extra_headers
        self.storage_timeout = storage_timeout
        self.on_failure = on_failure

    def __call__(self, environ: dict[str, Any], start_response: StartResponse, location: Location) -> Any:
        if not_modified(environ, location.etag):  # WebOb would not match "If-None-Match: *"
            return _not_modified_response(location, self.extra_headers, start_response)
        if not _parsable_range(environ.get("HTTP_RANGE")):
            # An invalid Range is ignored (RFC 9110, 14.2); WebOb would raise on some ("bytes=-").
            environ = {name: value for name, value in environ.items() if name != "HTTP_RANGE"}
        body = ReplicaBody(location, start_response, timeout=self.storage_timeout, on_failure=self.on_failure)
        response = Response(
            app_iter=body,
            content_type=None,
            content_length=location.length,
            conditional_response=True,
            charset=None,
        )
        response.headers["Content-Type"] = location.content_type
        response.etag = location.etag
        response.accept_ranges = "bytes"
        response.headerlist.extend(self.extra_headers)
        try:
            return response.conditional_response_app(environ, start_response)
        except StorageError as error:  # a ranged GET is opened before the headers go out
            self.on_failure(location, error)
            return HTTPBadGateway("No replica of this file answered.")(environ, start_response)
