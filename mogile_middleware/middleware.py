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
can reach the application directly. The options are :class:`~mogile_middleware.core.MiddlewareCore`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from typing import Any

from . import http, metrics
from .client import Client
from .core import (
    REPROXY_MODES,
    UNIX_SOCKET,
    MiddlewareCore,
    authorize_answer,
    is_internal_header,
    is_reproxy_header,
    mark_reproxied,
    parse_trusted_proxies,
    reproxy_marks,
)
from .exceptions import MogileFSError
from .http import Answer
from .locate import Locator
from .responders import Serve, StreamedAnswer
from .views import (
    SERVE_HEADER,
    SERVE_HEADER_LOWER,
    WRAPPED_BY,
    as_view_request,
    serve_header,
    served_file,
    view_headers,
)

__all__ = ["REPROXY_MODES", "UNIX_SOCKET", "MogileFSMiddleware", "WSGIApp", "parse_trusted_proxies"]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class MogileFSMiddleware(MiddlewareCore):
    """The WSGI middleware: serve or reproxy files under ``prefix``, pass the rest to ``app``."""

    client_class = Client
    locator_class = Locator
    client: Client

    @cached_property
    def serve(self) -> Serve:
        """Serve mode: the body streamed from a storage node."""
        return Serve(self.locator, self.representation, storage_timeout=self.storage_timeout,
                     unanswered=self.unanswered, asked_again=self.asked_again, bodies=self.bodies)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(self.path_prefix):
            return self._pass(environ, start_response)
        return self._send(self.answer(environ, path[len(self.path_prefix):]), start_response, environ)

    def answer(self, environ: dict[str, Any], path: str) -> Answer | StreamedAnswer:
        """The answer for the URL ``path`` after the prefix: decided, not yet started."""
        key = self.key_for(environ, path)
        if not isinstance(key, str):
            return key
        if self.authorize is not None and not _allows(self.authorize, environ, key):
            return http.FORBIDDEN
        return self.file_answer(environ, key)

    def file_answer(self, environ: dict[str, Any], key: str) -> Answer | StreamedAnswer:
        """The answer with ``key``'s file for this request: reproxied, served, 304, 206, or the error."""
        try:
            location = self.locator.locate(key)
            return self.reproxy_answer(environ, location) or self.serve.answer(self.request_of(environ), location)
        except MogileFSError as error:
            return self.error_answer(error, key)

    def respond_with(self, environ: dict[str, Any], start_response: StartResponse, key: str, *,
                     filename: str | None = None) -> Iterable[bytes]:
        """Answer a WSGI request with ``key``'s file, as under the prefix (reproxied for a trusted
        proxy, else served, with HEAD, ranges and 304), after the caller's own permission checks;
        ``filename`` makes it a download of that name. In an application this middleware wraps, the
        answer is the middleware's (see :func:`~mogile_middleware.views.serve_header`)."""
        name, value = serve_header(key, filename)
        if environ.get(WRAPPED_BY) is self:
            start_response("200 OK", [(name, value)])
            return []
        return self._send(self._file_answer_for_view(environ, served_file(value)), start_response,  # type: ignore[arg-type]
                          environ)

    def _file_answer_for_view(self, environ: dict[str, Any], served: tuple[str, str | None],
                              cookies: list[str] | None = None) -> Answer | StreamedAnswer:
        key, filename = served
        answer = self.file_answer(as_view_request(environ), key)  # type: ignore[arg-type]
        return dataclasses.replace(answer, headers=view_headers(answer.status, answer.headers, filename, cookies or ()))

    def _send(self, answer: Answer | StreamedAnswer, start_response: StartResponse,
              environ: dict[str, Any]) -> Iterable[bytes]:
        metrics.recorder.request(answer.reproxy or "serve", answer.status)
        if answer.reproxy:
            mark_reproxied(environ)
        if isinstance(answer, Answer):
            # A copy: answers are shared between requests, and a server may change the list it gets.
            start_response(answer.status, answer.headers.copy())
            # HEAD: a GET's headers, no body (a reproxy answer has none to begin with).
            return [answer.body] if answer.body and environ.get("REQUEST_METHOD") != "HEAD" else []
        try:
            start_response(answer.status, answer.headers)
        except BaseException:
            answer.body.close()
            raise
        return answer.body

    def _pass(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """The application's answer, without the reproxy headers only the middleware may send; or,
        when it answered with :data:`~mogile_middleware.views.SERVE_HEADER`, the file it asks for."""
        environ[WRAPPED_BY] = self
        reproxied = reproxy_marks(environ)
        asked: list[tuple[str, str | None]] = []
        cookies: list[str] = []
        started = given = False  # the application called start_response; the server's was called

        def filtered(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal started, given
            # A call again, with exc_info, replaces the answer before (PEP 3333): the file asked for too.
            asked.clear()
            cookies.clear()
            if any(is_internal_header(name) for name, _ in headers):
                asked.extend(filter(None, (served_file(value) for name, value in headers
                                           if name.lower() == SERVE_HEADER_LOWER)))
                if asked:
                    cookies.extend(value for name, value in headers if name.lower() == "set-cookie")
                    if body_returned:
                        raise RuntimeError(f"{SERVE_HEADER} must be sent before the application returns its body")
                    if given:  # gunicorn adds the headers of an answer replacing one it holds to that one's
                        raise RuntimeError(f"{SERVE_HEADER} must come in the application's first start_response, "
                                           "not replace an answer the server was given")
                    started = True
                    return _discard
                headers = [(name, value) for name, value in headers if name.lower() != SERVE_HEADER_LOWER
                           and (self.allow_app_reproxy or reproxied or not is_reproxy_header(name))]
            started = given = True
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        body_returned = False
        body = self.app(environ, filtered)
        if not started:  # PEP 3333: an application may start its answer on its body's first iteration
            body = _ReadAhead(body)
        body_returned = True
        if not asked:
            return body
        if hasattr(body, "close"):
            body.close()
        return self._send(self._file_answer_for_view(environ, asked[0], cookies), start_response, environ)


def _allows(authorize: Callable[[dict[str, Any], str], Any], environ: dict[str, Any], key: str) -> bool:
    """``authorize(environ, key)`` (see :func:`~mogile_middleware.core.authorize_answer`)."""
    return authorize_answer(authorize(environ, key), "WSGI")


class _ReadAhead:
    """An application's body with its first piece read at once, then the rest as it comes: what
    the application answers is known before the server is given the body."""

    def __init__(self, body: Iterable[bytes]) -> None:
        self._body = body
        try:
            self._rest = iter(body)
            self._first = [next(self._rest)]
        except StopIteration:
            self._first = []
        except BaseException:
            self.close()  # PEP 3333: whatever happened
            raise

    def __iter__(self) -> Iterator[bytes]:
        yield from self._first
        yield from self._rest

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()


def _discard(data: bytes) -> None:
    """The ``write`` of an answer that is replaced by the file's."""
