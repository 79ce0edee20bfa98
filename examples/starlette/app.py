"""A Starlette application whose files under ``/mogilefs/`` come from MogileFS (see README.rst).

Run from the repository root: ``uvicorn examples.starlette.app:app``. The domain and trackers are
the ``MOGILEFS_DOMAIN`` and ``MOGILEFS_TRACKERS`` environment variables, as for the command line.
"""

from __future__ import annotations

import html
import os
import unicodedata

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from mogile_middleware import serve_header
from mogile_middleware.asgi import MogileFSMiddleware

#: Who may read the files under private/: a stand-in for the site's own sessions or tokens.
TOKEN = os.environ.get("PRIVATE_TOKEN", "let-me-in")

PAGE = """<!DOCTYPE html>
<title>Hello</title>
<p>Hello from Starlette. <a href="{base}/mogilefs/hello.txt">hello.txt</a> comes from MogileFS;
store it first with
<pre>echo 'Hello from MogileFS' | mogile-middleware upload hello.txt -</pre>
"""


async def homepage(request: Request) -> HTMLResponse:
    """The page at ``/``; it knows nothing of MogileFS."""
    # The link follows the mount point, as the middleware's prefix is relative to root_path.
    return HTMLResponse(PAGE.format(base=html.escape(request.scope.get("root_path", ""))))


async def private_file(request: Request) -> Response:
    """``/private/<name>``: the file ``private/<name>`` to a client showing the token, as a download.

    The endpoint only decides who may read it; the middleware that wraps the application answers
    with the file (HEAD, ranges, 304; reproxied for a trusted proxy), ``Cache-Control: private``.
    """
    if request.headers.get("authorization") != f"Bearer {TOKEN}":
        return PlainTextResponse("not yours\n", status_code=403)
    name = request.path_params["name"]
    return Response(headers=dict([serve_header(f"private/{name}", filename=name.rpartition("/")[2])]))


def public_key(path: str) -> str | None:
    """The key of a path under ``/mogilefs/``, or None (404) for the private files: only the
    endpoint :func:`private_file` sends those, to a client showing the token."""
    # MySQL's collations find a key whatever its case and accents ("PRÍVATE/a.txt" is "private/a.txt"):
    # compare the path so folded, as near as one can (README: Private files).
    folded = unicodedata.normalize("NFKD", path).encode("ascii", "ignore").decode("ascii").lower()
    return None if folded.startswith("private/") else path


app = Starlette(routes=[Route("/", homepage), Route("/private/{name:path}", private_file)])
# The ASGI middleware, with the WSGI one's options; requests outside the prefix reach the routes above untouched.
app.add_middleware(
    MogileFSMiddleware,
    domain=os.environ.get("MOGILEFS_DOMAIN", "media"),
    trackers=os.environ.get("MOGILEFS_TRACKERS", "127.0.0.1:7001"),
    prefix="/mogilefs/",
    key_for_path=public_key,
    cache_control="public, max-age=3600",
)
