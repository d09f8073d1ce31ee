"""The HTTP server itself: a silent connection is closed, bodies are bounded, headers set."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import requests

from stowaway.api import protocol
from stowaway.health import HealthServer, Readiness
from stowaway.metrics import Metrics


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[HealthServer]:
    monkeypatch.setattr(protocol, "HEADER_TIMEOUT", 0.5)
    srv = HealthServer("127.0.0.1", 0, Readiness([]), Metrics().registry)
    srv.start()
    yield srv
    srv.stop()


def test_a_connection_that_sends_nothing_is_closed(server: HealthServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(100) == b""  # closed by the server
        assert time.monotonic() - started < 5
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as talking:
        talking.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert talking.recv(100).startswith(b"HTTP/1.1 200 OK")


def test_a_body_over_the_limit_is_refused_unread(server: HealthServer) -> None:
    announced = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n"
    chunked = b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"8000\r\n" + b"x" * 0x8000 + b"\r\n"
    for request in (announced, chunked + chunk * 3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(request)
            assert sock.recv(100).startswith(b"HTTP/1.1 413 ")
    with requests.Session() as http:
        http.trust_env = False
        ok = http.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
        assert ok.headers["X-Content-Type-Options"] == "nosniff"
        assert ok.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in ok.headers["Content-Security-Policy"]
