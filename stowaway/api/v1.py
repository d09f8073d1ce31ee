"""The JSON API (``/api/v1``) and the console (``/``): one FastAPI application.

Built on the first request that is not a probe (:mod:`stowaway.api.app`), so a process
whose API nobody uses never imports the framework.

Adding to the API: a module with an ``APIRouter`` named ``router``, listed in
:data:`V1_ROUTERS`. Storage commitments are meant to come in that way
(``stowaway/api/commitments.py`` at ``/api/v1/commitments``), over their own ``db/``
operations.
"""

from __future__ import annotations

import logging
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from stowaway import __version__
from stowaway.api import actions, queue_views
from stowaway.api.context import ApiContext
from stowaway.text import first_line

log = logging.getLogger("stowaway")

API_PREFIX = "/api/v1"
#: The API's routers (see the module's docstring to add one).
V1_ROUTERS: tuple[APIRouter, ...] = (queue_views.router, actions.router)
CONSOLE = resources.files("stowaway.api") / "console"
NOT_FOUND_TEXT = b"not found: try /, /api/v1/openapi.json, /healthz, /readyz or /metrics\n"


def build_api(context: ApiContext) -> FastAPI:
    app = FastAPI(
        title="stowaway",
        version=__version__,
        summary="The queue of a DICOM store-and-forward gateway: what waits, why, and actions.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # Swagger UI would load scripts from a CDN
        redoc_url=None,
    )
    app.state.context = context
    for router in V1_ROUTERS:
        app.include_router(router, prefix=API_PREFIX)
    app.add_api_route("/", console_page, include_in_schema=False)
    app.mount("/console", StaticFiles(directory=str(CONSOLE)), name="console")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith(API_PREFIX) or exc.status_code != 404:
            return JSONResponse(
                {"detail": exc.detail}, exc.status_code, headers=getattr(exc, "headers", None)
            )
        return Response(NOT_FOUND_TEXT, 404, media_type="text/plain")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, 422)

    @app.exception_handler(SQLAlchemyError)
    async def database_down(request: Request, exc: SQLAlchemyError) -> Response:
        log.warning(
            "http_database_error", extra={"path": request.url.path, "error": first_line(exc)}
        )
        return JSONResponse(
            {"detail": f"queue database unavailable ({type(exc).__name__}): {first_line(exc)}"},
            503,
        )

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> Response:
        log.error(
            "http_endpoint_error",
            extra={"path": request.url.path, "error": type(exc).__name__},
            exc_info=exc,
        )
        if request.url.path.startswith(API_PREFIX):
            return JSONResponse({"detail": "internal error (see the log)"}, 500)
        return Response(b"internal error\n", 500, media_type="text/plain")

    return app


def console_page() -> Response:
    """The console (``console/index.html``)."""
    return Response((CONSOLE / "index.html").read_bytes(), media_type="text/html; charset=utf-8")
