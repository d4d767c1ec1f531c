"""The one way Bastion builds an ASGI app: problem handlers, small middleware, docs off by default,
and no redirect on a trailing slash (``/v1/models/`` is a 404 problem: no ``Location`` built from
the client's ``Host`` header)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI

from bastion import __version__, middleware, problems


def new_app(
    title: str,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
    *,
    docs_enabled: bool,
    max_body_bytes: int,
) -> FastAPI:
    app = FastAPI(
        title=title,
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if docs_enabled else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs_enabled else None,
        exception_handlers=problems.EXCEPTION_HANDLERS,
        redirect_slashes=False,
    )
    middleware.install(app, max_body_bytes)
    return app
