"""What to do about a blocked destination: the fix ``stowaway check`` prints for the cause.

``check`` finds a cause by probing; the forwarder records the cause it met as the
destination's ``reason``. :func:`blocked_fix` reads that reason (no network call) and
answers with the same fix ``check`` would print for it, so the console and the API
say what ``check`` says. The texts live here, once, for both.
"""

from __future__ import annotations

import re

#: A 401/403's reason is :func:`stowaway.forwarder.outcome.explain_permission_error`'s
#: text, "cause: fix [...]": ``check`` prints that same text as its fix.
PERMISSION_REASON = re.compile(r"^HTTP 40[13]\b|\[Http_40[13]\b")
TLS_UNTRUSTED_FIX = "fix the server's certificate, or pass --ca-bundle with the CA that signs it"
GOOGLE_CREDENTIALS_FIX = (
    "check the service account (metadata server reachable? Workload Identity "
    "bound? key file valid?)"
)
AUTH_SETTINGS_FIX = "fix the --auth settings"
URL_FIX = (
    "check --dicomweb-url: it ends in .../dicomWeb for the Healthcare API, "
    ".../dicom-web for Orthanc"
)
CONNECTION_REFUSED_FIX = "is the server running, and is the port in the URL right?"
DNS_FIX = (
    "check the host name in --dicomweb-url and this machine's DNS "
    "(resolv.conf, cluster DNS, private Google access)"
)
TIMEOUT_FIX = "a firewall, a missing route or no egress (NAT, VPC firewall rules) is in the way"
UNREACHABLE_FIX = "the destination is unreachable, failing or overloaded: check it and retry"
DIMSE_REJECTED_FIX = (
    "register our AE title {calling_aet} (and this address) with the "
    "node, and check its called AE title {called_aet}"
)

#: A token or password file that cannot be read (forwarder/auth.py's CredentialsError).
_CREDENTIAL_FILE = re.compile(r"\b(token|password) file\b")
#: (how the forwarder's reason starts, the fix), the first match wins.
_BY_PREFIX: tuple[tuple[str, str], ...] = (
    ("TLS certificate of the destination is not trusted", TLS_UNTRUSTED_FIX),
    ("cannot obtain Google credentials", GOOGLE_CREDENTIALS_FIX),
    ("invalid destination configuration", URL_FIX),
    ("DNS failure", DNS_FIX),
    ("connection refused", CONNECTION_REFUSED_FIX),
    ("connect timeout", TIMEOUT_FIX),
)


def blocked_fix(reason: str | None, *, calling_aet: str = "(ours)") -> str | None:
    """The fix for a destination blocked for ``reason`` (None when there is no reason)."""
    if not reason:
        return None
    if PERMISSION_REASON.search(reason):
        return reason
    if reason.startswith("association rejected by "):
        called = reason.removeprefix("association rejected by ").split("@", 1)[0]
        return DIMSE_REJECTED_FIX.format(calling_aet=calling_aet, called_aet=called)
    if _CREDENTIAL_FILE.search(reason):
        return AUTH_SETTINGS_FIX
    for prefix, fix in _BY_PREFIX:
        if reason.startswith(prefix):
            return fix
    return UNREACHABLE_FIX
