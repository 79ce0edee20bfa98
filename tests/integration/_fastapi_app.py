"""A FastAPI application with the ASGI middleware added by ``add_middleware``, for uvicorn
(``--factory _fastapi_app:make_app``), configured by ``MOGILE_DOMAIN`` and ``MOGILE_TRACKERS``.

Without ``from __future__ import annotations``: FastAPI reads the endpoints' annotations.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response

from mogile_middleware import serve_header
from mogile_middleware.asgi import MogileFSMiddleware

#: The token the private endpoint asks for.
TOKEN = "let-me-in"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
    yield {"greeting": "hello from FastAPI"}


def token(authorization: str = Header("")) -> None:
    """The dependency of the private endpoint: the client shows :data:`TOKEN`, or gets a 403."""
    if authorization != f"Bearer {TOKEN}":
        raise HTTPException(status_code=403, detail="not yours")


def make_app() -> FastAPI:
    """A JSON route with state its lifespan set, and an endpoint answering with ``private/<name>``
    behind :func:`token`. Under the prefix, ``private/`` is refused: only the endpoint serves it."""
    app = FastAPI(lifespan=lifespan)

    @app.get("/hello")
    async def greeting(request: Request) -> dict[str, str]:
        return {"greeting": request.state.greeting}

    @app.get("/private/{name}", dependencies=[Depends(token)])
    async def private_file(name: str) -> Response:
        return Response(headers=dict([serve_header(f"private/{name}", filename=name)]))

    app.add_middleware(MogileFSMiddleware, domain=os.environ["MOGILE_DOMAIN"], trackers=os.environ["MOGILE_TRACKERS"],
                       key_for_path=lambda path: None if path.startswith("private/") else path)
    return app
