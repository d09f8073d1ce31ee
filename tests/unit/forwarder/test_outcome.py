"""The outcome table: every row, the 403 causes, Retry-After, per-instance reading."""

from __future__ import annotations

import json
import socket
import ssl
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
import urllib3.exceptions
from google.auth import exceptions as google_exceptions

from stowaway.forwarder.auth import CredentialsError
from stowaway.forwarder.outcome import (
    HTTP_STATUS_TABLE,
    InstanceOutcome,
    OutcomeKind,
    classify_exception,
    classify_http,
    classify_response,
    explain_permission_error,
    parse_retry_after,
    rule_for,
)
from tests.support.healthcare_stub import (
    FAILURE_DETAIL_DUPLICATE,
    GOOGLE_401_MESSAGE,
    GOOGLE_403_IAM_MESSAGE,
    GOOGLE_403_SCOPES_MESSAGE,
    GOOGLE_403_SERVICE_DISABLED_MESSAGE,
    google_error_body,
)

K = OutcomeKind
A, B, C = "1.2.3.1", "1.2.3.2", "1.2.3.3"
DICOM_JSON = {"Content-Type": "application/dicom+json"}


def _ref(uid: str, warning: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00081155": {"vr": "UI", "Value": [uid]},
    }
    if warning is not None:
        item["00081196"] = {"vr": "US", "Value": [warning]}
    return item


def _failed(uid: str | None, reason: int | None, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}}
    if uid is not None:
        item["00081155"] = {"vr": "UI", "Value": [uid]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    item.update(extra)
    return item


def _google_detail(text: str, block: str = "10") -> dict[str, Any]:
    return {
        f"000900{block}": {"vr": "LO", "Value": ["GOOGLE"]},
        f"0009{block}97": {"vr": "LT", "Value": [text]},
    }


def _report(referenced: list[Any] | None = None, failed: list[Any] | None = None) -> bytes:
    body: dict[str, Any] = {}
    if referenced is not None:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed is not None:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    return json.dumps(body).encode()


# ------------------------------------------------------------------ the table


def test_table_is_ordered_and_total() -> None:
    assert HTTP_STATUS_TABLE[-1].kind is K.PERMANENT
    for status in range(100, 700):
        assert rule_for(status).matches(status)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (301, K.PERMANENT),
        (302, K.PERMANENT),
        (307, K.PERMANENT),
        (400, K.PERMANENT),
        (401, K.BLOCKED),
        (403, K.BLOCKED),
        (404, K.PERMANENT),
        (405, K.PERMANENT),
        (408, K.TRANSIENT),
        (409, K.CONFLICT),
        (413, K.PERMANENT),
        (415, K.PERMANENT),
        (422, K.PERMANENT),
        (429, K.TRANSIENT),
        (500, K.TRANSIENT),
        (502, K.TRANSIENT),
        (503, K.TRANSIENT),
        (504, K.TRANSIENT),
        (507, K.TRANSIENT),
        (599, K.TRANSIENT),
        (100, K.PERMANENT),
        (600, K.PERMANENT),
    ],
)
def test_status_rows_apply_to_every_instance(status: int, kind: OutcomeKind) -> None:
    out = classify_http(status, {}, b"", [A, B])
    assert set(out) == {A, B}
    assert {o.kind for o in out.values()} == {kind}
    assert all(o.http_status == status for o in out.values())
    assert all(str(status) in o.detail for o in out.values())


def test_200_without_body_is_success_for_all() -> None:
    out = classify_http(200, {}, b"", [A, B, C])
    assert [o.kind for o in out.values()] == [K.SUCCESS] * 3


@pytest.mark.parametrize("body", [b"", b"not json", b"{}", b"[]", b"<NativeDicomModel/>"])
def test_200_with_a_body_naming_no_instance_is_success(body: bytes) -> None:
    out = classify_http(200, DICOM_JSON, body, [A, B])
    assert {o.kind for o in out.values()} == {K.SUCCESS}


def test_200_listing_each_instance_is_success() -> None:
    out = classify_http(200, DICOM_JSON, _report([_ref(A), _ref(B, warning=0xB000)]), [A, B])
    assert out[A] == InstanceOutcome(K.SUCCESS, "stored (HTTP 200)", 200)
    assert out[B].kind is K.SUCCESS and "0xB000" in out[B].detail


def test_200_that_names_others_but_not_this_instance_is_transient() -> None:
    out = classify_http(200, DICOM_JSON, _report([_ref(A)]), [A, B])
    assert out[A].kind is K.SUCCESS
    assert out[B].kind is K.TRANSIENT and "neither" in out[B].detail


def test_202_partial_success_is_per_instance() -> None:
    body = _report(
        [_ref(A)],
        [_failed(B, 0x0111, **_google_detail(FAILURE_DETAIL_DUPLICATE)), _failed(C, 0xA700)],
    )
    out = classify_http(202, DICOM_JSON, body, [A, B, C])
    assert out[A].kind is K.SUCCESS
    assert out[B].kind is K.CONFLICT
    assert "0x0111" in out[B].detail and "duplicate SOP instance" in out[B].detail
    assert "checksum mismatch" in out[B].detail
    assert out[C].kind is K.TRANSIENT and "0xA700" in out[C].detail


def test_202_instance_in_neither_sequence_is_transient() -> None:
    out = classify_http(202, DICOM_JSON, _report([_ref(A)]), [A, B])
    assert out[A].kind is K.SUCCESS
    assert out[B].kind is K.TRANSIENT
    assert "neither ReferencedSOPSequence nor FailedSOPSequence" in out[B].detail


def test_202_without_a_body_confirms_nothing() -> None:
    out = classify_http(202, {}, b"", [A])
    assert out[A].kind is K.TRANSIENT


def test_unusual_2xx_is_read_like_202() -> None:
    assert classify_http(201, {}, b"", [A])[A].kind is K.TRANSIENT
    assert classify_http(201, DICOM_JSON, _report([_ref(A)]), [A])[A].kind is K.SUCCESS


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        (0xA700, K.TRANSIENT),
        (0xA7FF, K.TRANSIENT),
        (0xA6FF, K.CONFLICT),
        (0xA800, K.CONFLICT),
        (0xA900, K.CONFLICT),
        (0xC000, K.CONFLICT),
        (0xC122, K.CONFLICT),
        (0x0110, K.CONFLICT),
        (0x0111, K.CONFLICT),
        (0x0122, K.CONFLICT),
        (None, K.CONFLICT),
    ],
)
def test_failure_reason(reason: int | None, kind: OutcomeKind) -> None:
    out = classify_http(202, DICOM_JSON, _report([], [_failed(A, reason)]), [A])
    assert out[A].kind is kind
    if reason is not None:
        assert f"0x{reason:04X}" in out[A].detail


def test_failure_reason_as_string_is_read() -> None:
    body = _report([], [_failed(A, None, **{"00081197": {"vr": "US", "Value": ["42752"]}})])
    assert classify_http(409, DICOM_JSON, body, [A])[A].kind is K.TRANSIENT


def test_409_uses_the_per_instance_reason() -> None:
    body = _report([], [_failed(A, 0x0111, **_google_detail("same UID, other bytes"))])
    out = classify_http(409, DICOM_JSON, body, [A])
    assert out[A].kind is K.CONFLICT
    assert out[A].http_status == 409
    assert "0x0111" in out[A].detail and "same UID, other bytes" in out[A].detail


def test_409_with_a7xx_is_still_transient() -> None:
    body = _report([], [_failed(A, 0xA701)])
    out = classify_http(409, {"Retry-After": "7"}, body, [A])
    assert out[A].kind is K.TRANSIENT and out[A].retry_after == 7.0


def test_409_without_per_instance_body_conflicts_all() -> None:
    body = google_error_body(409, "ALREADY_EXISTS", "instance already exists")
    out = classify_http(409, {}, body, [A, B])
    assert {o.kind for o in out.values()} == {K.CONFLICT}
    assert "instance already exists" in out[A].detail


def test_409_naming_another_instance_leaves_this_one_transient() -> None:
    out = classify_http(409, DICOM_JSON, _report([], [_failed(A, 0x0111)]), [A, B])
    assert out[A].kind is K.CONFLICT
    assert out[B].kind is K.TRANSIENT


def test_google_failure_detail_in_another_private_block() -> None:
    item = _failed(A, 0x0110)
    item["00090011"] = {"vr": "LO", "Value": ["GOOGLE"]}
    item["00091197"] = {"vr": "LT", "Value": ["the Google text"]}
    item["00091097"] = {"vr": "LT", "Value": ["text of another creator"]}
    item["00090010"] = {"vr": "LO", "Value": ["OTHER"]}
    out = classify_http(409, DICOM_JSON, _report([], [item]), [A])
    assert "the Google text" in out[A].detail
    assert "another creator" not in out[A].detail
    assert "OTHER" not in out[A].detail


def test_failure_detail_falls_back_to_any_text_and_error_comment() -> None:
    item = _failed(A, 0xC000, **{"00404000": {"vr": "LT", "Value": ["bad pixel data"]}})
    assert "bad pixel data" in classify_http(409, DICOM_JSON, _report([], [item]), [A])[A].detail
    item = _failed(A, 0xC000, **{"00000902": {"vr": "LO", "Value": ["error comment"]}})
    assert "error comment" in classify_http(409, DICOM_JSON, _report([], [item]), [A])[A].detail
    body = json.loads(_report([], [_failed(A, 0xC000)]))
    body["00000902"] = {"vr": "LO", "Value": ["top-level comment"]}
    out = classify_http(409, DICOM_JSON, json.dumps(body).encode(), [A])
    assert "top-level comment" in out[A].detail


def test_failed_item_without_uid_belongs_to_the_only_unnamed_instance() -> None:
    # Google has been seen answering 409 with a FailedSOPSequence item that carries only
    # FailureReason and FailureDetail.
    body = _report([_ref(A)], [_failed(None, 0x0110, **_google_detail("invalid SR"))])
    out = classify_http(409, DICOM_JSON, body, [A, B])
    assert out[A].kind is K.SUCCESS
    assert out[B].kind is K.CONFLICT and "invalid SR" in out[B].detail


def test_failed_item_without_uid_and_several_unnamed_is_transient() -> None:
    body = _report([], [_failed(None, 0x0110)])
    out = classify_http(409, DICOM_JSON, body, [A, B])
    assert {o.kind for o in out.values()} == {K.TRANSIENT}
    assert "one by one" in out[A].detail
    assert all(o.alone for o in out.values())  # the forwarder sends each alone at once


def test_only_ambiguous_answers_ask_for_sending_alone() -> None:
    alone = classify_http(409, DICOM_JSON, b"", [A, B])
    assert all(o.alone for o in alone.values())  # a 409 naming none of several
    assert not classify_http(409, DICOM_JSON, b"", [A])[A].alone
    named = _report([_ref(A)], [_failed(B, 0x0110)])
    assert not any(o.alone for o in classify_http(202, DICOM_JSON, named, [A, B]).values())
    single = classify_http(409, DICOM_JSON, _report([], [_failed(None, 0x0110)]), [A])
    assert single[A].kind is K.CONFLICT and not single[A].alone


def test_uid_padding_does_not_matter() -> None:
    out = classify_http(
        202, DICOM_JSON, _report([_ref(A + "\x00")], [_failed(B + " ", 0x0111)]), [A, B + "\x00"]
    )
    assert out[A].kind is K.SUCCESS
    assert out[B + "\x00"].kind is K.CONFLICT


def test_body_wrapped_in_a_list_is_read() -> None:
    body = json.dumps([json.loads(_report([_ref(A)]))]).encode()
    assert classify_http(202, DICOM_JSON, body, [A])[A].kind is K.SUCCESS


# ------------------------------------------------------------------ Retry-After


NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("Wed, 01 May 2024 12:00:30 GMT", 30.0),
        ("Wed, 01 May 2024 11:00:00 GMT", 0.0),
        ("Wednesday, 01-May-24 12:01:00 GMT", 60.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(status: int) -> None:
    out = classify_http(status, {"retry-after": "17"}, b"", [A])
    assert out[A].kind is K.TRANSIENT and out[A].retry_after == 17.0


def test_retry_after_http_date() -> None:
    future = datetime.now(UTC).timestamp() + 100
    header = datetime.fromtimestamp(future, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    retry = classify_http(429, {"Retry-After": header}, b"", [A])[A].retry_after
    assert retry is not None and 95 <= retry <= 100


def test_retry_after_only_on_transient() -> None:
    assert classify_http(400, {"Retry-After": "5"}, b"", [A])[A].retry_after is None
    assert classify_http(503, {}, b"", [A])[A].retry_after is None


# ------------------------------------------------------------------ 401/403


@pytest.mark.parametrize(
    ("message", "reason", "expected"),
    [
        (
            GOOGLE_403_SERVICE_DISABLED_MESSAGE,
            "SERVICE_DISABLED",
            "Cloud Healthcare API is not enabled in the project: enable healthcare.googleapis.com",
        ),
        (
            GOOGLE_403_SCOPES_MESSAGE,
            "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
            "credentials lack the https://www.googleapis.com/auth/cloud-healthcare OAuth "
            "scope: recreate the node pool/cluster with "
            "--scopes=https://www.googleapis.com/auth/cloud-healthcare or use Workload Identity",
        ),
        (
            GOOGLE_403_IAM_MESSAGE,
            "IAM_PERMISSION_DENIED",
            "the service account lacks roles/healthcare.dicomEditor on the DICOM store: grant it",
        ),
    ],
)
@pytest.mark.parametrize("with_reason", [True, False])
def test_the_three_google_403_causes(
    message: str, reason: str, expected: str, with_reason: bool
) -> None:
    body = google_error_body(
        403, "PERMISSION_DENIED", message, reason=reason if with_reason else None
    )
    detail = explain_permission_error(403, body)
    assert detail.startswith(expected)
    assert f"Http_403, PERMISSION_DENIED, {message[:40]}" in detail
    out = classify_http(403, {"Content-Type": "application/json"}, body, [A, B])
    assert {o.kind for o in out.values()} == {K.BLOCKED}
    assert out[A].detail == detail


def test_permission_message_without_quotes() -> None:
    body = google_error_body(
        403,
        "PERMISSION_DENIED",
        "Permission healthcare.dicomStores.dicomWebWrite denied on resource projects/p",
    )
    assert "roles/healthcare.dicomEditor" in explain_permission_error(403, body)


def test_google_401_invalid_credentials() -> None:
    body = google_error_body(401, "UNAUTHENTICATED", GOOGLE_401_MESSAGE)
    detail = explain_permission_error(401, body)
    assert "invalid or expired" in detail and "Http_401, UNAUTHENTICATED" in detail


def test_google_401_missing_credentials() -> None:
    message = (
        "Request is missing required authentication credential. Expected OAuth 2 access "
        "token, login cookie or other valid authentication credential."
    )
    body = google_error_body(401, "UNAUTHENTICATED", message, reason="CREDENTIALS_MISSING")
    assert explain_permission_error(401, body).startswith("no credentials were sent")


def test_unknown_google_403_keeps_status_and_200_chars() -> None:
    message = "Something new went wrong. " + "x" * 400
    detail = explain_permission_error(403, google_error_body(403, "PERMISSION_DENIED", message))
    assert "Http_403, PERMISSION_DENIED" in detail
    assert message[:200] in detail and message[:201] not in detail


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("body", [b"", b"Unauthorized", b"<html><b>Forbidden</b></html>"])
def test_non_json_401_403(status: int, body: bytes) -> None:
    out = classify_http(status, {"WWW-Authenticate": 'Basic realm="x"'}, body, [A])[A]
    assert out.kind is K.BLOCKED and f"HTTP {status}" in out.detail
    assert body.decode() in out.detail


# ------------------------------------------------------------------ PERMANENT details


def test_permanent_detail_from_google_json() -> None:
    body = google_error_body(400, "INVALID_ARGUMENT", "invalid DICOM: missing StudyInstanceUID")
    out = classify_http(400, {}, body, [A])[A]
    assert out.kind is K.PERMANENT
    assert "400" in out.detail and "INVALID_ARGUMENT" in out.detail
    assert "missing StudyInstanceUID" in out.detail


def test_permanent_detail_from_dicom_json_error_comment() -> None:
    body = json.dumps({"00000902": {"vr": "LO", "Value": ["unsupported transfer syntax"]}})
    out = classify_http(415, DICOM_JSON, body.encode(), [A])[A]
    assert out.kind is K.PERMANENT and "unsupported transfer syntax" in out.detail


def test_permanent_detail_from_orthanc_json() -> None:
    body = json.dumps({"HttpError": "Bad Request", "Message": "Bad file format", "Details": "x"})
    out = classify_http(400, {}, body.encode(), [A])[A]
    assert "Bad file format" in out.detail


def test_permanent_detail_from_text_is_cut_at_300_chars() -> None:
    text = "Request Entity Too Large\n" + "y" * 1000
    out = classify_http(413, {}, text.encode(), [A])[A]
    assert out.kind is K.PERMANENT and "Request Entity Too Large" in out.detail
    assert "\n" not in out.detail and len(out.detail) < 360


def test_details_never_come_from_headers() -> None:
    headers = {"Authorization": "Bearer SECRET-TOKEN", "Set-Cookie": "sid=SECRET-COOKIE"}
    for status in (200, 202, 400, 401, 403, 409, 429, 503):
        for outcome in classify_http(status, headers, b"", [A]).values():
            assert "SECRET" not in outcome.detail


def test_classify_response_for_probe_and_delete() -> None:
    assert classify_response(204, {}, b"").kind is K.SUCCESS
    assert classify_response(200, {}, b"[]").kind is K.SUCCESS
    assert classify_response(404, {}, b"").kind is K.PERMANENT
    body = google_error_body(403, "PERMISSION_DENIED", GOOGLE_403_SCOPES_MESSAGE)
    assert classify_response(403, {}, body).kind is K.BLOCKED
    assert classify_response(503, {"Retry-After": "2"}, b"").retry_after == 2.0


# ------------------------------------------------------------------ exceptions


def _refused() -> requests.exceptions.ConnectionError:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        requests.get(f"http://127.0.0.1:{port}/", timeout=2)
    except requests.exceptions.ConnectionError as exc:
        return exc
    raise AssertionError("expected connection refused")


def test_connection_refused_is_transient() -> None:
    out = classify_exception(_refused())
    assert out.kind is K.TRANSIENT and out.detail.startswith("connection refused")
    assert out.http_status is None


def test_dns_failure_is_transient() -> None:
    reason = urllib3.exceptions.NameResolutionError(
        "dicom.example.invalid",
        None,  # type: ignore[arg-type]
        socket.gaierror(-2, "Name or service not known"),
    )
    exc = requests.exceptions.ConnectionError(
        urllib3.exceptions.MaxRetryError(None, "/studies", reason)  # type: ignore[arg-type]
    )
    out = classify_exception(exc)
    assert out.kind is K.TRANSIENT and out.detail.startswith("DNS failure")


@pytest.mark.parametrize(
    ("exc", "kind", "start"),
    [
        (requests.exceptions.ConnectTimeout("connect timed out"), K.TRANSIENT, "connect timeout"),
        (requests.exceptions.ReadTimeout("read timed out"), K.TRANSIENT, "read timeout"),
        (
            requests.exceptions.ConnectionError(
                urllib3.exceptions.ProtocolError("aborted", ConnectionResetError(104, "reset"))
            ),
            K.TRANSIENT,
            "connection reset",
        ),
        (
            requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"),
            K.TRANSIENT,
            "protocol error",
        ),
        (requests.exceptions.ContentDecodingError("bad gzip"), K.TRANSIENT, "protocol error"),
        (
            requests.exceptions.SSLError(
                ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] self-signed")
            ),
            K.BLOCKED,
            "TLS certificate of the destination is not trusted",
        ),
        (requests.exceptions.SSLError("EOF occurred in violation of protocol"), K.TRANSIENT, "TLS"),
        (requests.exceptions.InvalidURL("bad url"), K.BLOCKED, "invalid destination"),
        (requests.exceptions.MissingSchema("no schema"), K.BLOCKED, "invalid destination"),
        (requests.exceptions.TooManyRedirects("loop"), K.PERMANENT, "too many redirects"),
        (TimeoutError("timed out"), K.TRANSIENT, "timeout"),
        (ConnectionResetError(104, "reset"), K.TRANSIENT, "connection reset"),
        (BrokenPipeError(32, "broken pipe"), K.TRANSIENT, "connection reset"),
        (FileNotFoundError(2, "No such file", "/spool/x.dcm"), K.PERMANENT, "cannot read spool"),
        (PermissionError(13, "Permission denied"), K.PERMANENT, "cannot read spool"),
        (
            CredentialsError("cannot obtain Google credentials: metadata server said 404"),
            K.BLOCKED,
            "cannot obtain Google credentials: metadata server said 404",
        ),
        (
            google_exceptions.RefreshError("token endpoint said no"),  # type: ignore[no-untyped-call]
            K.BLOCKED,
            "cannot obtain Google credentials",
        ),
        (ValueError("unexpected"), K.TRANSIENT, "unexpected error"),
    ],
)
def test_classify_exception(exc: BaseException, kind: OutcomeKind, start: str) -> None:
    out = classify_exception(exc)
    assert out.kind is kind
    assert out.detail.startswith(start), out.detail
    assert out.retry_after is None


def test_exception_details_redact_url_secrets() -> None:
    exc = requests.exceptions.ConnectionError(
        "HTTPSConnectionPool: Max retries exceeded with url: "
        "https://user:hunter2@pacs.example/dicom?access_token=SECRET&limit=1"
    )
    detail = classify_exception(exc).detail
    assert "hunter2" not in detail and "SECRET" not in detail
    assert "limit=1" in detail
