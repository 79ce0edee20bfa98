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

from collections.abc import Callable, Iterable
from functools import cached_property
from typing import Any

from . import metrics
from .client import Client
from .core import REPROXY_MODES, UNIX_SOCKET, MiddlewareCore, file_request, is_reproxy_header, parse_trusted_proxies
from .exceptions import MogileFSError
from .http import Answer
from .locate import Locator
from .responders import Serve, StreamedAnswer

__all__ = ["REPROXY_MODES", "UNIX_SOCKET", "MogileFSMiddleware", "WSGIApp", "parse_trusted_proxies"]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class MogileFSMiddleware(MiddlewareCore):
    """The WSGI middleware: serve or reproxy files under ``prefix``, pass the rest to ``app``."""

    client_class = Client
    locator_class = Locator

    @cached_property
    def serve(self) -> Serve:
        """Serve mode: the body streamed from a storage node."""
        return Serve(self.locator, self.representation, storage_timeout=self.storage_timeout)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(self.prefix):
            if self.allow_app_reproxy:
                return self.app(environ, start_response)
            return self.app(environ, _without_reproxy_headers(start_response))
        answer = self.answer(environ, path[len(self.prefix):])
        metrics.recorder.request(answer.reproxy or "serve", answer.status)
        if isinstance(answer, Answer):
            # A copy: answers are shared between requests, and a server may change the list it gets.
            start_response(answer.status, answer.headers.copy())
            return [answer.body] if answer.body else []
        try:
            start_response(answer.status, answer.headers)
        except BaseException:
            answer.body.close()
            raise
        return answer.body

    def answer(self, environ: dict[str, Any], path: str) -> Answer | StreamedAnswer:
        """The answer for the URL ``path`` after the prefix: decided, not yet started."""
        key = self.key_for(environ, path)
        if not isinstance(key, str):
            return key
        try:
            location = self.locator.locate(key)
            return self.reproxy_answer(environ, location) or self.serve.answer(file_request(environ), location)
        except MogileFSError as error:
            return self.error_answer(error, key)


def _without_reproxy_headers(start_response: StartResponse) -> StartResponse:
    """``start_response`` for the wrapped app, dropping the reproxy headers only we may send."""

    def filtered(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if any(is_reproxy_header(name) for name, _ in headers):
            headers = [(name, value) for name, value in headers if not is_reproxy_header(name)]
        return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

    return filtered
