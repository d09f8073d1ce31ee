"""De-identification on the way out: redaction profiles, UID mapping, a streaming redactor.

Public API::

    spec = RedactionSpec.from_config({"profile": "DICOM_BASIC", "uid_key_file": "/run/key"})
    spec = RedactionSpec.from_google_flags(remove_list="PatientName,00100020")
    redactor = Redactor(spec)              # reads the UID key once
    redacted = redactor.prepare(spool_path)  # header redacted; pixel data not read yet
    redacted.size, redacted.report           # Content-Length, what was applied
    redacted.open() / redacted.iter_bytes()  # the new Part-10 file, streamed
    redactor.write(spool_path, out)          # or all at once -> RedactionReport
"""

from stowaway.forwarder.deidentify.layout import UnsupportedInstance
from stowaway.forwarder.deidentify.profiles import MAPPED_UIDS, REQUIRED, Action
from stowaway.forwarder.deidentify.redactor import (
    RedactedInstance,
    RedactionError,
    RedactionReport,
    Redactor,
)
from stowaway.forwarder.deidentify.spec import Mode, RedactionConfigError, RedactionSpec
from stowaway.forwarder.deidentify.tags import TagError
from stowaway.forwarder.deidentify.uids import UidKeyError, UidMapper, UidScheme

__all__ = [
    "MAPPED_UIDS",
    "REQUIRED",
    "Action",
    "Mode",
    "RedactedInstance",
    "RedactionConfigError",
    "RedactionError",
    "RedactionReport",
    "RedactionSpec",
    "Redactor",
    "TagError",
    "UidKeyError",
    "UidMapper",
    "UidScheme",
    "UnsupportedInstance",
]
