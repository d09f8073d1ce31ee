"""The one HTTP application on ``--http-port``: probes, ``/api/v1`` and the console.

* ``/healthz``, ``/readyz``, ``/metrics``: the probes and the scrape, as always
  (docs/monitoring.md);
* ``/api/v1/...``: the JSON API, its OpenAPI document at ``/api/v1/openapi.json``
  (docs/http-api.md);
* ``/``: the console, static files of this package that call the API with relative
  URLs (so it works behind ``kubectl port-forward`` or a path prefix).

Adding to the API: a module with an ``APIRouter`` named ``router``, listed in
:data:`V1_ROUTERS`. Storage commitments are meant to come in that way
(``stowaway/api/commitments.py`` at ``/api/v1/commitments``), over their own ``db/``
operations.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from stowaway import __version__
from stowaway.api import actions, queue_views
from stowaway.api.context import ApiContext
from stowaway.health import Readiness
from stowaway.text import first_line

log = logging.getLogger("stowaway")

API_PREFIX = "/api/v1"
#: The API's routers (see the module's docstring to add one).
V1_ROUTERS: tuple[APIRouter, ...] = (queue_views.router, actions.router)
#: Request bodies above this are refused (413) before any endpoint reads them.
MAX_BODY = 64 * 1024
CONSOLE = resources.files("stowaway.api") / "console"

#: On every answer: never cached, never framed, never sniffed, no referrer; the console's
#: scripts and styles only from its own origin (no inline script).
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}
NOT_FOUND_TEXT = b"not found: try /, /api/v1/openapi.json, /healthz, /readyz or /metrics\n"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


class BoundedBody:
    """ASGI middleware: a request body larger than ``limit`` is answered 413 unread
    (by its Content-Length, or as it streams in), and security headers go on every answer."""

    def __init__(self, app: Asgi, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (name.encode(), value.encode())
                    for name, value in SECURITY_HEADERS.items()
                    if name.encode() not in present
                ]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _too_large(send_with_headers, self.limit)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await _too_large(send_with_headers, self.limit)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send_with_headers)


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body larger than {limit} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def probes(readiness: Readiness, registry: CollectorRegistry) -> APIRouter:
    """``/healthz``, ``/readyz`` and ``/metrics`` (their answers are unchanged)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/healthz")
    def healthz() -> Response:
        return Response(b"ok\n", media_type="text/plain; charset=utf-8")

    @router.get("/readyz")
    def readyz() -> Response:
        report = readiness.report()
        body = json.dumps(report.to_json()).encode() + b"\n"
        return Response(body, 200 if report.ready else 503, media_type="application/json")

    @router.get("/metrics")
    def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), media_type=content_type)

    return router


def build_app(
    readiness: Readiness, registry: CollectorRegistry, context: ApiContext | None = None
) -> Asgi:
    """The application; without ``context`` (no queue at hand) only the probes."""
    app = FastAPI(
        title="stowaway",
        version=__version__,
        summary="The queue of a DICOM store-and-forward gateway: what waits, why, and actions.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # Swagger UI would load scripts from a CDN
        redoc_url=None,
    )
    app.include_router(probes(readiness, registry))
    if context is not None:
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

    return BoundedBody(app)


def console_page() -> Response:
    """The console (``console/index.html``)."""
    return Response((CONSOLE / "index.html").read_bytes(), media_type="text/html; charset=utf-8")
