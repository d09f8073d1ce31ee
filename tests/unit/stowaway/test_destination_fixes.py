"""The fix shown for a blocked destination is the one `stowaway check` prints for its cause."""

from __future__ import annotations

import pytest

from stowaway import destination_fixes as fixes
from stowaway.destination_fixes import blocked_fix
from stowaway.forwarder.outcome import explain_permission_error
from tests.support.healthcare_stub import GOOGLE_403_IAM_MESSAGE, google_error_body


def test_a_permission_reason_is_its_own_fix_as_check_prints_it() -> None:
    body = google_error_body(403, "PERMISSION_DENIED", GOOGLE_403_IAM_MESSAGE)
    reason = explain_permission_error(403, body)
    assert "roles/healthcare.dicomEditor" in reason
    assert blocked_fix(reason) == reason
    plain = explain_permission_error(401, b"nope")
    assert blocked_fix(plain) == plain


@pytest.mark.parametrize(
    ("reason", "fix"),
    [
        (
            "TLS certificate of the destination is not trusted: fix the destination's "
            "certificate or configure a CA bundle that signs it (x)",
            fixes.TLS_UNTRUSTED_FIX,
        ),
        ("cannot obtain Google credentials: no ADC", fixes.GOOGLE_CREDENTIALS_FIX),
        ("cannot read bearer token file /t: No such file", fixes.AUTH_SETTINGS_FIX),
        ("invalid destination configuration: bad URL", fixes.URL_FIX),
        ("DNS failure: name or service not known", fixes.DNS_FIX),
        ("connection refused: [Errno 111]", fixes.CONNECTION_REFUSED_FIX),
        ("connect timeout: 10 s", fixes.TIMEOUT_FIX),
        ("HTTP 503 (server error): busy", fixes.UNREACHABLE_FIX),
    ],
)
def test_each_recorded_cause_gets_checks_fix(reason: str, fix: str) -> None:
    assert blocked_fix(reason) == fix


def test_a_rejected_association_names_both_ae_titles() -> None:
    reason = "association rejected by ARCHIVE@10.0.0.5:104 (result rejected, ...)"
    assert blocked_fix(reason, calling_aet="GATEWAY") == fixes.DIMSE_REJECTED_FIX.format(
        calling_aet="GATEWAY", called_aet="ARCHIVE"
    )
    assert blocked_fix(None) is None and blocked_fix("") is None
