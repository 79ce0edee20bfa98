"""A tiny WSGI application for ``pipeline.ini``: a page linking to a file the middleware serves.

It knows nothing of MogileFS: the filter in front of it answers everything under ``/mogilefs/``.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

from webob import Request, Response
from webob.dec import wsgify
from webob.exc import HTTPNotFound

from mogile_middleware.middleware import WSGIApp

PAGE = """<!DOCTYPE html>
<title>Hello</title>
<p>Hello from the application. <a href="{base}/mogilefs/hello.txt">hello.txt</a> comes from MogileFS;
store it first with
<pre>python -c 'from mogile_middleware import Client
Client("media", ["127.0.0.1:7001"]).store_content("hello.txt", b"Hello from MogileFS\\n", cls="image")'</pre>
"""


@wsgify
def hello(request: Request) -> Response:
    """The page at ``/``; any other path the filter lets through is a 404."""
    if request.path_info != "/":
        return HTTPNotFound()
    # The link follows the mount point, as the middleware's prefix is relative to SCRIPT_NAME.
    return Response(PAGE.format(base=html.escape(request.script_name)), content_type="text/html")


def make_app(global_conf: Mapping[str, str]) -> WSGIApp:
    """The ``paste.app_factory`` of the ``[app:app]`` section; it takes no options."""
    return hello
