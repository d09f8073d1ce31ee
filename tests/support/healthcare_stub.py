"""A local stub of a Cloud Healthcare API DICOM store's DICOMweb endpoint, for tests.

A threaded HTTP server on 127.0.0.1 (port 0) that behaves like Google's store where
stowaway cares:

* ``POST {base}/studies`` really parses the ``multipart/related`` body (boundary from
  Content-Type), reads each part with pydicom and keeps the bytes in ``stored`` by SOP
  Instance UID. Identical re-upload -> 200 listing it in ReferencedSOPSequence; same UID
  with different bytes -> 409 with a FailedSOPSequence item (FailureReason 0x0111 and a
  Google-style FailureDetail, private creator ``GOOGLE`` at (0009,1097)); a mix -> 202.
* ``DELETE {base}/studies/S/series/E/instances/I`` removes the instance.
* ``GET {base}/studies?limit=1`` -> 200 ``[]``.

With ``upstream`` (a real store's DICOMweb root, such as Orthanc's), every request no
fault answers is passed on to it instead, and its answer returned.

Every request is recorded in ``requests`` (method, path, headers incl. Authorization).
Faults are scripted, thread-safely, with :meth:`HealthcareStub.script` (or the ``fault``
property); each request consumes the next fault. ``required_bearer`` makes every request
without ``Authorization: Bearer <it>`` fail with Google's 401 body.

    with HealthcareStub() as stub:
        stub.script(Fault.http(503, times=3, retry_after="1"))
        client = StowClient(stub.base_url)
"""

from __future__ import annotations

import contextlib
import enum
import http.server
import io
import json
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydicom
from pydicom.errors import InvalidDicomError

__all__ = [
    "FAILURE_DETAIL_DUPLICATE",
    "GOOGLE_401_MESSAGE",
    "GOOGLE_403_IAM_MESSAGE",
    "GOOGLE_403_SCOPES_MESSAGE",
    "GOOGLE_403_SERVICE_DISABLED_MESSAGE",
    "Fault",
    "FaultAction",
    "HealthcareStub",
    "RecordedRequest",
    "google_error_body",
    "parse_multipart",
]

# The three 403s of Google's guide "Connecting a PACS to the Cloud Healthcare API", and
# Google's 401, as the API words them.
GOOGLE_403_SERVICE_DISABLED_MESSAGE = (
    "Cloud Healthcare API has not been used in project 123 before or it is disabled. "
    "Enable it by visiting "
    "https://console.developers.google.com/apis/api/healthcare.googleapis.com/overview"
    "?project=123 then retry. If you enabled this API recently, wait a few minutes for the "
    "action to propagate to our systems and retry."
)
GOOGLE_403_SCOPES_MESSAGE = "Request had insufficient authentication scopes."
GOOGLE_403_IAM_MESSAGE = (
    "Permission 'healthcare.dicomStores.dicomWebWrite' denied on resource "
    "'//healthcare.googleapis.com/projects/p/locations/l/datasets/d/dicomStores/s' "
    "(or it may not exist)."
)
GOOGLE_401_MESSAGE = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
FAILURE_DETAIL_DUPLICATE = (
    "An instance already exists in this DICOM store with the same Study/Series/SOPInstance "
    "UID, but the DICOM files differ (checksum mismatch)."
)
DUPLICATE_SOP_INSTANCE = 0x0111
CANNOT_UNDERSTAND = 0xC000


def google_error_body(
    code: int,
    status: str,
    message: str,
    *,
    reason: str | None = None,
    domain: str = "googleapis.com",
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Google's JSON error body, with a ``google.rpc.ErrorInfo`` detail when ``reason``."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if reason is not None:
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": domain,
                "metadata": dict(metadata or {}),
            }
        ]
    return json.dumps({"error": error}, indent=2).encode()


class FaultAction(enum.Enum):
    """What a scripted fault does to one request."""

    RESPOND = "respond"  # read the body, answer with the given status/body/headers
    RESET = "reset"  # read some or all of the body, then reset the connection
    SLOW = "slow"  # handle the request normally, but wait ``delay`` s before answering
    DROP_AFTER_STORE = "drop_after_store"  # store the instances, close without answering
    PARTIAL_FAILURE = "partial_failure"  # 202; ``fail_uid`` in FailedSOPSequence
    UNNAMED_FAILURE = "unnamed_failure"  # 409 for any request holding ``fail_uid``


@dataclass
class Fault:
    """One scripted misbehaviour, for the next ``times`` requests (of ``method``, if set).

    Build with the class methods: :meth:`http`, :meth:`google_error`,
    :meth:`service_disabled`, :meth:`insufficient_scopes`, :meth:`iam_denied`,
    :meth:`reset`, :meth:`slow`, :meth:`accept_then_drop`, :meth:`partial_failure`.
    """

    action: FaultAction = FaultAction.RESPOND
    status: int = 503
    body: bytes = b""
    content_type: str = "application/json; charset=UTF-8"
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1
    method: str | None = None
    read_bytes: int | None = None
    delay: float = 0.0
    fail_uid: str | None = None
    failure_reason: int = 0xA700

    @classmethod
    def http(
        cls,
        status: int,
        *,
        body: bytes | str = b"",
        retry_after: str | None = None,
        content_type: str = "application/json; charset=UTF-8",
        times: int = 1,
        method: str | None = None,
    ) -> Fault:
        """Answer ``status`` (with Retry-After when given)."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        raw = body.encode() if isinstance(body, str) else body
        return cls(
            status=status,
            body=raw,
            content_type=content_type,
            headers=headers,
            times=times,
            method=method,
        )

    @classmethod
    def google_error(
        cls,
        code: int,
        status: str,
        message: str,
        *,
        reason: str | None = None,
        retry_after: str | None = None,
        times: int = 1,
    ) -> Fault:
        """Answer ``code`` with Google's JSON error body."""
        return cls.http(
            code,
            body=google_error_body(code, status, message, reason=reason),
            retry_after=retry_after,
            times=times,
        )

    @classmethod
    def service_disabled(cls, times: int = 1) -> Fault:
        """403: the Cloud Healthcare API is not enabled in the project."""
        return cls.google_error(
            403,
            "PERMISSION_DENIED",
            GOOGLE_403_SERVICE_DISABLED_MESSAGE,
            reason="SERVICE_DISABLED",
            times=times,
        )

    @classmethod
    def insufficient_scopes(cls, times: int = 1) -> Fault:
        """403: the token lacks the cloud-healthcare scope."""
        return cls.google_error(
            403,
            "PERMISSION_DENIED",
            GOOGLE_403_SCOPES_MESSAGE,
            reason="ACCESS_TOKEN_SCOPE_INSUFFICIENT",
            times=times,
        )

    @classmethod
    def iam_denied(cls, times: int = 1) -> Fault:
        """403: the service account lacks dicomWebWrite on the store."""
        return cls.google_error(
            403,
            "PERMISSION_DENIED",
            GOOGLE_403_IAM_MESSAGE,
            reason="IAM_PERMISSION_DENIED",
            times=times,
        )

    @classmethod
    def reset(cls, read_bytes: int | None = None, times: int = 1) -> Fault:
        """Reset the connection after reading ``read_bytes`` of the body (None: all)."""
        return cls(action=FaultAction.RESET, read_bytes=read_bytes, times=times)

    @classmethod
    def slow(cls, delay: float, times: int = 1) -> Fault:
        """Handle the request, but answer only after ``delay`` seconds."""
        return cls(action=FaultAction.SLOW, delay=delay, times=times)

    @classmethod
    def accept_then_drop(cls, times: int = 1) -> Fault:
        """Store the instances, then close the connection without an answer."""
        return cls(action=FaultAction.DROP_AFTER_STORE, times=times)

    @classmethod
    def unnamed_failure(cls, uid: str, times: int = 1) -> Fault:
        """Refuse any request holding ``uid``: 409, nothing stored, and one
        FailedSOPSequence item with a reason and a FailureDetail but no UIDs (as
        Google answers for an instance it cannot parse). Other requests go through."""
        return cls(
            action=FaultAction.UNNAMED_FAILURE, fail_uid=uid, failure_reason=0x0110, times=times
        )

    @classmethod
    def partial_failure(cls, uid: str, reason: int = 0xA700, times: int = 1) -> Fault:
        """Answer 202 with ``uid`` in FailedSOPSequence (``reason``); store the others."""
        return cls(
            action=FaultAction.PARTIAL_FAILURE, fail_uid=uid, failure_reason=reason, times=times
        )


@dataclass(frozen=True)
class RecordedRequest:
    """One request the stub received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body_size: int
    part_count: int
    #: SOP Instance UIDs in a POST's multipart body (also for faulted requests)
    sop_instance_uids: tuple[str, ...] = ()
    time: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        """Case-insensitive header lookup."""
        lname = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lname), None)


def parse_multipart(body: bytes, boundary: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart body into (headers, content) parts; ValueError if malformed.

    Index based, so each part's content is copied once (large bodies stay cheap).
    """
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    if pos < 0:
        raise ValueError("no multipart delimiter in body")
    parts: list[tuple[dict[str, str], bytes]] = []
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("truncated multipart delimiter line")
        start = eol + 2
        if body.startswith(b"\r\n", start):
            raw_headers, content_start = b"", start + 2
        else:
            end = body.find(b"\r\n\r\n", start)
            if end < 0:
                raise ValueError("truncated part headers")
            raw_headers, content_start = body[start:end], end + 4
        following = body.find(b"\r\n" + delimiter, content_start)
        if following < 0:
            raise ValueError("unterminated multipart part")
        headers: dict[str, str] = {}
        for line in raw_headers.decode("latin-1").split("\r\n"):
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, body[content_start:following]))
        pos = following + 2


def _uids_in(body: bytes, content_type: str) -> tuple[str, ...]:
    """SOP Instance UIDs of the parts of a (possibly truncated) multipart body."""
    boundary = _boundary(content_type)
    if boundary is None:
        return ()
    try:
        parts = parse_multipart(body, boundary)
    except ValueError:
        return ()
    uids = []
    for _headers, content in parts:
        with contextlib.suppress(Exception):
            ds = pydicom.dcmread(io.BytesIO(content), stop_before_pixels=True)
            uids.append(str(ds.SOPInstanceUID))
    return tuple(uids)


def _boundary(content_type: str) -> bytes | None:
    match = re.search(r'boundary="?([^";]+)"?', content_type, re.I)
    return match.group(1).encode("latin-1") if match else None


def _element(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    stub: HealthcareStub

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out or go away are part of the tests; stay quiet.
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

    def do_DELETE(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    # ------------------------------------------------------------------ plumbing

    def _read_body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while limit is None or len(out) < limit:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                out += self.rfile.read(size)
                self.rfile.readline()
            return bytes(out)
        length = int(self.headers.get("Content-Length") or 0)
        if limit is not None:
            length = min(length, limit)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json; charset=UTF-8",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True  # the client went away (e.g. read timeout)

    def _abort(self) -> None:
        """Close the connection without an answer, with a TCP reset (SO_LINGER 0)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.connection.close()

    # ------------------------------------------------------------------ dispatch

    def _handle(self) -> None:
        stub = self.server.stub
        url = urlsplit(self.path)
        fault = stub._take_fault(self.command)
        if fault is not None and fault.action is FaultAction.RESET:
            body = self._read_body(fault.read_bytes)
            stub._record(self.command, url.path, url.query, dict(self.headers), body, 0)
            self._abort()
            return
        body = self._read_body()
        if fault is not None and fault.action is FaultAction.RESPOND:
            stub._record(self.command, url.path, url.query, dict(self.headers), body, 0)
            headers = dict(fault.headers)
            self._send(fault.status, fault.body, fault.content_type, headers)
            return
        if stub.required_bearer is not None and (
            self.headers.get("Authorization") != f"Bearer {stub.required_bearer}"
        ):
            stub._record(self.command, url.path, url.query, dict(self.headers), body, 0)
            self._send(401, google_error_body(401, "UNAUTHENTICATED", GOOGLE_401_MESSAGE))
            return
        if stub.upstream is not None and url.path.startswith(stub.path_prefix + "/"):
            status, resp_body, content_type = stub._pass_on(
                self.command, url.path[len(stub.path_prefix) :], url.query, dict(self.headers), body
            )
            stub._record(self.command, url.path, url.query, dict(self.headers), body, 0)
            self._send(status, resp_body, content_type)
            return
        status, resp_body, content_type, parts = self._route(url.path, body, fault)
        stub._record(self.command, url.path, url.query, dict(self.headers), body, parts)
        if fault is not None and fault.action is FaultAction.DROP_AFTER_STORE:
            self._abort()
            return
        if (
            fault is not None
            and fault.action is FaultAction.SLOW
            and stub._stopping.wait(fault.delay)
        ):
            self._abort()  # the stub is stopping: do not hold up shutdown
            return
        self._send(status, resp_body, content_type)

    def _route(self, path: str, body: bytes, fault: Fault | None) -> tuple[int, bytes, str, int]:
        stub = self.server.stub
        not_found = (
            404,
            google_error_body(404, "NOT_FOUND", f"path not found: {path}"),
            "application/json; charset=UTF-8",
            0,
        )
        if not path.startswith(stub.path_prefix + "/"):
            return not_found
        rest = [p for p in path[len(stub.path_prefix) :].split("/") if p]
        if self.command == "GET" and rest == ["studies"]:
            return 200, b"[]", "application/dicom+json", 0
        if self.command == "POST" and rest[:1] == ["studies"] and len(rest) <= 2:
            return self._store(body, fault)
        if (
            self.command == "DELETE"
            and len(rest) == 6
            and rest[0::2] == ["studies", "series", "instances"]
        ):
            if stub._delete(rest[5]):
                return 200, b"{}", "application/json; charset=UTF-8", 0
            return (
                404,
                google_error_body(404, "NOT_FOUND", f"instance {rest[5]} not found"),
                "application/json; charset=UTF-8",
                0,
            )
        return not_found

    def _store(self, body: bytes, fault: Fault | None) -> tuple[int, bytes, str, int]:
        stub = self.server.stub
        boundary = _boundary(self.headers.get("Content-Type", ""))
        if boundary is None or not self.headers.get("Content-Type", "").lower().startswith(
            "multipart/related"
        ):
            return (
                415,
                google_error_body(400, "INVALID_ARGUMENT", "expected multipart/related"),
                "application/json; charset=UTF-8",
                0,
            )
        try:
            parts = parse_multipart(body, boundary)
        except ValueError as exc:
            return (
                400,
                google_error_body(400, "INVALID_ARGUMENT", f"bad multipart body: {exc}"),
                "application/json; charset=UTF-8",
                0,
            )
        if (
            fault is not None
            and fault.action is FaultAction.UNNAMED_FAILURE
            and fault.fail_uid in _uids_in(body, self.headers.get("Content-Type", ""))
        ):
            unnamed = {
                "00081197": _element("US", fault.failure_reason),
                "00090010": _element("LO", "GOOGLE"),
                "00091097": _element("LT", "scripted failure without UIDs"),
            }
            response = {"00081198": _element("SQ", unnamed)}
            return 409, json.dumps(response).encode(), "application/dicom+json", len(parts)
        referenced: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        study_uid = ""
        for headers, content in parts:
            try:
                if headers.get("content-type", "").split(";")[0].strip() != "application/dicom":
                    raise InvalidDicomError("part is not application/dicom")
                ds = pydicom.dcmread(io.BytesIO(content), stop_before_pixels=True)
                sop_uid = str(ds.SOPInstanceUID)
                sop_class = str(ds.SOPClassUID)
                study_uid = str(ds.StudyInstanceUID)
            except (InvalidDicomError, AttributeError, ValueError, EOFError, KeyError) as exc:
                failed.append(
                    {
                        "00081197": _element("US", CANNOT_UNDERSTAND),
                        "00090010": _element("LO", "GOOGLE"),
                        "00091097": _element("LT", f"cannot parse DICOM: {exc}"),
                    }
                )
                continue
            ids = {
                "00081150": _element("UI", sop_class),
                "00081155": _element("UI", sop_uid),
            }
            if (
                fault is not None
                and fault.action is FaultAction.PARTIAL_FAILURE
                and sop_uid == fault.fail_uid
            ):
                failed.append(
                    {
                        **ids,
                        "00081197": _element("US", fault.failure_reason),
                        "00090010": _element("LO", "GOOGLE"),
                        "00091097": _element("LT", "scripted failure"),
                    }
                )
                continue
            if stub._put(sop_uid, content):
                referenced.append({**ids, "00081190": _element("UR", stub.instance_url(ds))})
            else:
                failed.append(
                    {
                        **ids,
                        "00081197": _element("US", DUPLICATE_SOP_INSTANCE),
                        "00090010": _element("LO", "GOOGLE"),
                        "00091097": _element("LT", FAILURE_DETAIL_DUPLICATE),
                    }
                )
        response: dict[str, Any] = {}
        if study_uid:
            response["00081190"] = _element("UR", f"{stub.base_url}/studies/{study_uid}")
        if failed:
            response["00081198"] = _element("SQ", *failed)
        if referenced:
            response["00081199"] = _element("SQ", *referenced)
        if fault is not None and fault.action is FaultAction.PARTIAL_FAILURE:
            status = 202
        elif not failed:
            status = 200
        else:
            status = 202 if referenced else 409
        return status, json.dumps(response).encode(), "application/dicom+json", len(parts)


class HealthcareStub:
    """The stub server; a context manager (``start()``/``stop()`` also work).

    ``tls``: an ``ssl.SSLContext`` (server side) to serve HTTPS instead of HTTP.
    """

    def __init__(
        self,
        *,
        project: str = "p",
        location: str = "l",
        dataset: str = "d",
        dicom_store: str = "s",
        required_bearer: str | None = None,
        tls: ssl.SSLContext | None = None,
        upstream: str | None = None,
    ) -> None:
        self.path_prefix = (
            f"/v1/projects/{project}/locations/{location}/datasets/{dataset}"
            f"/dicomStores/{dicom_store}/dicomWeb"
        )
        self.required_bearer = required_bearer
        #: a real DICOMweb root (Orthanc's): requests no fault answers are passed on to it
        self.upstream = upstream.rstrip("/") if upstream else None
        self.stored: dict[str, bytes] = {}
        self.requests: list[RecordedRequest] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._tls = tls
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HealthcareStub:
        """Listen on 127.0.0.1 (a free port) and serve in a background thread."""
        server = _Server(("127.0.0.1", 0), _Handler)
        server.stub = self
        if self._tls is not None:
            server.socket = self._tls.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; slow answers still waiting are dropped."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> HealthcareStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the stub listens on."""
        assert self._server is not None, "stub not started"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """DICOMweb root, like Google's ``.../dicomStores/S/dicomWeb``."""
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{self.path_prefix}"

    def instance_url(self, ds: Any) -> str:
        """WADO-RS URL of an instance, as in a ReferencedSOPSequence item."""
        return (
            f"{self.base_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        )

    # ------------------------------------------------------------------ faults

    def script(self, *faults: Fault) -> None:
        """Queue faults; each request consumes the first matching one."""
        with self._lock:
            self._faults.extend(faults)

    @property
    def fault(self) -> Fault | None:
        """The next queued fault (setting it replaces the whole script)."""
        with self._lock:
            return self._faults[0] if self._faults else None

    @fault.setter
    def fault(self, fault: Fault | None) -> None:
        with self._lock:
            self._faults = [fault] if fault is not None else []

    def pending_faults(self) -> int:
        """How many fault uses remain."""
        with self._lock:
            return sum(f.times for f in self._faults)

    def _take_fault(self, method: str) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.method is None or fault.method == method:
                    fault.times -= 1
                    if fault.times <= 0:
                        del self._faults[i]
                    return fault
            return None

    # ------------------------------------------------------------------ state

    def _record(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        parts: int,
    ) -> None:
        uids = _uids_in(body, headers.get("Content-Type", "")) if method == "POST" else ()
        with self._lock:
            self.requests.append(
                RecordedRequest(method, path, parse_qs(query), headers, len(body), parts, uids)
            )

    def _pass_on(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, str]:
        """One request to ``upstream``, as the stub received it (the stub as Google's front
        door to a real store: its faults are the door's, the storing is the store's)."""
        import requests

        assert self.upstream is not None
        kept = {k: v for k, v in headers.items() if k.lower() in ("content-type", "accept")}
        with requests.Session() as session:
            session.trust_env = False  # loopback only, never a proxy
            answer = session.request(
                method,
                f"{self.upstream}{path}" + (f"?{query}" if query else ""),
                data=body,
                headers=kept,
                timeout=60,
            )
        content_type = answer.headers.get("Content-Type", "application/octet-stream")
        return answer.status_code, answer.content, content_type

    def _put(self, sop_uid: str, content: bytes) -> bool:
        """Store; False when the UID is stored with different bytes."""
        with self._lock:
            existing = self.stored.get(sop_uid)
            if existing is not None and existing != content:
                return False
            self.stored[sop_uid] = content
            return True

    def _delete(self, sop_uid: str) -> bool:
        with self._lock:
            return self.stored.pop(sop_uid, None) is not None

    def authorizations(self) -> list[str | None]:
        """The Authorization header of every recorded request, in order."""
        with self._lock:
            return [r.header("Authorization") for r in self.requests]
