"""``mogile-middleware serve``: the middleware under gunicorn in front of existing trackers, for a
quick look at a domain.

:class:`MogileFSMiddleware` answers under the prefix; ``/`` lists the domain's first keys, each
linked to where the middleware serves it; any other path is a 404. The trackers and the domain are
checked once before gunicorn starts, so that a wrong address or name is one line of error; each
worker then makes its own client. ``demo`` serves its development MogileFS with the same application.
"""

from __future__ import annotations

import argparse
import html
import inspect
import itertools
from collections.abc import Sequence
from urllib.parse import quote

from webob import Request, Response
from webob.dec import wsgify
from webob.exc import HTTPNotFound, HTTPServiceUnavailable

from ..client import Client
from ..core import url_prefix
from ..exceptions import BadKeyError, MogileFSError, UnknownKeyError, UnregDomainError, named
from ..middleware import MogileFSMiddleware, WSGIApp
from ..protocol import check_linked_path, check_url_key
from ..tracker import Address
from .commands import connection_options
from .gunicorn import add_server_arguments, positive, prepare, serve_until_stopped, trusted_proxies
from .progress import printable

#: The middleware's own default, so that ``serve`` serves where an application would.
DEFAULT_PREFIX: str = inspect.signature(MogileFSMiddleware).parameters["prefix"].default
#: How many keys the index lists: each costs a tracker request (its size and class).
INDEX_KEYS = 100


def file_path(prefix: str, key: str, script_name: str = "") -> str:
    """The URL path the middleware serves ``key`` at under ``prefix``, percent-encoded."""
    return quote(script_name + prefix + key)


class FileIndex:
    """The application behind the middleware: ``/`` lists the first ``limit`` keys of the client's
    domain with their size and class, each linked under ``prefix``; any other path is a 404."""

    def __init__(self, client: Client, prefix: str, limit: int) -> None:
        self.client = client
        self.prefix = url_prefix(prefix)[0]  # decoded, as the middleware reads it
        self.limit = limit

    @wsgify
    def __call__(self, request: Request) -> Response:
        if request.path_info != "/":
            return HTTPNotFound()
        try:
            keys = list(itertools.islice(self.client.keys(), self.limit + 1))  # one more: are there others?
            items = [item for key in keys[:self.limit] if (item := self._item(key, request.script_name))]
        except MogileFSError as error:  # the trackers went away since start-up: say so, not a traceback
            return HTTPServiceUnavailable(str(error))
        domain = html.escape(self.client.domain)
        first = "the first key is" if self.limit == 1 else f"the first {self.limit} keys are"
        more = f"<p>Only {first} listed.</p>\n" if len(keys) > self.limit else ""
        page = (
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>MogileFS domain {domain}</title></head>\n'
            f"<body><h1>Files in MogileFS domain {domain}</h1>\n<ul>\n" + "\n".join(items) + f"\n</ul>\n{more}"
            "</body></html>\n"
        )
        return Response(page, content_type="text/html", charset="utf-8")

    def _item(self, key: str, script_name: str) -> str:
        """The list item of ``key``: a link, its size and class; empty if it was deleted meanwhile."""
        try:
            info = self.client.file_info(key)
        except UnknownKeyError:
            return ""
        about = f"{info.length} bytes, class {html.escape(info.cls)}"
        try:
            name = check_url_key(key)
        except BadKeyError as error:  # not UTF-8, over 255 bytes, NUL, CR, LF: named, with no link (no URL serves it)
            return f"<li>{html.escape(printable(key))} {about}, not served: {html.escape(str(error))}</li>"
        try:
            href = html.escape(file_path(self.prefix, check_linked_path(name), script_name))
        except BadKeyError as error:  # a browser would ask for another key, or the middleware answer 400
            return f"<li>{html.escape(printable(key))} {about}, not linked: {html.escape(str(error))}</li>"
        return f'<li><a href="{href}">{html.escape(printable(key))}</a> {about}</li>'


def index_app(client: Client, prefix: str, reproxy: str | None, trusted: Sequence[str],
              index_keys: int = INDEX_KEYS) -> MogileFSMiddleware:
    """The served application: the :class:`FileIndex` of ``client``'s domain, with the middleware
    answering under ``prefix`` (reproxy answers for the ``trusted`` proxies only, when they send
    the proxy's own header: a browser on the proxy's machine gets the files)."""
    proxies = {} if reproxy is None else {"trusted_proxies": trusted, "require_proxy_header": True}
    return MogileFSMiddleware(FileIndex(client, prefix, index_keys), client=client, prefix=prefix, reproxy=reproxy,
                              **proxies)


def _prefix(text: str) -> str:
    """``--prefix`` as given, percent-encoded or not (the middleware decodes it, once), if the
    middleware takes it, as it would write it, and not ``/``, where the index is."""
    try:
        decoded = url_prefix(text)[0]
    except ValueError as error:  # refused here, not in each worker as it boots
        raise argparse.ArgumentTypeError(str(error)) from None
    if decoded == "/" or not (text.startswith("/") and text.endswith("/")):
        raise argparse.ArgumentTypeError(f"not /NAME/: {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``serve`` to ``parser``."""
    connection_options(parser)
    add_server_arguments(parser)
    parser.add_argument("--prefix", type=_prefix, default=DEFAULT_PREFIX, metavar="/NAME/",
                        help="URL path the files are served under (default: %(default)s)")
    parser.add_argument("--index-keys", type=positive, default=INDEX_KEYS, metavar="N",
                        help="how many keys the page at / lists (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Serve the domain until SIGINT or SIGTERM; 0 on a clean stop, 1 if it cannot start."""
    base, refused = prepare("serve", args)
    if base is None:
        return refused
    _check_domain(args.domain, args.trackers)

    def make_app() -> WSGIApp:
        return index_app(Client(args.domain, args.trackers), args.prefix, args.reproxy, trusted_proxies(args),
                         args.index_keys)

    def announce(url: str) -> None:
        print(f"files {url}{file_path(url_prefix(args.prefix)[0], '')}<key>")  # a pattern: the prefix names no file
        print(f"page {url}/", flush=True)  # last, where it is seen

    return serve_until_stopped(base, args.bind, args.workers, make_app, announce)


def _check_domain(domain: str, trackers: Sequence[Address]) -> None:
    """Ask the trackers for a key of ``domain``: raise the error a worker would meet (no tracker
    answering, the domain unknown: named), before there are workers to meet it."""
    client = Client(domain, trackers)
    try:
        client.list_keys(limit=1)
    except UnregDomainError as error:  # the tracker does not say which domain
        raise named(error, {}, domain) from None
    finally:
        client.close()
