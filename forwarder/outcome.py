"""The outcome table: what a destination's answer means for each instance.

Pure functions, no I/O. Every upload attempt ends in one :class:`InstanceOutcome`
per instance, of one of five kinds:

* ``SUCCESS``   -- the destination holds the instance; it may leave the spool.
* ``CONFLICT``  -- the destination refused *this instance* (same UID with different
  bytes, data set not understood, ...); re-sending the same bytes will not help.
* ``TRANSIENT`` -- try again later with backoff (``retry_after`` seconds when the
  destination said so with a Retry-After header).
* ``BLOCKED``   -- the *destination*, not the instance, is at fault (401/403, bad
  credentials, untrusted TLS certificate, bad URL): stop sending to it and probe
  until it recovers. ``detail`` names the cause and the fix.
* ``PERMANENT`` -- the request can never succeed as sent (other 4xx, 3xx).

HTTP status table (``HTTP_STATUS_TABLE``; the first matching row wins):

=================  ============  ===========================================================
HTTP status        Kind          Notes
=================  ============  ===========================================================
200                per instance  Instance in ReferencedSOPSequence (0008,1199) -> SUCCESS;
                                 in FailedSOPSequence (0008,1198) -> by FailureReason (below).
                                 No parsable body, or a body with neither sequence -> SUCCESS
                                 for all (some servers answer 200 with no body).
202, other 2xx     per instance  As 200, but an instance in neither sequence -> TRANSIENT
                                 ("not confirmed stored"): a 202 only promises *some* stored.
3xx                PERMANENT     Redirects are not followed for uploads.
401, 403           BLOCKED       Detail from :func:`explain_permission_error`.
408                TRANSIENT     Request timeout.
409                CONFLICT      Per instance when the body lists it in FailedSOPSequence
                                 (an A7xx reason there is still TRANSIENT).
429                TRANSIENT     Honours Retry-After.
other 4xx          PERMANENT     Detail: the status and the destination's message.
5xx                TRANSIENT     Honours Retry-After (503).
anything else      PERMANENT     Not HTTP as we know it.
=================  ============  ===========================================================

FailureReason (0008,1197) of a FailedSOPSequence item:

* ``0xA700``-``0xA7FF`` (refused: out of resources) -> TRANSIENT.
* anything else (``0x0110`` processing failure, ``0x0111`` duplicate SOP instance,
  ``0x0122`` SOP class not supported, ``0xA9xx``, ``0xCxxx``, ...) -> CONFLICT.
  The detail keeps the reason in hex and the destination's text: Google's FailureDetail
  is a private LT element, creator ``GOOGLE`` in group 0009 at element offset 0x97
  (``(0009,1097)`` when the creator sits at (0009,0010)); failing that, any other
  text-valued element in the item, or ErrorComment (0000,0902).

A 200/202/409 body that lists the instance by UID always decides for that instance,
whatever the others' fate (partial success is per instance). Instances a body does not
name: if the body has failed items *without* a SOP Instance UID and exactly one instance
is unnamed, that failure is its own; if several are unnamed, they are TRANSIENT and
``alone`` (the forwarder sends each again in a request of its own, at once); if the body
names other instances but not this one, TRANSIENT; if the body names none at all, the
row's kind applies (a 409 for several instances is also ``alone``).

Network failures (:func:`classify_exception`): connection refused or reset, DNS
failure, connect or read timeout, chunked-encoding/protocol errors -> TRANSIENT; an
untrusted TLS certificate, an invalid URL or unobtainable Google credentials -> BLOCKED;
an unreadable spool file -> PERMANENT.

Details come only from response bodies and exception texts (URLs with any userinfo or
token redacted), never from headers, so secrets cannot leak into them.
"""

from __future__ import annotations

import email.utils
import enum
import http.client
import json
import re
import socket
import ssl
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

import requests
import urllib3.exceptions
from google.auth import exceptions as google_exceptions

from stowaway.forwarder.auth import CredentialsError


class OutcomeKind(enum.StrEnum):
    """What happened to one instance; see the module docstring."""

    SUCCESS = "success"
    CONFLICT = "conflict"
    TRANSIENT = "transient"
    BLOCKED = "blocked"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class InstanceOutcome:
    """The outcome of one upload attempt for one instance (or of a probe/delete).

    ``retry_after`` is in seconds, from a Retry-After header (delta-seconds or
    HTTP-date), and only set on TRANSIENT outcomes of answers that carried one.
    ``alone``: the answer to a request of several instances could not be pinned
    on this one; it should be sent again in a request of its own at once.
    """

    kind: OutcomeKind
    detail: str
    http_status: int | None = None
    retry_after: float | None = None
    alone: bool = False


@dataclass(frozen=True)
class StatusRule:
    """One row of :data:`HTTP_STATUS_TABLE`: statuses ``low..high`` map to ``kind``.

    With ``per_instance`` the body's ReferencedSOPSequence/FailedSOPSequence decide for
    the instances it names and ``kind`` is only for instances it does not name.
    """

    low: int
    high: int
    kind: OutcomeKind
    per_instance: bool
    note: str

    def matches(self, status: int) -> bool:
        """Whether this row covers ``status``."""
        return self.low <= status <= self.high


_K = OutcomeKind

#: The HTTP status table, in order; the first matching row wins. The README copies it.
HTTP_STATUS_TABLE: Final[tuple[StatusRule, ...]] = (
    StatusRule(200, 200, _K.SUCCESS, True, "stored"),
    StatusRule(202, 202, _K.TRANSIENT, True, "partly stored"),
    StatusRule(201, 299, _K.TRANSIENT, True, "unusual success status, read as 202"),
    StatusRule(300, 399, _K.PERMANENT, False, "redirect, not followed for uploads"),
    StatusRule(401, 401, _K.BLOCKED, False, "unauthenticated"),
    StatusRule(403, 403, _K.BLOCKED, False, "forbidden"),
    StatusRule(408, 408, _K.TRANSIENT, False, "request timeout"),
    StatusRule(409, 409, _K.CONFLICT, True, "conflict"),
    StatusRule(429, 429, _K.TRANSIENT, False, "rate limited"),
    StatusRule(400, 499, _K.PERMANENT, False, "client error"),
    StatusRule(500, 599, _K.TRANSIENT, False, "server error"),
    StatusRule(0, 2**31, _K.PERMANENT, False, "not a known HTTP status class"),
)

#: FailureReason values 0xA700-0xA7FF mean "refused: out of resources" (PS3.18 I.2-2).
OUT_OF_RESOURCES: Final = range(0xA700, 0xA800)

_FAILURE_REASON_NAMES: Final[Mapping[int, str]] = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xC122: "transfer syntax not supported",
}

# DICOM JSON tags.
_REFERENCED_SOP_SEQUENCE: Final = "00081199"
_FAILED_SOP_SEQUENCE: Final = "00081198"
_REFERENCED_SOP_CLASS_UID: Final = "00081150"
_REFERENCED_SOP_INSTANCE_UID: Final = "00081155"
_FAILURE_REASON: Final = "00081197"
_WARNING_REASON: Final = "00081196"
_ERROR_COMMENT: Final = "00000902"
_TEXT_VRS: Final = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})

_DETAIL_MAX: Final = 500


# --------------------------------------------------------------------------- helpers


def _one_line(text: str, limit: int) -> str:
    """Collapse whitespace (a detail is one log line) and cut to ``limit`` chars."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_USERINFO_RE: Final = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s@]*@")
_TOKEN_PARAM_RE: Final = re.compile(
    r"(?i)\b(access_token|token|key|password|passwd|secret|signature)=[^&\s'\")]+"
)


def _redact(text: str) -> str:
    """Drop userinfo and token-like query parameters from URLs inside ``text``."""
    text = _USERINFO_RE.sub(r"\1***@", text)
    return _TOKEN_PARAM_RE.sub(r"\1=***", text)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup that works for plain dicts too."""
    value = headers.get(name)
    if value is not None:
        return value
    lname = name.lower()
    for key, val in headers.items():
        if key.lower() == lname:
            return val
    return None


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date).

    Returns ``None`` when absent or unparsable; a date in the past gives ``0.0``.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN is not a delay
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


def _norm_uid(uid: str) -> str:
    """UIDs compare without padding (DICOM pads odd-length UIDs with NUL)."""
    return uid.strip("\x00 \t\r\n")


def _decode(body: bytes | str) -> str:
    if isinstance(body, str):
        return body
    return body.decode("utf-8", errors="replace")


def _json(body: bytes | str) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class _GoogleError:
    code: int | None
    status: str
    message: str
    reasons: tuple[str, ...]


def _google_error(body: bytes | str) -> _GoogleError | None:
    """Parse Google's ``{"error": {"code", "message", "status", "details"}}`` body."""
    data = _json(body)
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]  # some Google front ends wrap the error in a list
    if not isinstance(data, dict) or not isinstance(data.get("error"), dict):
        return None
    err = data["error"]
    reasons: list[str] = []
    details = err.get("details")
    if isinstance(details, list):
        for d in details:
            if isinstance(d, dict) and isinstance(d.get("reason"), str):
                reasons.append(d["reason"])
    code = err.get("code")
    return _GoogleError(
        code=code if isinstance(code, int) else None,
        status=str(err.get("status") or ""),
        message=str(err.get("message") or ""),
        reasons=tuple(reasons),
    )


def _values(element: Any) -> list[Any]:
    if isinstance(element, dict):
        value = element.get("Value")
        if isinstance(value, list):
            return value
    return []


def _text_of(element: Any) -> str | None:
    if not isinstance(element, dict) or element.get("vr") not in _TEXT_VRS:
        return None
    texts = [str(v) for v in _values(element) if isinstance(v, str | int | float)]
    joined = "; ".join(t for t in texts if t.strip())
    return joined or None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0) if value.lower().startswith("0x") else int(value)
        except ValueError:
            return None
    return None


def _dicom_json_message(data: Any) -> str | None:
    """ErrorComment (0000,0902) of a DICOM JSON body, or Orthanc's Message/Details."""
    datasets = data if isinstance(data, list) else [data]
    for ds in datasets:
        if not isinstance(ds, dict):
            continue
        text = _text_of(ds.get(_ERROR_COMMENT))
        if text:
            return text
        # Orthanc answers errors with {"HttpError", "Message", "Details", ...}.
        parts = [str(ds[k]) for k in ("Message", "Details") if isinstance(ds.get(k), str)]
        if parts:
            return ": ".join(parts)
    return None


def _body_message(body: bytes | str, limit: int = 300) -> str:
    """The destination's own words: Google error, DICOM JSON, or the start of the text."""
    google = _google_error(body)
    if google is not None and (google.message or google.status):
        return _one_line(f"{google.status}, {google.message}".strip(", "), limit)
    dicom = _dicom_json_message(_json(body))
    if dicom:
        return _one_line(dicom, limit)
    return _one_line(_decode(body), limit)


# ------------------------------------------------------------ STOW-RS response report


@dataclass(frozen=True)
class _Failure:
    reason: int | None
    text: str | None


@dataclass
class _StoreReport:
    """What a DICOM JSON Store Instances Response says, per instance."""

    parsed: bool = False
    referenced: dict[str, str | None] = field(default_factory=dict)  # uid -> warning
    failed: dict[str, _Failure] = field(default_factory=dict)
    anonymous: list[_Failure] = field(default_factory=list)  # failed items without a UID
    message: str | None = None

    @property
    def names_any(self) -> bool:
        return bool(self.referenced or self.failed)


def _is_private_creator(tag: str) -> bool:
    try:
        group, element = int(tag[:4], 16), int(tag[4:], 16)
    except ValueError:
        return False
    return len(tag) == 8 and group % 2 == 1 and 0x10 <= element <= 0xFF


def _failure_text(item: Mapping[str, Any]) -> str | None:
    """FailureDetail-like text of a FailedSOPSequence item.

    Google's FailureDetail is a private LT element of creator ``GOOGLE`` in group 0009
    at offset 0x97; failing that, any text element other than the UIDs and the reason.
    """
    for tag, element in item.items():
        # Private creator elements are (gggg,0010)-(gggg,00FF); block xx -> (gggg,xx97).
        if _is_private_creator(tag) and tag.upper().startswith("0009"):
            creator = _text_of(element)
            if creator and creator.strip().upper() == "GOOGLE":
                block = tag[6:].upper()
                text = _text_of(item.get(f"0009{block}97") or item.get(f"0009{block.lower()}97"))
                if text:
                    return text
    texts: list[str] = []
    for tag, element in sorted(item.items()):
        if tag in (_REFERENCED_SOP_CLASS_UID, _REFERENCED_SOP_INSTANCE_UID, _FAILURE_REASON):
            continue
        if _is_private_creator(tag):
            continue  # a private creator's name is not a detail
        text = _text_of(element)
        if text:
            texts.append(text)
    return "; ".join(texts) or None


def _parse_store_report(body: bytes) -> _StoreReport:
    report = _StoreReport()
    data = _json(body)
    if isinstance(data, list):  # a few servers wrap the response data set in a list
        data = next((d for d in data if isinstance(d, dict)), None)
    if not isinstance(data, dict):
        return report
    report.parsed = True
    report.message = _dicom_json_message(data)
    for item in _values(data.get(_REFERENCED_SOP_SEQUENCE)):
        if not isinstance(item, dict):
            continue
        uids = _values(item.get(_REFERENCED_SOP_INSTANCE_UID))
        if uids and isinstance(uids[0], str):
            warnings = _values(item.get(_WARNING_REASON))
            warning = _as_int(warnings[0]) if warnings else None
            report.referenced[_norm_uid(uids[0])] = f"0x{warning:04X}" if warning else None
    for item in _values(data.get(_FAILED_SOP_SEQUENCE)):
        if not isinstance(item, dict):
            continue
        reasons = _values(item.get(_FAILURE_REASON))
        failure = _Failure(
            reason=_as_int(reasons[0]) if reasons else None,
            text=_failure_text(item) or report.message,
        )
        uids = _values(item.get(_REFERENCED_SOP_INSTANCE_UID))
        if uids and isinstance(uids[0], str):
            report.failed[_norm_uid(uids[0])] = failure
        else:
            report.anonymous.append(failure)
    return report


def _reason_label(reason: int) -> str:
    name = _FAILURE_REASON_NAMES.get(reason)
    if name is None:
        if reason in OUT_OF_RESOURCES:
            name = "refused: out of resources"
        elif 0xA900 <= reason <= 0xA9FF:
            name = "data set does not match SOP class"
        elif 0xC000 <= reason <= 0xCFFF:
            name = "cannot understand"
    hexed = f"0x{reason:04X}"
    return f"{hexed} ({name})" if name else hexed


def _failure_outcome(failure: _Failure, status: int, retry_after: float | None) -> InstanceOutcome:
    if failure.reason is None:
        label = "FailedSOPSequence without FailureReason"
    else:
        label = f"FailureReason {_reason_label(failure.reason)}"
    detail = f"HTTP {status}: {label}"
    if failure.text:
        detail += f": {failure.text}"
    detail = _one_line(detail, _DETAIL_MAX)
    if failure.reason is not None and failure.reason in OUT_OF_RESOURCES:
        return InstanceOutcome(_K.TRANSIENT, detail, status, retry_after)
    return InstanceOutcome(_K.CONFLICT, detail, status)


# ---------------------------------------------------------------- 401/403 explained


@dataclass(frozen=True)
class PermissionCause:
    """A known cause of a 401/403 and its fix, recognised from Google's error body."""

    pattern: re.Pattern[str]
    reasons: frozenset[str]
    explanation: str


#: Known 401/403 causes, from Google's guide "Connecting a PACS to the Cloud Healthcare
#: API" (the first three) and Google's standard 401 bodies. Matched on the message text or
#: on the ``google.rpc.ErrorInfo`` reason in ``details``.
PERMISSION_CAUSES: Final[tuple[PermissionCause, ...]] = (
    PermissionCause(
        re.compile(r"Cloud Healthcare API has not been used in project|SERVICE_DISABLED", re.I),
        frozenset({"SERVICE_DISABLED"}),
        "Cloud Healthcare API is not enabled in the project: enable healthcare.googleapis.com",
    ),
    PermissionCause(
        re.compile(r"insufficient authentication scopes", re.I),
        frozenset({"ACCESS_TOKEN_SCOPE_INSUFFICIENT"}),
        "credentials lack the https://www.googleapis.com/auth/cloud-healthcare OAuth scope: "
        "recreate the node pool/cluster with "
        "--scopes=https://www.googleapis.com/auth/cloud-healthcare or use Workload Identity",
    ),
    PermissionCause(
        re.compile(r"Permission '?healthcare\.dicomStores\.", re.I),
        frozenset({"IAM_PERMISSION_DENIED"}),
        "the service account lacks roles/healthcare.dicomEditor on the DICOM store: grant it",
    ),
    PermissionCause(
        re.compile(r"missing required authentication credential", re.I),
        frozenset({"CREDENTIALS_MISSING"}),
        "no credentials were sent: configure Google authentication for this destination",
    ),
    PermissionCause(
        re.compile(r"invalid authentication credentials", re.I),
        frozenset({"ACCESS_TOKEN_TYPE_UNSUPPORTED", "ACCESS_TOKEN_EXPIRED"}),
        "the destination rejected the access token as invalid or expired: "
        "check the credentials the forwarder runs with",
    ),
)


def explain_permission_error(status: int, body: bytes | str) -> str:
    """Plain-words cause and fix for a 401/403 answer, from its body only.

    Known Google causes give ``"<cause>: <fix> [Http_403, PERMISSION_DENIED, <first 40
    chars of message>]"`` -- the bracketed short form is what Google's own DICOM adapter
    logs, so operators can grep for it. Unknown bodies give the status and the first 200
    characters of the message.
    """
    google = _google_error(body)
    if google is not None:
        short = f"Http_{status}, {google.status or 'UNKNOWN'}"
        for cause in PERMISSION_CAUSES:
            if cause.reasons.intersection(google.reasons) or cause.pattern.search(google.message):
                return _one_line(f"{cause.explanation} [{short}, {google.message[:40]}]", 600)
        return _one_line(f"destination refused access [{short}, {google.message[:200]}]", 600)
    text = _body_message(body, 200)
    what = (
        "credentials missing or rejected: check the configured authentication"
        if status == 401
        else "access denied: check the account's permissions on the destination"
    )
    return _one_line(f"HTTP {status}: {what}" + (f" [{text}]" if text else ""), 600)


# ------------------------------------------------------------------ classification


def rule_for(status: int) -> StatusRule:
    """The :data:`HTTP_STATUS_TABLE` row for ``status``."""
    return next(rule for rule in HTTP_STATUS_TABLE if rule.matches(status))


def classify_response(status: int, headers: Mapping[str, str], body: bytes) -> InstanceOutcome:
    """One outcome for a whole answer, without per-instance reading (probe, delete).

    Any 2xx is SUCCESS; everything else follows :data:`HTTP_STATUS_TABLE`.
    """
    if 200 <= status <= 299:
        return InstanceOutcome(_K.SUCCESS, f"HTTP {status}", status)
    return _status_outcome(rule_for(status), status, headers, body)


def _status_outcome(
    rule: StatusRule, status: int, headers: Mapping[str, str], body: bytes
) -> InstanceOutcome:
    """The row's kind for the whole answer, with a detail from the body."""
    kind = rule.kind
    if kind is _K.BLOCKED:
        return InstanceOutcome(kind, explain_permission_error(status, body), status)
    message = _body_message(body)
    detail = _one_line(
        f"HTTP {status} ({rule.note})" + (f": {message}" if message else ""), _DETAIL_MAX
    )
    retry_after = (
        parse_retry_after(_header(headers, "Retry-After")) if kind is _K.TRANSIENT else None
    )
    return InstanceOutcome(kind, detail, status, retry_after)


def classify_http(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    sop_instance_uids: Sequence[str],
) -> dict[str, InstanceOutcome]:
    """Outcome per SOP Instance UID of a STOW-RS answer.

    ``body`` is the answer's body; a DICOM JSON Store Instances Response
    (``application/dicom+json``) is read per instance as the module docstring says:

    * an instance in ReferencedSOPSequence is SUCCESS even if others failed;
    * an instance in FailedSOPSequence is TRANSIENT for FailureReason A7xx, else CONFLICT;
    * a 200 with no parsable body (or a body naming no instance) is SUCCESS for all;
    * a 202 (or other 2xx) leaves an instance named in neither sequence TRANSIENT,
      with a detail saying it was not confirmed stored.
    """
    rule = rule_for(status)
    retry_after = parse_retry_after(_header(headers, "Retry-After"))
    if not rule.per_instance:
        outcome = _status_outcome(rule, status, headers, body)
        return dict.fromkeys(sop_instance_uids, outcome)

    report = _parse_store_report(body)
    named = set(report.referenced) | set(report.failed)
    unnamed = [uid for uid in sop_instance_uids if _norm_uid(uid) not in named]
    results: dict[str, InstanceOutcome] = {}
    for uid in sop_instance_uids:
        key = _norm_uid(uid)
        if key in report.referenced:
            warning = report.referenced[key]
            detail = f"stored (HTTP {status})"
            if warning:
                detail += f" with WarningReason {warning}"
            results[uid] = InstanceOutcome(_K.SUCCESS, detail, status)
        elif key in report.failed:
            results[uid] = _failure_outcome(report.failed[key], status, retry_after)
        elif report.anonymous and len(unnamed) == 1:
            results[uid] = _failure_outcome(report.anonymous[0], status, retry_after)
        elif report.anonymous:
            first = _failure_outcome(report.anonymous[0], status, None).detail
            detail = _one_line(
                f"HTTP {status}: the answer has failures without a SOP Instance UID and "
                f"{len(unnamed)} instances are unnamed, so which one failed is unknown: "
                f"retry them one by one ({first})",
                _DETAIL_MAX,
            )
            results[uid] = InstanceOutcome(_K.TRANSIENT, detail, status, retry_after, alone=True)
        elif report.names_any or rule.kind is _K.TRANSIENT:
            results[uid] = InstanceOutcome(
                _K.TRANSIENT,
                f"HTTP {status}: instance in neither ReferencedSOPSequence nor "
                "FailedSOPSequence of the answer: not confirmed stored, will retry",
                status,
                retry_after,
            )
        elif rule.kind is _K.SUCCESS:
            results[uid] = InstanceOutcome(_K.SUCCESS, f"stored (HTTP {status})", status)
        else:  # 409 naming no instance: the whole request conflicts
            outcome = _status_outcome(rule, status, headers, body)
            # With several instances, which of them conflicts is unknown.
            results[uid] = replace(outcome, alone=len(sop_instance_uids) > 1)
    return results


# ------------------------------------------------------------------ exceptions


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: causes, contexts, urllib3 reasons, exception args."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < 16:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        reason = getattr(cur, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
        todo.extend(a for a in cur.args if isinstance(a, BaseException))
        if cur.__cause__ is not None:
            todo.append(cur.__cause__)
        if cur.__context__ is not None:
            todo.append(cur.__context__)


def _exc_text(exc: BaseException) -> str:
    return _one_line(_redact(f"{type(exc).__name__}: {exc}"), 300)


_NETWORK_CAUSES: Final[
    tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...]
] = (
    ((urllib3.exceptions.NameResolutionError, socket.gaierror), "DNS failure"),
    (ConnectionRefusedError, "connection refused"),
    ((ConnectionResetError, BrokenPipeError), "connection reset"),
    (http.client.RemoteDisconnected, "connection closed without a response"),
    ((http.client.IncompleteRead, urllib3.exceptions.ProtocolError), "protocol error"),
)


def _network_cause(exc: BaseException) -> str:
    """A plain name for the network failure wrapped in ``exc`` (most specific first)."""
    chain = list(_chain(exc))
    for types, name in _NETWORK_CAUSES:
        if any(isinstance(cur, types) for cur in chain):
            return name
    return "connection error"


def _tls_verify_failed(exc: BaseException) -> bool:
    return any(
        isinstance(cur, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(cur)
        for cur in _chain(exc)
    )


def classify_exception(exc: BaseException) -> InstanceOutcome:
    """Outcome for an exception raised while talking to the destination.

    Network failures are TRANSIENT; credentials, TLS trust and URL problems are BLOCKED
    (the destination or its configuration is at fault); an unreadable spool file is
    PERMANENT. Unknown exceptions are TRANSIENT.
    """
    t = _K.TRANSIENT
    text = _exc_text(exc)
    if isinstance(exc, CredentialsError):
        # Its message already says what failed ("cannot obtain Google credentials: ...",
        # "cannot read bearer token file ...") and never holds a secret.
        return InstanceOutcome(_K.BLOCKED, _one_line(_redact(str(exc)), _DETAIL_MAX))
    if _is_google_auth_error(exc):
        return InstanceOutcome(_K.BLOCKED, f"cannot obtain Google credentials: {text}")
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return InstanceOutcome(t, f"connect timeout: {text}")
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return InstanceOutcome(t, f"read timeout: {text}")
    if isinstance(exc, requests.exceptions.SSLError):
        if _tls_verify_failed(exc):
            return InstanceOutcome(
                _K.BLOCKED,
                "TLS certificate of the destination is not trusted: fix the destination's "
                f"certificate or configure a CA bundle that signs it ({text})",
            )
        return InstanceOutcome(t, f"TLS error: {text}")
    if isinstance(exc, requests.exceptions.ProxyError):
        return InstanceOutcome(t, f"proxy error: {text}")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return InstanceOutcome(t, f"{_network_cause(exc)}: {text}")
    if isinstance(
        exc, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError
    ):
        return InstanceOutcome(t, f"protocol error: {text}")
    if isinstance(
        exc,
        requests.exceptions.InvalidURL
        | requests.exceptions.InvalidSchema
        | requests.exceptions.MissingSchema
        | requests.exceptions.InvalidHeader,
    ):
        return InstanceOutcome(_K.BLOCKED, f"invalid destination configuration: {text}")
    if isinstance(exc, requests.exceptions.TooManyRedirects):
        return InstanceOutcome(_K.PERMANENT, f"too many redirects: {text}")
    if isinstance(exc, requests.exceptions.Timeout | TimeoutError | socket.timeout):
        return InstanceOutcome(t, f"timeout: {text}")
    if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError):
        return InstanceOutcome(_K.PERMANENT, f"cannot read spool file: {text}")
    if isinstance(
        exc,
        ConnectionError
        | http.client.HTTPException
        | urllib3.exceptions.HTTPError
        | requests.exceptions.RequestException
        | OSError,
    ):
        return InstanceOutcome(t, f"{_network_cause(exc)}: {text}")
    return InstanceOutcome(t, f"unexpected error: {text}")


def _is_google_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, google_exceptions.GoogleAuthError)
