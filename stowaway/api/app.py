"""The one HTTP application on ``--http-port``: probes, ``/api/v1`` and the console.

* ``/healthz``, ``/readyz``, ``/metrics``: the probes and the scrape, as always
  (docs/monitoring.md), a small Starlette application;
* everything else: :mod:`stowaway.api.v1`, the JSON API (``/api/v1/...``, its OpenAPI
  document at ``/api/v1/openapi.json``; docs/http-api.md) and the console at ``/``
  (static files of this package calling the API with relative URLs, so it works behind
  ``kubectl port-forward`` or a path prefix). FastAPI is imported and the application
  built on the first such request, in a worker thread: a process whose API nobody
  calls starts as fast as before, and the probes never wait for it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio.to_thread
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stowaway.api.context import ApiContext
from stowaway.health import Readiness

log = logging.getLogger("stowaway")

#: Request bodies above this are refused (413) before any endpoint reads them.
MAX_BODY = 64 * 1024
PROBES = ("/healthz", "/readyz", "/metrics")

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


def probes(readiness: Readiness, registry: CollectorRegistry) -> Starlette:
    """``/healthz``, ``/readyz`` and ``/metrics`` (their answers are unchanged)."""

    def healthz(_request: Request) -> Response:
        return Response(b"ok\n", media_type="text/plain; charset=utf-8")

    def readyz(_request: Request) -> Response:
        report = readiness.report()
        body = json.dumps(report.to_json()).encode() + b"\n"
        return Response(body, 200 if report.ready else 503, media_type="application/json")

    def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), media_type=content_type)

    async def failed(request: Request, exc: Exception) -> Response:
        log.error(
            "http_endpoint_error",
            extra={"path": request.url.path, "error": type(exc).__name__},
            exc_info=exc,
        )
        return Response(b"internal error\n", 500, media_type="text/plain")

    # Sync endpoints run in the worker threads: a readiness check may take 2 s.
    return Starlette(
        routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)],
        exception_handlers={Exception: failed},
    )


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await Response(NOT_FOUND_TEXT, 404, media_type="text/plain")(scope, receive, send)


class LazyApi:
    """:func:`stowaway.api.v1.build_api`, built (in a worker thread) on first use."""

    def __init__(self, context: ApiContext) -> None:
        self.context = context
        self._lock = threading.Lock()
        self._app: Asgi | None = None

    def _build(self) -> Asgi:
        with self._lock:
            if self._app is None:
                from stowaway.api.v1 import build_api

                self._app = build_api(self.context)
            return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self._app
        if app is None:
            app = await anyio.to_thread.run_sync(self._build)
        await app(scope, receive, send)


class HttpPort:
    """The probes at their three paths; everything else to the API (or a 404)."""

    def __init__(self, probe_app: Asgi, api: Asgi) -> None:
        self.probe_app = probe_app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in PROBES:
            await self.probe_app(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def build_app(
    readiness: Readiness, registry: CollectorRegistry, context: ApiContext | None = None
) -> Asgi:
    """The application; without ``context`` (no queue at hand) only the probes."""
    api: Asgi = LazyApi(context) if context is not None else not_found
    return BoundedBody(HttpPort(probes(readiness, registry), api))
