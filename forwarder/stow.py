"""DICOMweb STOW-RS client: streams spooled Part-10 files to the destination.

One :class:`StowClient` (one pooled ``requests.Session``) per worker thread. HTTP and
network failures never raise: every call returns outcomes from
:mod:`forwarder.outcome`. Only programmer errors (bad arguments) raise.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final
from urllib.parse import quote, urlsplit

import requests
import requests.adapters
import requests.auth
import urllib3.exceptions
from google.auth import exceptions as google_exceptions

from stowaway.forwarder.auth import CredentialsError
from stowaway.forwarder.outcome import (
    InstanceOutcome,
    OutcomeKind,
    classify_exception,
    classify_http,
    classify_response,
)

#: Size of the pieces the request body is read from spool files and sent in.
CHUNK_SIZE: Final = 1 << 20
#: Response bodies are read up to this many bytes; the rest is dropped.
RESPONSE_LIMIT: Final = 1 << 20

DICOM_JSON: Final = "application/dicom+json"

# What requests/urllib3/google-auth raise for network, protocol and credential trouble;
# anything else escaping is a bug and propagates.
_EXPECTED_ERRORS: Final = (
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
    CredentialsError,
    google_exceptions.GoogleAuthError,
)


def _version() -> str:
    try:
        return importlib.metadata.version("stowaway")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


#: Default User-Agent header.
USER_AGENT: Final = f"stowaway/{_version()}"


@dataclass(frozen=True)
class UploadItem:
    """One spooled instance to upload.

    ``size_bytes`` is what the queue recorded; the body is built from the file's size
    when it is opened, so the Content-Length is always right.
    """

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path
    size_bytes: int
    #: For a DIMSE destination, which proposes a context per SOP class and syntax.
    sop_class_uid: str = ""
    transfer_syntax_uid: str = ""
    #: A body made on the way out (a redacted copy, streamed): ``size_bytes`` long,
    #: ``seek(0)`` starts it over. None: the file at ``path`` is sent.
    opener: Callable[[], BinaryIO] | None = None


class MultipartBody:
    """A ``multipart/related; type="application/dicom"`` body streamed from open files.

    A file-like object (``read(n)``) with ``__len__`` so requests sends a Content-Length
    and never chunked transfer encoding, and never holds more than one read in memory.
    The files stay owned (and closed) by the caller.
    """

    def __init__(self, boundary: str, files: Sequence[tuple[BinaryIO, int]]) -> None:
        delimiter = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        self._segments: list[bytes | tuple[BinaryIO, int]] = []
        for i, (f, size) in enumerate(files):
            self._segments.append(delimiter if i == 0 else b"\r\n" + delimiter)
            self._segments.append((f, size))
        self._segments.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
        self._length = sum(len(seg) if isinstance(seg, bytes) else seg[1] for seg in self._segments)
        self._index = 0
        self._offset = 0  # within the current segment

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all the rest when negative); ``b""`` only at the end."""
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(CHUNK_SIZE), b""))
        while self._index < len(self._segments):
            seg = self._segments[self._index]
            seg_len = len(seg) if isinstance(seg, bytes) else seg[1]
            left = seg_len - self._offset
            if left <= 0:
                self._index += 1
                self._offset = 0
                continue
            want = min(size, left)
            if isinstance(seg, bytes):
                data = seg[self._offset : self._offset + want]
            else:
                data = seg[0].read(want)
                if not data:
                    # The Content-Length is already promised; a short body would hang
                    # the destination. Abort the request instead.
                    raise OSError(f"spool file shrank during upload ({left} bytes missing)")
            self._offset += len(data)
            return data
        return b""

    def __iter__(self) -> Iterator[bytes]:
        return iter(lambda: self.read(CHUNK_SIZE), b"")


class _Adapter(requests.adapters.HTTPAdapter):
    """HTTPAdapter whose connections send request bodies in CHUNK_SIZE pieces."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        pool_kwargs.setdefault("blocksize", CHUNK_SIZE)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs.setdefault("blocksize", CHUNK_SIZE)
        return super().proxy_manager_for(proxy, **proxy_kwargs)


def _read_limited(response: requests.Response, limit: int = RESPONSE_LIMIT) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_content(64 * 1024):
        chunks.append(chunk[: limit - total])
        total += len(chunks[-1])
        if total >= limit:
            break
    return b"".join(chunks)


class StowClient:
    """STOW-RS (and DELETE, probe) against one DICOMweb base URL.

    ``base_url`` is the DICOMweb root, e.g.
    ``https://healthcare.googleapis.com/v1/projects/P/locations/L/datasets/D/dicomStores/S/dicomWeb``
    (a trailing slash is ignored). TLS certificates are always verified, against
    ``ca_bundle`` when given, else the default trust store; there is no way to turn
    verification off.
    """

    def __init__(
        self,
        base_url: str,
        auth: requests.auth.AuthBase | None = None,
        *,
        connect_timeout: float = 10,
        read_timeout: float = 120,
        ca_bundle: str | None = None,
        user_agent: str = USER_AGENT,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL, got {parts.scheme or '?'}://…")
        if parts.username or parts.password:
            raise ValueError("base_url must not carry credentials; use the auth settings")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if ca_bundle is not None and not os.path.exists(ca_bundle):
            raise ValueError(f"ca_bundle {ca_bundle} does not exist")
        self.base_url = base_url.rstrip("/")
        self._timeout = (float(connect_timeout), float(read_timeout))
        # Passed on every request: a session-level verify would lose to
        # REQUESTS_CA_BUNDLE from the environment (requests issue #3829).
        self._verify: str | bool = ca_bundle or True
        session = requests.Session()
        session.mount("https://", _Adapter())
        session.mount("http://", _Adapter())
        session.auth = auth
        session.headers["User-Agent"] = user_agent
        self._session = session

    @property
    def verify(self) -> str | bool:
        """What TLS certificates are checked against: a CA bundle path, or True."""
        return self._verify

    def __enter__(self) -> StowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    def __repr__(self) -> str:
        return f"StowClient({self.base_url!r})"

    # ------------------------------------------------------------------ requests

    def _request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: Callable[[], Any] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """Send one request; returns status, headers and (capped) body, or raises one of
        ``_EXPECTED_ERRORS``.

        ``body`` makes the request's body, from its start, each time it is sent:
        a 401 to credentials that can be refreshed (Google's) sends the request
        once more with a new token before the answer counts.
        """
        status, resp_headers, content, sent_with = self._send(method, url, headers, body)
        if status == 401 and self._refreshed(sent_with):
            status, resp_headers, content, _ = self._send(method, url, headers, body)
        return status, resp_headers, content

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: Callable[[], Any] | None,
    ) -> tuple[int, Mapping[str, str], bytes, str | None]:
        response = self._session.request(
            method,
            url,
            data=body() if body is not None else None,
            headers=dict(headers),
            timeout=self._timeout,
            verify=self._verify,
            allow_redirects=False,
            stream=True,
        )
        try:
            content = _read_limited(response)
        finally:
            response.close()
        sent_with = response.request.headers.get("Authorization")
        return response.status_code, response.headers, content, sent_with

    def _refreshed(self, rejected_authorization: str | None) -> bool:
        """Whether the credentials could be renewed after a 401 to ``rejected_authorization``."""
        refresh = getattr(self._session.auth, "refresh_after_rejection", None)
        return refresh is not None and bool(refresh(rejected_authorization))

    def store(self, items: Sequence[UploadItem]) -> dict[str, InstanceOutcome]:
        """Upload ``items`` in one STOW-RS request; an outcome per SOP Instance UID.

        Items whose file cannot be opened get their own outcome (PERMANENT) and are left
        out of the request. Network and HTTP failures become outcomes, never exceptions.
        """
        uids = [item.sop_instance_uid for item in items]
        if len(set(uids)) != len(uids):
            raise ValueError("duplicate SOP Instance UIDs in one upload")
        results: dict[str, InstanceOutcome] = {}
        opened: list[tuple[UploadItem, BinaryIO, int]] = []
        try:
            for item in items:
                try:
                    if item.opener is not None:
                        opened.append((item, item.opener(), item.size_bytes))
                        continue
                    f: BinaryIO = open(item.path, "rb")  # noqa: SIM115 -- closed in finally
                except OSError as exc:
                    results[item.sop_instance_uid] = classify_exception(exc)
                    continue
                opened.append((item, f, os.fstat(f.fileno()).st_size))
            if opened:
                results.update(self._post(opened))
        finally:
            for _, f, _ in opened:
                f.close()
        return {uid: results[uid] for uid in uids}

    def _post(
        self, opened: Sequence[tuple[UploadItem, BinaryIO, int]]
    ) -> dict[str, InstanceOutcome]:
        uids = [item.sop_instance_uid for item, _, _ in opened]
        boundary = f"stowaway-{uuid.uuid4().hex}"

        def body() -> MultipartBody:
            for _, f, _ in opened:
                f.seek(0)
            return MultipartBody(boundary, [(f, size) for _, f, size in opened])

        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": DICOM_JSON,
        }
        try:
            status, resp_headers, content = self._request(
                "POST", f"{self.base_url}/studies", headers=headers, body=body
            )
        except _EXPECTED_ERRORS as exc:
            return dict.fromkeys(uids, classify_exception(exc))
        return classify_http(status, resp_headers, content, uids)

    def delete_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> InstanceOutcome:
        """DICOMweb DELETE of one instance; 200/202/204/404 (gone either way) are SUCCESS."""
        path = "/".join(
            quote(part, safe="")
            for part in ("studies", study_uid, "series", series_uid, "instances", sop_uid)
        )
        try:
            status, headers, content = self._request(
                "DELETE", f"{self.base_url}/{path}", headers={"Accept": DICOM_JSON}
            )
        except _EXPECTED_ERRORS as exc:
            return classify_exception(exc)
        if status in (200, 202, 204):
            return InstanceOutcome(OutcomeKind.SUCCESS, f"deleted (HTTP {status})", status)
        if status == 404:
            return InstanceOutcome(OutcomeKind.SUCCESS, "not present (HTTP 404)", status)
        return classify_response(status, headers, content)

    def probe(self) -> InstanceOutcome:
        """A cheap authenticated request (``GET studies?limit=1``), classified like an
        upload: SUCCESS when the destination answers 2xx."""
        try:
            status, headers, content = self._request(
                "GET", f"{self.base_url}/studies?limit=1", headers={"Accept": DICOM_JSON}
            )
        except _EXPECTED_ERRORS as exc:
            return classify_exception(exc)
        return classify_response(status, headers, content)
