"""A DICOMweb read client: QIDO-RS searches page by page, WADO-RS instances streamed.

Authentication and the CA bundle come from the caller (a ``requests.auth.AuthBase``), so
this package knows nothing of how credentials are configured. Every failure is raised as
:class:`DicomwebError`, which carries the HTTP status (``None`` when the store could not
be reached) and the start of the body, for the caller to map onto DIMSE statuses.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Final
from urllib.parse import quote, urlencode

import requests
import requests.adapters
import requests.auth
import urllib3.exceptions

from stowaway.dicomweb.multipart import MultipartError, boundary_of, read_parts
from stowaway.text import first_line

DICOM_JSON: Final = "application/dicom+json"
#: Instances as stored (``transfer-syntax=*``), so what is retrieved is what was sent.
WADO_ACCEPT: Final = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: Bytes read from the network at a time.
CHUNK_SIZE: Final = 256 * 1024
#: An error body is read up to this many bytes.
ERROR_BODY_LIMIT: Final = 64 * 1024
#: A QIDO page is refused beyond this size (a page is JSON, parsed whole).
PAGE_BYTES_LIMIT: Final = 64 * 1024 * 1024

#: Characters of QIDO-RS values sent unescaped: the wildcards and the UID-list comma.
_LITERAL: Final = "*?,"

#: Query resources by level.
STUDIES, SERIES, INSTANCES = "studies", "series", "instances"

_NETWORK_ERRORS: Final = (
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


class DicomwebError(Exception):
    """A QIDO-RS or WADO-RS request failed.

    ``status`` is the HTTP status, or ``None`` when no answer came (refused, reset,
    timed out, TLS failure); ``body`` the start of the answer's body.
    """

    def __init__(self, message: str, *, status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class ReaderConfig:
    """Where the store is and how long to wait for it."""

    base_url: str
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    ca_bundle: str | None = None
    user_agent: str = "stowaway"
    #: Adds ``fuzzymatching=true`` to every search.
    fuzzy_matching: bool = False


class DicomwebReader:
    """One pooled HTTP session to a DICOMweb store; safe to share between threads."""

    def __init__(self, config: ReaderConfig, auth: requests.auth.AuthBase | None) -> None:
        self.config = config
        self._base = config.base_url.rstrip("/")
        self._session = requests.Session()
        self._session.trust_env = False  # no proxy or .netrc surprises; auth is explicit
        self._session.auth = auth
        self._session.verify = config.ca_bundle or True
        self._session.headers["User-Agent"] = config.user_agent
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def close(self) -> None:
        self._session.close()

    # ------------------------------------------------------------------ QIDO-RS

    def search(
        self,
        resource: str,
        params: Sequence[tuple[str, str]],
        *,
        page_size: int,
    ) -> Iterator[list[dict[str, Any]]]:
        """QIDO-RS ``GET {base}/{resource}?params&limit=&offset=``, one list per page.

        Pages are fetched only as the caller asks for them, so a caller that stops (a
        C-CANCEL, a limit) stops the paging. The last page is the first one shorter than
        ``page_size``; a store that ignores ``limit`` answers everything in one page, one
        that ignores ``offset`` is an error rather than an endless loop.
        """
        query = list(params)
        if self.config.fuzzy_matching:
            query.append(("fuzzymatching", "true"))
        offset = 0
        first: dict[str, Any] | None = None
        while True:
            paging = [("limit", str(page_size)), ("offset", str(offset))]
            page = self._page(resource, [*query, *paging])
            if offset and page and page[0] == first:
                # Paging again from the start would never end.
                raise DicomwebError("the store ignores QIDO-RS offset: it repeats page one")
            if page:
                yield page
            if len(page) != page_size:
                # Shorter: the last page. Longer: the store ignores limit and sent it all.
                return
            first = first or page[0]
            offset += len(page)

    def _page(self, resource: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        # Wildcards and UID-list commas go as they are: some stores (Orthanc 1.10 with its
        # DICOMweb plugin 1.7) match on the raw text and never find "STOW%2A".
        query = urlencode(params, safe=_LITERAL, quote_via=quote)
        response = self._get(f"{self._base}/{resource}?{query}", accept=DICOM_JSON)
        with response:
            if response.status_code == 204:
                return []
            body = self._read_limited(response, PAGE_BYTES_LIMIT, "a QIDO-RS page")
        try:
            page = json.loads(body) if body.strip() else []
        except ValueError as exc:
            raise DicomwebError(f"QIDO-RS answer is not JSON: {first_line(exc)}") from None
        if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
            raise DicomwebError("QIDO-RS answer is not a JSON array of objects")
        return page

    # ------------------------------------------------------------------ WADO-RS

    def retrieve_instance(self, study: str, series: str, instance: str, sink: BinaryIO) -> int:
        """WADO-RS one instance into ``sink`` (the Part-10 bytes); returns the bytes written.

        The answer is read in chunks and its multipart envelope taken apart as it comes.
        """
        path = "/".join(
            (
                "studies",
                quote(study, safe=""),
                "series",
                quote(series, safe=""),
                "instances",
                quote(instance, safe=""),
            )
        )
        response = self._get(f"{self._base}/{path}", accept=WADO_ACCEPT)
        written = 0

        class _Counting:
            def write(self, data: bytes) -> int:
                nonlocal written
                written += len(data)
                return sink.write(data)

        counting: Any = _Counting()
        with response:
            content_type = response.headers.get("Content-Type", "")
            chunks = self._chunks(response)
            try:
                if content_type.lower().startswith("application/dicom"):
                    for chunk in chunks:
                        counting.write(chunk)
                    parts = 1
                else:
                    parts = read_parts(chunks, boundary_of(content_type), lambda _h: counting)
            except MultipartError as exc:
                raise DicomwebError(f"WADO-RS answer unreadable: {exc}") from None
        if parts != 1:
            raise DicomwebError(f"WADO-RS answered {parts} parts for one instance")
        return written

    # ------------------------------------------------------------------ HTTP

    def _get(
        self,
        url: str,
        *,
        accept: str,
    ) -> requests.Response:
        try:
            response = self._session.get(
                url,
                headers={"Accept": accept},
                timeout=(self.config.connect_timeout, self.config.read_timeout),
                stream=True,
            )
        except _NETWORK_ERRORS as exc:
            raise DicomwebError(f"store unreachable: {_network_cause(exc)}") from None
        if response.status_code >= 300:
            with response:
                body = self._read_limited(response, ERROR_BODY_LIMIT, "an error", truncate=True)
            raise DicomwebError(
                f"HTTP {response.status_code} {response.reason or ''}".strip(),
                status=response.status_code,
                body=body,
            )
        return response

    def _chunks(self, response: requests.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_content(CHUNK_SIZE)
        except _NETWORK_ERRORS as exc:
            raise DicomwebError(f"store connection lost: {_network_cause(exc)}") from None

    def _read_limited(
        self, response: requests.Response, limit: int, what: str, *, truncate: bool = False
    ) -> bytes:
        body = bytearray()
        for chunk in self._chunks(response):
            body += chunk
            if len(body) > limit:
                if truncate:
                    return bytes(body[:limit])
                raise DicomwebError(f"{what} is larger than {limit} bytes")
        return bytes(body)


def _network_cause(exc: BaseException) -> str:
    """The innermost cause's first line: 'Connection refused', 'Read timed out.'..."""
    seen: set[int] = set()
    current: BaseException | None = exc
    cause = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        cause = current
        nested = current.args[0] if current.args else None
        if isinstance(nested, BaseException):
            current = nested
            continue
        reason = getattr(current, "reason", None)
        current = reason if isinstance(reason, BaseException) else current.__cause__
    text = first_line(cause)
    if isinstance(exc, requests.exceptions.Timeout) or "timed out" in text.lower():
        return f"timed out ({text})"
    return text
