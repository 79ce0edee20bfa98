"""A WSGI application for tests under a real gunicorn: MogileFSMiddleware over a tiny app.

Configured by environment variables: MOGILE_DOMAIN, MOGILE_TRACKERS, MOGILE_REPROXY.
"""

from __future__ import annotations

import os

from mogile_middleware.middleware import MogileFSMiddleware


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from the app\n"]


def make_app() -> MogileFSMiddleware:
    return MogileFSMiddleware(
        hello,
        domain=os.environ["MOGILE_DOMAIN"],
        trackers=os.environ["MOGILE_TRACKERS"],
        reproxy=os.environ.get("MOGILE_REPROXY") or None,
    )
