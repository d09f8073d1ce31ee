"""A fake GCE metadata server for google-auth's Compute Engine credentials.

google-auth (``google/auth/compute_engine/_metadata.py``) talks to it when the
environment says so -- no patching of google-auth:

* ``GCE_METADATA_IP=127.0.0.1:PORT``: ``is_on_gce()`` pings ``http://$GCE_METADATA_IP/``
  and wants ``200`` with ``Metadata-Flavor: Google``.
* ``GCE_METADATA_HOST=127.0.0.1:PORT``: everything else goes to
  ``http://$GCE_METADATA_HOST/computeMetadata/v1/...``: ``project/project-id``,
  ``instance/service-accounts/default/?recursive=true`` (email, scopes; after the first
  refresh google-auth asks with the email in place of ``default``) and
  ``instance/service-accounts/default/token?scopes=...`` (GET, or POST for bound tokens).

google-auth reads GCE_METADATA_HOST (and NO_GCE_CHECK) once, when
``google.auth.compute_engine._metadata`` is first imported, so set the variables before
that import -- in practice, run the code under test in a fresh interpreter
(:meth:`MetadataServer.environ` gives the variables). GCE_METADATA_IP is read per call.

Tokens are ``token-1``, ``token-2``, ... Their ``expires_in`` comes from the
``expires_in`` list given to the constructor, one value per token (the last one repeats).
A value under google-auth's refresh threshold (``REFRESH_THRESHOLD``, 3 min 45 s in
google-auth 2.x) makes the credentials invalid at once, so the next request refreshes.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from stowaway.forwarder.auth import HEALTHCARE_SCOPE

__all__ = ["MetadataRequest", "MetadataServer"]

_ROOT = "/computeMetadata/v1/"


@dataclass(frozen=True)
class MetadataRequest:
    """One request the fake metadata server received."""

    method: str
    path: str
    query: dict[str, list[str]]
    flavor: str | None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    fake: MetadataServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        url = urlsplit(self.path)
        flavor = self.headers.get("Metadata-Flavor")
        fake._record(MetadataRequest(self.command, url.path, parse_qs(url.query), flavor))
        if url.path == "/":
            self._send(200, b"", "application/text")
            return
        if flavor != "Google":  # as the real server: the header is mandatory
            self._send(403, b"Missing Metadata-Flavor:Google header.", "text/html")
            return
        path = url.path[len(_ROOT) :] if url.path.startswith(_ROOT) else ""
        # After its first refresh google-auth asks by the account's email, not "default".
        accounts = "instance/service-accounts/"
        account, _, leaf = path[len(accounts) :].partition("/")
        known = path.startswith(accounts) and account in ("default", fake.email)
        if path == "project/project-id":
            self._send(200, fake.project_id.encode(), "application/text")
        elif known and leaf == "":
            info = {"aliases": ["default"], "email": fake.email, "scopes": list(fake.scopes)}
            self._send(200, json.dumps(info).encode(), "application/json")
        elif known and leaf == "token":
            token = fake._issue()
            if token is None:
                self._send(404, b"service account not found", "text/html")
            else:
                self._send(200, json.dumps(token).encode(), "application/json")
        elif path == "universe/universe-domain":
            self._send(200, b"googleapis.com", "application/text")
        else:
            self._send(404, b"Not Found", "text/html")


class MetadataServer:
    """The fake server on 127.0.0.1 (free port); a context manager.

    ``expires_in``: seconds of validity of each issued token, in order; the last value
    repeats. ``fail_tokens``: answer token requests with 404 (a credentials failure).
    ``email`` is deliberately not a ``*.gserviceaccount.com`` address, so google-auth
    never starts a regional-access-boundary lookup against a real Google endpoint.
    """

    def __init__(
        self,
        *,
        expires_in: Sequence[int] = (3600,),
        email: str = "stowaway-test@example.invalid",
        scopes: Sequence[str] = (HEALTHCARE_SCOPE,),
        project_id: str = "stowaway-test",
    ) -> None:
        if not expires_in:
            raise ValueError("expires_in needs at least one value")
        self.email = email
        self.scopes = tuple(scopes)
        self.project_id = project_id
        self.fail_tokens = False
        self.requests: list[MetadataRequest] = []
        self._expires_in = list(expires_in)
        self._issued = 0
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetadataServer:
        """Listen and serve in a background thread."""
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> MetadataServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, the value for GCE_METADATA_HOST and GCE_METADATA_IP."""
        assert self._server is not None, "metadata server not started"
        return f"127.0.0.1:{self._server.server_address[1]}"

    def environ(self) -> dict[str, str]:
        """Environment variables that point google-auth at this server."""
        return {
            "GCE_METADATA_HOST": self.address,
            "GCE_METADATA_IP": self.address,
            "GCE_METADATA_MTLS_MODE": "none",
        }

    @property
    def issued(self) -> int:
        """How many tokens were issued."""
        with self._lock:
            return self._issued

    def token_requests(self) -> list[MetadataRequest]:
        """The recorded token requests."""
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/token")]

    def _record(self, request: MetadataRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _issue(self) -> dict[str, Any] | None:
        with self._lock:
            if self.fail_tokens:
                return None
            expires = self._expires_in[min(self._issued, len(self._expires_in) - 1)]
            self._issued += 1
            return {
                "access_token": f"token-{self._issued}",
                "expires_in": expires,
                "token_type": "Bearer",
            }
