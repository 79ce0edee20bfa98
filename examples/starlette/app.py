"""A Starlette application whose files under ``/mogilefs/`` come from MogileFS (see README.rst).

Run from the repository root: ``uvicorn examples.starlette.app:app``. The domain and trackers are
the ``MOGILEFS_DOMAIN`` and ``MOGILEFS_TRACKERS`` environment variables, as for the command line.
"""

from __future__ import annotations

import html
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from mogile_middleware.asgi import MogileFSMiddleware

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


app = Starlette(routes=[Route("/", homepage)])
# The WSGI middleware's options; requests outside the prefix reach the routes above untouched.
app.add_middleware(
    MogileFSMiddleware,
    domain=os.environ.get("MOGILEFS_DOMAIN", "media"),
    trackers=os.environ.get("MOGILEFS_TRACKERS", "127.0.0.1:7001"),
    prefix="/mogilefs/",
    cache_control="public, max-age=3600",
)
