"""MogileFSMiddleware for ASGI: the WSGI middleware's options and answers, natively async.

Example (Starlette, FastAPI)::

    from mogile_middleware.asgi import MogileFSMiddleware

    app.add_middleware(MogileFSMiddleware, domain="media", trackers=["10.0.0.1:7001"],
                       reproxy="nginx", trusted_proxies=["10.0.0.2"])

or around any ASGI application: ``application = MogileFSMiddleware(application, domain=...)``.
Every decision is :class:`~mogile_middleware.core.MiddlewareCore`'s, as in WSGI; the trackers
are asked through an :class:`~mogile_middleware.async_client.AsyncClient`, and bodies stream
from storage nodes at the client's pace (each chunk is sent before the next is read). A client
that goes away, or a cancelled task, closes the storage node's connection. Everything that is
not an HTTP request under the prefix (``lifespan``, ``websocket``, other paths) goes to the
wrapped application untouched, except that its responses may not carry reproxy headers, and
that the lifespan's shutdown closes the client's idle connections before the server hears of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import re
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from functools import cached_property, partial
from typing import Any
from urllib.parse import unquote_to_bytes

from . import http, metrics
from .cache import evict_oldest
from .async_client import AsyncClient
from .async_storage import AsyncResumedReplica, open_replica, read_replica
from .core import (
    MiddlewareCore,
    authorize_answer,
    is_internal_header,
    is_reproxy_header,
    mark_reproxied,
    reproxy_marks,
)
from .exceptions import MogileFSError, StorageError
from .http import Answer, FileRequest, Headers
from .locate import AsyncLocator, Location, arun_steps
from .responders import serve_step_caller, serve_steps
from .views import (
    REPROXIED,
    SERVE_HEADER_LOWER,
    WRAPPED_BY,
    as_view_request,
    serve_header,
    served_file,
    view_headers,
)

log = logging.getLogger("mogile_middleware")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: What a server running another event loop than asyncio's (trio) is told, at startup or per request.
ASYNCIO_NEEDED = "mogile_middleware.asgi needs asyncio's event loop (or uvloop), not trio's"
#: The request headers the shared decisions read, by their ASGI name, as CGI names them.
_READ_HEADERS = {name.encode(): "HTTP_" + name.upper().replace("-", "_") for name in (
    "range", "if-range", "if-match", "if-none-match", "x-proxy-capabilities", "x-sendfile-type", "x-reproxy-failed",
    "x-forwarded-for")}
#: Each read header's name, as one object for every request that has it (kept answers hold it).
_READ_NAMES = {name: name for name in _READ_HEADERS}
#: The request headers of which only the presence decides (whether a request is a proxy's
#: fallback): a warm answer is kept whatever their value, which a proxy's X-Forwarded-For varies by client.
_PRESENCE_ONLY = frozenset((b"x-forwarded-for", b"x-reproxy-failed"))
#: An answer made for one request: status, headers, the open replica its body comes from or the
#: body itself (a file the body cache keeps; empty for HEAD), and the key (for the log).
Streamed = tuple[str, Headers, AsyncResumedReplica | bytes, str]
_SERVE = SERVE_HEADER_LOWER.encode("latin-1")
#: The status of a request whose client went away before its answer: nginx's "client closed request".
_CLIENT_GONE = 499
#: The scheme and authority of an absolute-form target (``GET http://host/path``), which a server
#: must accept (RFC 9112, 3.2.2) and daphne and hypercorn pass on as the path.
_ABSOLUTE_FORM = re.compile(r"\A[A-Za-z][A-Za-z0-9+.-]*://[^/]*")


class MogileFSMiddleware(MiddlewareCore):
    """The ASGI 3 middleware: serve or reproxy files under ``prefix``, pass the rest to ``app``."""

    client_class = AsyncClient
    locator_class = AsyncLocator
    client: AsyncClient
    awaits_authorize = True

    @cached_property
    def _encoded_answers(self) -> _EncodedAnswers:
        return _EncodedAnswers()

    @cached_property
    def _warm_answers(self) -> _WarmAnswers:
        return _WarmAnswers()

    @cached_property
    def _answers_repeat(self) -> bool:
        """True if a request's answer is decided by the request and the location alone: no
        signature that expires, no ``authorize`` or ``key_for_path`` of the application's."""
        return self.signer is None and self.authorize is None and self.key_for_path is None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan, websocket: nothing of the middleware's
            if scope["type"] == "lifespan":
                await self.app(scope, receive, self._closing_at_shutdown(send))
                return
            if scope["type"] == "websocket":
                send = _internal_headers_filtered(send, self.allow_app_reproxy)
            await self.app(scope, receive, send)
            return
        raw_path = scope.get("raw_path")
        variants = self._warm_answers.variants(raw_path)  # None for paths the app answers
        inputs = None
        if variants is not None:
            inputs = _inputs(scope)
            kept = variants.get(inputs)
            if kept is not None and kept.holds():  # sent here: no coroutine, nothing decided anew
                metrics.recorder.request(kept.mode, kept.status_line)
                if REPROXIED in scope and kept.mode != "serve":
                    mark_reproxied(scope)
                await send({"type": "http.response.start", "status": kept.status, "headers": kept.headers.copy()})
                await send({"type": "http.response.body", "body": kept.body})
                return
        path = _path_info(scope)
        if not path.startswith(self.path_prefix):
            await self._pass(scope, receive, send)
            return
        environ = _environ(scope, path)
        key = self.key_for(environ, path[len(self.path_prefix):])
        watch = _Watch(receive, scope)
        try:
            if not isinstance(key, str):
                answer: Answer | Streamed | None = key
            elif self.authorize is not None and not await _allows(self.authorize, scope, key):
                answer = http.FORBIDDEN
            else:
                # A warm reproxy answer needs nothing awaited: decided here, without a coroutine of its own.
                location = self.locator.cached(key)
                warm = None if location is None else self.reproxy_answer(environ, location)
                if warm is not None and raw_path and self._answers_repeat:
                    self._keep(raw_path, inputs or _inputs(scope), warm, location)  # type: ignore[arg-type]
                answer = warm or await _unless_gone(self._answer(environ, key, location), watch)
                if answer is None:  # the client went away meanwhile: its lookup and its replica were given up
                    await _answer_gone(send)
                    return
            await self._send(answer, send, watch, scope)
        finally:
            await watch.end()

    def _closing_at_shutdown(self, send: Send) -> Send:
        """``send`` for the application's lifespan: once it has shut down, the event loop's idle
        tracker and storage node connections are closed before the server hears it (they stayed
        open until the process ended, or the next loop's first request, with a ResourceWarning
        each under ``python -X dev`` and a test client's lifespan). A startup on another event
        loop than asyncio's (trio) fails, naming the need, before any request."""
        failed = False

        async def sent(message: Message) -> None:
            nonlocal failed
            if failed:  # the application's own report of the error raised below: the server knows
                return
            if message["type"] == "lifespan.startup.complete" and _running_loop() is None:
                failed = True
                await send({"type": "lifespan.startup.failed", "message": ASYNCIO_NEEDED})
                # Raised into the application, whose lifespan then ends, as a server told of a
                # failed startup awaits (Starlette's test client waited for ever).
                raise RuntimeError(ASYNCIO_NEEDED)
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                try:
                    await self.client.aclose()
                finally:
                    await send(message)
            else:
                await send(message)
        return sent

    def _keep(self, raw_path: bytes, inputs: tuple[Any, ...], answer: Answer, location: Location) -> None:
        """Keep ``answer``, decided from ``location``, for the same request while the path cache holds it."""
        holds = self.locator.holding(location)
        if holds is not None:
            status, headers = self._encoded_answers.start(answer)
            body = b"" if inputs[0] == "HEAD" else answer.body  # a GET's headers, no body
            warm = _WarmAnswer(holds, answer.reproxy or "serve", answer.status, status, headers, body)
            self._warm_answers.keep(raw_path, inputs, warm)

    async def respond_with(self, scope: Scope, receive: Receive, send: Send, key: str, *,
                           filename: str | None = None) -> None:
        """Answer an ASGI request with ``key``'s file, as under the prefix, after the caller's own
        permission checks; ``filename`` makes it a download of that name. In an application this
        middleware wraps, the answer is the middleware's (see :func:`~mogile_middleware.views.serve_header`)."""
        name, value = serve_header(key, filename)
        if scope.get(WRAPPED_BY) is self:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1"))]})
            await send({"type": "http.response.body", "body": b""})
            return
        watch = _Watch(receive, scope)
        try:
            await self._send_for_view(scope, send, served_file(value), watch)  # type: ignore[arg-type]
        finally:
            await watch.end()

    async def _send_for_view(self, scope: Scope, send: Send, served: tuple[str, str | None], watch: _Watch,
                             cookies: list[str] | None = None) -> None:
        """Send the file a view asked for, unless its client goes away (as ``watch`` sees it) while
        it is looked up or opened."""
        answer = await _unless_gone(self._file_answer_for_view(scope, served, cookies), watch)
        if answer is None:
            await _answer_gone(send)
        else:
            await self._send(answer, send, watch, scope, recurring=False)

    async def _file_answer_for_view(self, scope: Scope, served: tuple[str, str | None],
                                    cookies: list[str] | None = None) -> Answer | Streamed:
        key, filename = served
        environ = as_view_request(_environ(scope, _path_info(scope)))
        answer = await self._answer(environ, key, self.locator.cached(key))  # type: ignore[arg-type]
        if isinstance(answer, Answer):
            headers = view_headers(answer.status, answer.headers, filename, cookies or ())
            # An error answer without the view's cookies is the shared one, as it is.
            return answer if headers is answer.headers else dataclasses.replace(answer, headers=headers)
        status, headers, upstream, key = answer
        return status, view_headers(status, headers, filename, cookies or ()), upstream, key

    async def _send(self, answer: Answer | Streamed, send: Send, watch: _Watch, scope: Scope, *,
                    recurring: bool = True) -> None:
        """Send ``answer``. The encoded form of a ``recurring`` one is kept for the next time; not
        that of a view's, made for one request (with its user's cookies)."""
        if isinstance(answer, Answer):
            metrics.recorder.request(answer.reproxy or "serve", answer.status)
            if answer.reproxy:
                mark_reproxied(scope)
            if recurring:
                status, headers = self._encoded_answers.start(answer)
                headers = headers.copy()  # a server may change the list it gets, and the encoded list is kept
            else:
                status, headers = _start_of(answer)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            # HEAD: a GET's headers, no body (a reproxy answer has none to begin with).
            body = answer.body and (b"" if scope["method"] == "HEAD" else answer.body)
            await send({"type": "http.response.body", "body": body})
            return
        status, headers, upstream, key = answer
        metrics.recorder.request("serve", status)
        start = {"type": "http.response.start", "status": int(status[:3]), "headers": _encoded(headers)}
        if isinstance(upstream, bytes):
            await send(start)
            await send({"type": "http.response.body", "body": upstream})
            if upstream:
                metrics.recorder.bytes_served(len(upstream))  # handed to the server whole
            return
        try:
            try:
                await send(start)
            except (OSError, RuntimeError):  # the client has gone, as :func:`_send_body` reads it
                return
            await _stream(key, upstream, send, watch, self.client_timeout)
        finally:
            await upstream.aclose()

    async def _pass(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The application's answer, without the reproxy headers only the middleware may send; or,
        when it answered with :data:`~mogile_middleware.views.SERVE_HEADER`, the file it asks for,
        sent from when its answer ends, beside what it does after (Starlette's background tasks,
        Django's ``request_finished``), and whole before an error it raises then. The application
        gets the server's scope, marked as this middleware's while it runs: what it writes there (a
        router's ``route``, ``state``) reaches the middlewares outside."""
        asked: list[tuple[str, str | None]] = []
        cookies: list[str] = []
        transfer: asyncio.Future[None] | None = None
        reproxied = reproxy_marks(scope)
        shared = _SharedReceive(receive)
        watch: _Watch | None = None  # of the file's transfer; it watches on while the application runs

        async def filtered(message: Message) -> None:
            nonlocal transfer, watch
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                if not isinstance(headers, (list, tuple)):  # any iterable of pairs: read once
                    message = {**message, "headers": (headers := list(headers))}
                if any(is_internal_header(name.decode("latin-1")) for name, _ in headers):
                    asked.extend(filter(None, (served_file(value.decode("latin-1")) for name, value in headers
                                               if name.lower() == _SERVE)))
                    if asked:
                        cookies.extend(value.decode("latin-1") for name, value in headers
                                       if name.lower() == b"set-cookie")
                        return
                    message = _internal_headers_removed(message, keep_reproxy=self.allow_app_reproxy or bool(reproxied))
            elif asked:  # the body of the answer the file replaces
                if transfer is None and message["type"] == "http.response.body" and not message.get("more_body"):
                    watch = _Watch(shared.for_watch, scope)
                    transfer = asyncio.ensure_future(self._send_for_view(scope, send, asked[0], watch, cookies))
                return
            await send(message)

        outer = scope.get(WRAPPED_BY)  # a middleware of this package around this one
        scope[WRAPPED_BY] = self
        try:
            try:
                await self.app(scope, shared.for_app, filtered)
            except BaseException as error:
                if transfer is not None:
                    if isinstance(error, asyncio.CancelledError):
                        transfer.cancel()
                    try:
                        await asyncio.wait({transfer})  # the file sent (or cut) before the application's error
                    except asyncio.CancelledError:  # this request's own: it ends the transfer too
                        transfer.cancel()
                        raise
                    if not transfer.cancelled():
                        transfer.exception()  # taken: the application's error is the one raised
                raise
            finally:
                if outer is None:
                    scope.pop(WRAPPED_BY, None)
                else:
                    scope[WRAPPED_BY] = outer
            if transfer is not None:
                await transfer
            elif asked:  # an answer that never ended
                watch = _Watch(shared.for_watch, scope)
                await self._send_for_view(scope, send, asked[0], watch, cookies)
        finally:
            if watch is not None:
                await watch.end()

    async def _answer(self, environ: dict[str, Any], key: str, location: Location | None) -> Answer | Streamed:
        """The answer for ``key`` (at ``location`` when the cache held it): decided, with its replica open."""
        try:
            location = location or await self.locator.locate(key)
            return self.reproxy_answer(environ, location) or await self._serve(self.request_of(environ), location)
        except MogileFSError as error:
            return self.error_answer(error, key)

    async def _serve(self, request: FileRequest, location: Location) -> Answer | Streamed:
        """Serve mode: :func:`~mogile_middleware.responders.serve_steps`, awaited."""
        steps = serve_steps(request, location, self.representation, self.unanswered, self.asked_again, self.bodies)
        opened = await arun_steps(steps, self._serve_step)
        if isinstance(opened, Answer):
            return opened
        body = opened.body if opened.resumption is None else \
            AsyncResumedReplica(opened.body, opened.resumption, timeout=self.storage_timeout)
        return opened.plan.status, opened.plan.headers, body, opened.key

    @cached_property
    def _serve_step(self) -> Callable[..., Awaitable[Any]]:
        """What carries out serve mode's steps, awaited."""
        return serve_step_caller(self.locator, open_replica, read_replica, self.storage_timeout)


async def _stream(key: str, upstream: AsyncResumedReplica, send: Send, watch: _Watch,
                  client_timeout: float) -> None:
    """Send the body of ``key`` chunk by chunk until it ends, the client is gone (raising what
    ``receive`` raised instead, if it did), or ``client_timeout`` passes without a piece read or
    sent (a client that stopped taking them would hold the storage connection for as long as it
    keeps its own open)."""
    progress = _Progress(asyncio.get_running_loop().time)
    sending = asyncio.ensure_future(_send_body(key, upstream, send, progress))
    try:
        while (idle := progress.clock() - progress.at) < client_timeout:
            done, _ = await asyncio.wait({sending, watch.gone}, timeout=client_timeout - idle,
                                         return_when=asyncio.FIRST_COMPLETED)
            if done:
                break
        else:
            log.warning("transfer of %r ended: nothing read or sent for %g s (a client taking nothing)",
                        key, client_timeout)
    finally:
        if not sending.done():
            sending.cancel()  # the client left, or stopped reading: stop reading the node
    await asyncio.gather(sending, return_exceptions=True)
    if sending.done() and not sending.cancelled() and sending.exception() is not None:
        raise sending.exception()  # type: ignore[misc] # a transfer cut midway: the server closes short
    if sending.cancelled():
        watch.raise_what_receive_raised()


class _Progress:
    """When a piece of a body was last read or sent, by ``clock``."""

    __slots__ = ("clock", "at")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.at = clock()

    def made(self) -> None:
        self.at = self.clock()


async def _send_body(key: str, upstream: AsyncResumedReplica, send: Send, progress: _Progress) -> None:
    sent = 0
    sending = False  # whether an error comes from send (the client's side) or the node
    try:
        async for chunk in upstream.chunks():
            progress.made()
            sending = True
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sending = False
            progress.made()
            sent += len(chunk)
        sending = True
        await send({"type": "http.response.body", "body": b""})
    except Exception as error:
        # The server's word that the client has gone: an OSError (ASGI 2.4), or uvloop's RuntimeError
        # of a closed transport (uvicorn's httptools protocol with a request pipelined behind).
        if sending and isinstance(error, (OSError, RuntimeError)):
            return
        if isinstance(error, (OSError, StorageError)):
            log.error("transfer of %r from %r cut midway: %r", key, upstream.url, error)
        raise
    finally:
        metrics.recorder.bytes_served(sent)


async def _unless_gone(answering: Awaitable[Answer | Streamed], watch: _Watch) -> Answer | Streamed | None:
    """``answering``'s answer, or ``None`` once the client has gone (``http.disconnect``; what
    ``receive`` raised instead, if it did, is raised), even if the answer is ready too: its
    lookup and the replica it opens are then given up, rather than go on for nobody, holding the
    loop's tracker connections from the clients still there. When the request's own task is
    cancelled meanwhile, a replica opened for the answer nobody takes is closed. A client that
    waits for a ``100 Continue`` is not watched until the answer starts (see
    :attr:`_Watch.from_the_start`)."""
    if not watch.from_the_start:
        return await answering
    work = asyncio.ensure_future(answering)
    try:
        await asyncio.wait({work, watch.gone}, return_when=asyncio.FIRST_COMPLETED)
        if not watch.gone.done():
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        watch.raise_what_receive_raised()
    except BaseException:
        work.cancel()
        work.add_done_callback(_close_unclaimed)
        raise
    _close_unclaimed(work)
    return None


async def _answer_gone(send: Send) -> None:
    """Answer a request whose client went away before its answer with nginx's 499, "client
    closed request", which nobody reads (a server drops it, or raises): a middleware in front that
    waits for an answer (Starlette's ``BaseHTTPMiddleware``) gets one, rather than raise "No
    response returned" into the server's log."""
    try:
        await send({"type": "http.response.start", "status": _CLIENT_GONE, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    except (OSError, RuntimeError):  # the server's word that the client has gone, as _send_body reads it
        pass


def _close_unclaimed(work: asyncio.Future[Answer | Streamed]) -> None:
    """Close the replica that ``work``'s answer holds open, if any: nobody will send it."""
    if not work.cancelled() and work.exception() is None:
        answer = work.result()
        if isinstance(answer, tuple) and isinstance(answer[2], AsyncResumedReplica):
            answer[2].close()


class _SharedReceive:
    """The server's ``receive``, read by an application and, once its view answered with a file, by
    the middleware's watch of that file's transfer, which watches on while the application runs:
    the request's messages go to the application alone, in order, and a disconnect, which
    hypercorn and daphne tell once, to both and to every later call (Django 5's handler listens
    for it beside the view; an application's task may read to it after the answer). The watch
    reads only while the application does not; an application reading meanwhile waits for what
    the watch's read brings, and takes it before the watch reads on. Otherwise the watch keeps
    two messages for the application: past those, the rest of the body is lost, and the
    application's later reads are told of a disconnect, not given a body with a hole. What
    ``receive`` raises to the watch (a body limit in front) is raised to every later call too.
    Past the body, a ``receive`` that answers at once with anything but a disconnect tells
    nothing, and the watch asks it no more (asked in a loop, it would never let the event loop
    run anything else)."""

    __slots__ = ("_receive", "_app_reads", "_app_waits", "_watch_reads", "_kept", "_lost", "_error", "_body_read",
                 "_quiet", "_last", "_changed")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._app_reads = 0  # the application's reads in flight
        self._app_waits = 0  # its calls waiting for the watch's read
        self._watch_reads = False  # whether the watch's read is in flight
        self._kept: list[Message] = []  # what the watch read, for the application
        self._lost = False  # whether the watch dropped a message the application did not take
        self._error: BaseException | None = None  # what receive raised to the watch, for every later call
        self._body_read = False  # whether the request's body has come to its end
        self._quiet = False  # whether the watch reads no more
        self._last: Message | None = None  # the disconnect, for every call from then on
        self._changed: asyncio.Future[None] | None = None  # the wake-up of those waiting

    async def for_app(self) -> Message:
        """The next message of the request, for the application."""
        while True:
            if self._kept:
                self._change()
                return self._kept.pop(0)
            if self._error is not None:
                raise self._error
            if self._lost:
                return {"type": "http.disconnect"}
            if self._last is not None:
                return dict(self._last)
            if not self._watch_reads:
                break
            self._app_waits += 1
            try:
                await self._wait()
            finally:
                self._app_waits -= 1
                self._change()
        self._app_reads += 1
        try:
            message = await self._receive()
        finally:
            self._app_reads -= 1
            self._change()
        self._read(message)
        return message

    async def for_watch(self) -> Message:
        """The disconnect, once told, or what ``receive`` raised: never a message of the request's."""
        while True:
            if self._error is not None:
                raise self._error
            if self._last is not None:
                return dict(self._last)
            if self._app_reads or self._quiet or (self._kept and self._app_waits):
                await self._wait()
                continue
            past_body = self._body_read
            self._watch_reads = True
            try:
                message = await self._receive()
            except asyncio.CancelledError:
                raise
            except BaseException as error:
                self._error = error
                raise
            finally:
                self._watch_reads = False
                self._change()
            self._read(message)
            if self._last is not None:
                return message
            if self._lost or len(self._kept) == 2:
                self._kept, self._lost = [], True
            else:
                self._kept.append(message)
            self._quiet = past_body

    def _read(self, message: Message) -> None:
        if message["type"] == "http.disconnect":
            self._last = message
        elif not message.get("more_body", False):
            self._body_read = True

    def _change(self) -> None:
        """Have those waiting look again."""
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    async def _wait(self) -> None:
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._changed)  # one waiter cancelled leaves it to the others


class _Watch:
    """A request's one watch for its client going away, from the lookup to the body's last byte.
    A second would miss a disconnect a server tells once (hypercorn), and under granian a
    ``receive`` cancelled midway makes the next one tell of a disconnect for a client still there."""

    __slots__ = ("_loop", "_receive", "_gone", "from_the_start")

    def __init__(self, receive: Receive, scope: Scope) -> None:
        loop = _running_loop()
        if loop is None:  # before any coroutine of the request's is made, never to be awaited
            raise RuntimeError(ASYNCIO_NEEDED)
        self._loop = loop
        self._receive = receive
        self._gone: asyncio.Future[None] | None = None
        #: Whether the client may be watched before the answer starts: not one that sent
        #: ``Expect`` (``100-continue``), since uvicorn answers the first ``receive`` with a
        #: ``100 Continue``, even to an HTTP/1.0 request, and Perlbal takes that for the answer.
        self.from_the_start = not any(name == b"expect" for name, _ in scope.get("headers", ()))

    @property
    def gone(self) -> asyncio.Future[None]:
        """Done once the client has gone: the watch starts when first asked."""
        if self._gone is None:
            self._gone = self._loop.create_task(_disconnected(self._receive))
        return self._gone

    def raise_what_receive_raised(self) -> None:
        """Raise what ``receive`` raised while watched, if it did: not a client going away but an
        error of a middleware in front, its own to answer (a body limit's, a 413, before the answer starts)."""
        gone = self._gone
        if gone is not None and gone.done() and not gone.cancelled() and gone.exception() is not None:
            raise gone.exception()  # type: ignore[misc]

    async def end(self) -> None:
        """Stop watching: the request is answered."""
        if self._gone is not None:
            self._gone.cancel()
            await asyncio.gather(self._gone, return_exceptions=True)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio event loop running this task, or ``None`` under another (trio's)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (``http.disconnect``). Past the request's body ASGI has
    ``receive`` wait for that; one that answers again at once can tell nothing, and is not asked
    again (asked in a loop, it would never let the event loop run anything else)."""
    message = await receive()
    while message.get("more_body", False):  # the rest of the request's body
        message = await receive()
    if message["type"] != "http.disconnect" and (await receive())["type"] != "http.disconnect":
        await asyncio.get_running_loop().create_future()  # never done: cancelled with the request


def _path_info(scope: Scope) -> str:
    """The path as WSGI's ``PATH_INFO`` has it (percent-decoded bytes as latin-1), below
    ``root_path``: the raw path's bytes, unless a middleware in front rewrote ``path``."""
    raw = scope.get("raw_path")
    given = _as_wsgi(scope["path"])
    root = _as_wsgi(scope.get("root_path", ""))
    if raw:
        target = raw.decode("latin-1")  # then searched as text: faster than bytes for short paths
        path = _unquoted(target.partition("#")[0].partition("?")[0])  # a fragment, which some servers keep
        if path != given and not _names_alike(target, path, given, root):
            path = given  # rewritten by a middleware in front, which changes the path, never the raw path
    else:
        path = given  # a "#" in it is a decoded %23, part of the key, as in WSGI's PATH_INFO
    if not path.startswith("/"):
        path = _ABSOLUTE_FORM.sub("", path, 1)
    below = _below(path, root)
    if below is None and "app_root_path" in scope:  # without the server's root path: a mount point's
        below = _below(path, _as_wsgi(_mount_point(scope)))
    return path if below is None else below


def _below(path: str, root: str) -> str | None:
    """``path`` less the mount point ``root`` (``""``: all of it), or ``None`` if it does not start
    with it as Starlette's routing reads it: followed by a ``/`` (``/m`` does not start ``/mogilefs/``)."""
    if path.startswith(root) and (not root or path[len(root):len(root) + 1] in ("", "/")):
        return path[len(root):]
    return None


def _mount_point(scope: Scope) -> str:
    """The part of ``root_path`` that a request names again to reach the middleware (as
    ``SCRIPT_NAME`` under a WSGI server; Perlbal's fallback request does): the mount point of
    Starlette's ``Mount``, which keeps the server's root path as ``app_root_path``, but not the
    server's own root path, which uvicorn adds to every path it receives (hypercorn and daphne
    take paths with or without it). Under another router, whose mount point is not told apart, the
    middleware is taken as wrapping the whole application."""
    root = scope.get("root_path", "")
    server_root = scope.get("app_root_path", root)
    return root[len(server_root):] if root.startswith(server_root) else root


def _names_alike(target: str, path: str, given: str, root: str) -> bool:
    """True if the server's ``path`` (``given``) names what the raw request ``target`` does (its
    ``path`` decoded), as servers and routers make it: with the fragment (h11, daphne), without
    the mount point (Starlette before 0.33), or with replacement characters for bytes that are
    not UTF-8 (then only the raw bytes say what was asked). Else a middleware rewrote it."""
    whole = _unquoted(target.partition("?")[0])  # with a fragment
    if not _is_utf8(whole):  # as the server could give it
        whole, path = _replaced(whole), _replaced(path)
    if given == whole:
        return True
    return bool(root) and path.startswith(root) and path[len(root):] == given


def _replaced(path: str) -> str:
    """A WSGI path whose bytes are not all UTF-8 as a server gives it in ``path`` (in WSGI form):
    each byte that is not with U+FFFD, the replacement character."""
    return _as_wsgi(path.encode("latin-1").decode("utf-8", "replace"))


def _unquoted(path: str) -> str:
    """A WSGI path with its percent-escapes decoded (bytes as latin-1)."""
    return unquote_to_bytes(path.encode("latin-1")).decode("latin-1") if "%" in path else path


def _is_utf8(path: str) -> bool:
    """True if the bytes of a WSGI path (as latin-1) are UTF-8: else the server could only give
    ``path`` with replacement characters, and the raw bytes are what the request named."""
    try:
        path.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _as_wsgi(text: str) -> str:
    """An ASGI path's characters as WSGI gives them: their UTF-8 bytes as latin-1 (a mount point
    beyond ASCII, ``/médias``, then matches the raw path's bytes)."""
    return text if text.isascii() else text.encode("utf-8", "surrogateescape").decode("latin-1")


def _environ(scope: Scope, path: str) -> dict[str, Any]:
    """The request as the CGI names the shared decisions read: only the headers they read, repeated
    ones joined as WSGI servers do."""
    query = scope.get("query_string")
    if query and _kept_a_fragment(scope):
        query = b""  # h11 and daphne cut "/a#x?q" at the "?": a "?" after the "#" is the fragment's (RFC 3986, 3.5)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": _as_wsgi(_mount_point(scope)),
        "PATH_INFO": path,
        "QUERY_STRING": query.split(b"#", 1)[0].decode("latin-1") if query else "",
        "REMOTE_ADDR": (scope.get("client") or ("",))[0],
    }
    repeated: dict[str, list[str]] = {}  # joined once: a client may repeat a header thousands of times
    for name, value in scope.get("headers", ()):
        key = _READ_HEADERS.get(name.lower())
        if key is not None:
            text = value.decode("latin-1")
            if key in environ:
                repeated.setdefault(key, [environ[key]]).append(text)
            else:
                environ[key] = text
    for key, values in repeated.items():
        environ[key] = ", ".join(values)
    return environ


def _kept_a_fragment(scope: Scope) -> bool:
    """True if the server kept the target's fragment in the raw path, where it should have dropped
    it (without a raw path nothing tells: a "#" in ``path`` is a decoded ``%23``, as WSGI reads it)."""
    raw = scope.get("raw_path")
    return bool(raw) and b"#" in raw


def _inputs(scope: Scope) -> tuple[Any, ...]:
    """All that the decisions read of a request but its raw path (:func:`_path_info`,
    :func:`_environ`), ``path`` among them: which of its answers kept for the raw path
    (:class:`_WarmAnswers`) is its own."""
    inputs = [scope["method"], scope["path"], scope.get("root_path", ""), scope.get("app_root_path"),
              scope.get("query_string"), (scope.get("client") or ("",))[0]]
    for name, value in scope.get("headers", ()):
        read = _READ_NAMES.get(name.lower())
        if read is not None:
            inputs += (read, b"" if read in _PRESENCE_ONLY else value)
    return tuple(inputs)  # made once: a client may repeat a header thousands of times


def _internal_headers_filtered(send: Send, keep_reproxy: bool) -> Send:
    """``send`` for an application's websocket: its handshake answers (``websocket.accept``, a
    denial's ``websocket.http.response.start``) go out without the headers only the middleware
    may send, as its HTTP answers do: a serve header, and the reproxy headers unless ``keep_reproxy``."""
    async def filtered(message: Message) -> None:
        await send(_internal_headers_removed(message, keep_reproxy=keep_reproxy) if message.get("headers") else message)
    return filtered


def _internal_headers_removed(message: Message, *, keep_reproxy: bool) -> Message:
    """``message`` with its ``headers`` (any iterable of pairs) less those only the middleware may
    send: a :data:`~mogile_middleware.views.SERVE_HEADER`, and the reproxy headers unless
    ``keep_reproxy``."""
    return {**message, "headers": [(name, value) for name, value in message["headers"] if name.lower() != _SERVE
                                   and (keep_reproxy or not is_reproxy_header(name.decode("latin-1")))]}


def _encoded(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def _start_of(answer: Answer) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The status code and the encoded headers of ``answer``."""
    return int(answer.status[:3]), _encoded(answer.headers)


class _EncodedAnswers:
    """The ASGI form of answers that recur (reproxy answers, errors), encoded once each, kept
    while the answer lives: one made for a single request (a 304, a 416) goes with it (held here,
    4096 of them, about 2 KB each, outlived their requests)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max_entries = max_entries
        self._entries: dict[int, tuple[weakref.ref[Answer], int, list[tuple[bytes, bytes]]]] = {}

    def start(self, answer: Answer) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The status code and the encoded headers of ``answer``."""
        number = id(answer)
        entry = self._entries.get(number)
        if entry is None or entry[0]() is not answer:
            if len(self._entries) >= self._max_entries:
                evict_oldest(self._entries)
            gone = partial(self._forget, number)
            entry = self._entries[number] = (weakref.ref(answer, gone), *_start_of(answer))
        return entry[1], entry[2]

    def _forget(self, number: int, reference: weakref.ref[Answer]) -> None:
        """Drop the entry of an answer that has gone (unless the number now names another's)."""
        entry = self._entries.get(number)
        if entry is not None and entry[0] is reference:
            self._entries.pop(number, None)  # unless another thread's eviction took it meanwhile


@dataclasses.dataclass(frozen=True, slots=True)
class _WarmAnswer:
    """An answer decided from a location of the path cache, good while ``holds()``: how it is
    served and its status line (for the metrics), and its messages' status code, encoded headers
    and body."""

    holds: Callable[[], bool]
    mode: str
    status_line: str
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


#: The most inputs of a kept request (:func:`_inputs`): six, then a name and a value for each
#: header read, as many as there are (a header repeated with no value, which has no length, held
#: 32 MiB at the bounds where one with a long value holds 17).
_MOST_INPUTS = 6 + 2 * len(_READ_HEADERS)


class _WarmAnswers:
    """The answers decided from the path cache's locations, by the request's raw path, then by
    the rest of what the decisions read (:func:`_inputs`). The same request again, as a proxy
    sends it for a popular file, is answered without deciding anew while the path cache holds
    the location it was decided from. At most ``max_paths`` paths of ``max_variants`` requests,
    each of ``max_bytes`` at most (path, query, headers) and with no more headers than are read
    (:data:`_MOST_INPUTS`): a client's long headers, or many, are not kept.
    """

    def __init__(self, max_paths: int = 2048, max_variants: int = 4, max_bytes: int = 256) -> None:
        self._max_paths = max_paths
        self._max_variants = max_variants
        self._max_bytes = max_bytes
        self._by_path: dict[bytes, dict[tuple[Any, ...], _WarmAnswer]] = {}
        #: The answers kept for a raw path by :func:`_inputs`, or ``None``.
        self.variants: Callable[[bytes | None], dict[tuple[Any, ...], _WarmAnswer] | None] = \
            self._by_path.get  # type: ignore[assignment]

    def keep(self, raw_path: bytes, inputs: tuple[Any, ...], warm: _WarmAnswer) -> None:
        """Keep ``warm`` for the request of ``raw_path`` and ``inputs``, unless they are too long
        (the path counted once, as the raw path: ``inputs[1]``, the server's, is the same but for
        a rewrite)."""
        if len(inputs) > _MOST_INPUTS or \
                len(raw_path) + sum(len(item) for item in (inputs[0], *inputs[2:]) if item) > self._max_bytes:
            return
        variants = self._by_path.get(raw_path)
        if variants is None:
            if len(self._by_path) >= self._max_paths:
                evict_oldest(self._by_path)
            variants = self._by_path[raw_path] = {}
        elif len(variants) >= self._max_variants:
            variants.clear()  # a client varying its headers: the next ones start anew
        variants[inputs] = warm


async def _allows(authorize: Callable[[Scope, str], Any], scope: Scope, key: str) -> bool:
    """``authorize(scope, key)``, awaited when it is a coroutine function: what that gives, as a
    plain function's answer (see :func:`~mogile_middleware.core.authorize_answer`)."""
    allowed = authorize(scope, key)
    return authorize_answer(await allowed if inspect.isawaitable(allowed) else allowed, "ASGI")
