"""Serving a key's file from a view: the header by which the wrapped application asks for it.

A view of any framework checks who asks, then answers with :func:`serve_header`; the middleware
that wraps the application (which marks each request it passes on with :data:`WRAPPED_BY`)
replaces that answer, and the view's other headers but its cookies, with the file's, as it
answers a request under its prefix, but ``Cache-Control: private`` and, when asked, as a download.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode

from .content import content_disposition
from .http import Headers
from .protocol import check_url_key

log = logging.getLogger("mogile_middleware")

#: Where a middleware marks the requests it passes to its application (the WSGI environ, the ASGI
#: scope while the application runs): an answer with :data:`SERVE_HEADER` will be turned into a file's.
WRAPPED_BY = "mogile_middleware.wrapped_by"
#: Where the first middleware that passes a request on puts a list (in the WSGI environ, or the
#: ASGI scope, which the copies other middlewares make of it share), marked by any middleware that
#: answers the request with reproxy headers: those are a middleware's own, which the middlewares
#: around it let through (two stacked for two prefixes), where an application's are dropped.
REPROXIED = "mogile_middleware.reproxied"
#: The header by which the wrapped application asks for a key's file (see :func:`serve_header`);
#: never sent on.
SERVE_HEADER = "X-Mogile-Middleware-Serve"
SERVE_HEADER_LOWER = SERVE_HEADER.lower()
#: What shows that a :data:`SERVE_HEADER` value was made by :func:`serve_header` in this process
#: (where the middleware runs), made anew at each start: an application that passes on the
#: headers of another server's answer (a proxying view) cannot be made to serve any key.
_PROOF = ""


def _new_proof() -> None:
    """Make :data:`_PROOF`: at import, and in a worker forked from a process that made one
    (gunicorn ``--preload``), its own."""
    global _PROOF
    _PROOF = secrets.token_urlsafe(16)


_new_proof()
os.register_at_fork(after_in_child=_new_proof)


def serve_header(key: str, filename: str | None = None) -> tuple[str, str]:
    """The header with which a view of the wrapped application has the middleware answer with
    ``key``'s file (a download named ``filename``, when given), after its own permission checks:
    as any request under the prefix is answered, but without ``authorize`` or a signature."""
    return SERVE_HEADER, urlencode({"key": check_url_key(key), **({"filename": filename} if filename else {}),
                                    "proof": _PROOF})


def served_file(value: str) -> tuple[str, str | None] | None:
    """The key and file name a :data:`SERVE_HEADER` value asks for; ``None`` for a value that
    :func:`serve_header` did not make in this process (copied from another server's answer)."""
    fields = dict(parse_qsl(value, keep_blank_values=True))
    if not hmac.compare_digest(fields.get("proof", "").encode(), _PROOF.encode()):
        log.warning("%s for %r not made by serve_header in this process, removed from the application's "
                    "answer (a view passing on another server's headers?)", SERVE_HEADER, fields.get("key", "")[:200])
        return None
    return fields.get("key", ""), fields.get("filename") or None


def view_headers(status: str, headers: Headers, filename: str | None, cookies: Sequence[str] = ()) -> Headers:
    """The headers of a file a view answered with: ``Cache-Control: private`` (the view checked
    who asked), no ``X-REPROXY-CACHE-FOR``, and ``Content-Disposition: attachment`` naming
    ``filename`` (RFC 6266) when given; an error answer's as they are, since they are not the
    file's. On any answer, the view's own ``cookies`` (``Set-Cookie`` values: a session it
    refreshed, a token it rotated)."""
    kept = headers
    if status[0] in "23":
        # Never X-REPROXY-CACHE-FOR: Perlbal would answer the next client itself, without the view.
        replaced = ("Cache-Control", "X-REPROXY-CACHE-FOR", *(("Content-Disposition",) if filename else ()))
        kept = [header for header in headers if header[0] not in replaced]
        kept.append(("Cache-Control", "private"))
        if filename:
            kept.append(("Content-Disposition", content_disposition("attachment", filename.replace("/", "_"))))
    return [*kept, *(("Set-Cookie", cookie) for cookie in cookies)] if cookies else kept


#: What a GET asks of a file and a request of another method does not (RFC 9110 13.1, 14.2): a
#: view answering a POST with a file sends it whole, without a 206, 304 or 412.
_GET_ONLY = frozenset(("HTTP_RANGE", "HTTP_IF_RANGE", "HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH",
                       "HTTP_IF_MODIFIED_SINCE", "HTTP_IF_UNMODIFIED_SINCE"))


#: In a view's request of another method that came with a ``Range``: its file is served, not
#: reproxied, since the proxy would send that ``Range`` on to the storage node.
NOT_REPROXIED = "mogile_middleware.not_reproxied"


#: In a view's request: its answer depends on who asks, which Perlbal's request of the fallback
#: URL does not tell (it sends ``Host`` and ``Range`` alone), so that answer names no fallback URL.
FOR_VIEW = "mogile_middleware.for_view"


def as_view_request(environ: Mapping[str, Any]) -> Mapping[str, Any]:
    """A view's request (marked :data:`FOR_VIEW`), of any method, asking for the file as a GET (or
    a HEAD) would: another method's ``Range`` and preconditions are not the file's, and it gets
    the file whole."""
    if environ.get("REQUEST_METHOD", "GET") in ("GET", "HEAD"):
        return {**environ, FOR_VIEW: True}
    request = {name: value for name, value in environ.items() if name not in _GET_ONLY}
    request["REQUEST_METHOD"] = "GET"
    request[FOR_VIEW] = True
    if "HTTP_RANGE" in environ:
        request[NOT_REPROXIED] = True
    return request
