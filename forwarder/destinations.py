"""Where instances are delivered: one named destination, DICOMweb or DIMSE, each with the
delivery settings that apply to it alone.

These are plain records; the destinations file (``stowaway.destinations``) builds them,
with the forwarder flags as the defaults of every field a destination does not set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from stowaway.batch_limits import BATCH_MAX_BYTES, BATCH_MAX_INSTANCES
from stowaway.forwarder.auth import AuthKind

if TYPE_CHECKING:  # pydicom is loaded only where a destination redacts or compresses
    from stowaway.forwarder.deidentify import RedactionSpec
    from stowaway.forwarder.transcode import TranscodeTarget

#: Destination names go into metric labels, log lines and command arguments.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class DestinationKind(StrEnum):
    DICOMWEB = "dicomweb"
    DIMSE = "dimse"


class ConflictPolicy(StrEnum):
    """What a 409 (the store holds a different instance under the same UIDs) does."""

    FAIL = "fail"
    OVERWRITE = "overwrite"  #: DELETE the stored instance and upload again


@dataclass(frozen=True)
class Delivery:
    """Retry and concurrency settings every kind of destination has."""

    workers: int = 4
    max_attempts: int | None = None  #: transient failures before ``failed``; None: never
    backoff_initial: float = 2.0
    backoff_max: float = 600.0
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class Outbound:
    """What a destination gets instead of the spooled bytes: a redacted and/or compressed
    copy, made on the way out (the spool keeps the original). Neither: as received."""

    redaction: RedactionSpec | None = None
    transcode: TranscodeTarget | None = None
    #: where the settings came from, for messages: ``redact`` of a destinations file
    #: entry, or Google's flags (``--redact_*``, ``--store_compress_to_transfer_syntax``)
    source: str = ""

    @property
    def changes_instances(self) -> bool:
        return self.redaction is not None or self.transcode is not None

    def describe(self) -> str:
        """``redact DICOM_BASIC (uid keyed), transcode 1.2.840.10008.1.2.4.90``; ``as received``."""
        parts = []
        if self.redaction is not None:
            parts.append(f"redact {self.redaction.name} (uid {self.redaction.uid_scheme.value})")
        if self.transcode is not None:
            parts.append(f"transcode {self.transcode.uid}")
        return ", ".join(parts) or "as received"


AS_RECEIVED = Outbound()


@dataclass(frozen=True)
class DicomwebDestination:
    """A DICOMweb store reached with STOW-RS (``POST {url}/studies``)."""

    name: str
    url: str
    auth: AuthKind
    delivery: Delivery = Delivery()
    bearer_token_file: Path | None = None
    basic_user: str | None = None
    basic_password_file: Path | None = None
    ca_bundle: Path | None = None
    batch_max_instances: int = BATCH_MAX_INSTANCES
    batch_max_bytes: int = BATCH_MAX_BYTES
    on_conflict: ConflictPolicy = ConflictPolicy.FAIL
    read_timeout: float = 120.0
    outbound: Outbound = AS_RECEIVED

    kind = DestinationKind.DICOMWEB


@dataclass(frozen=True)
class DimseTls:
    """TLS for a DIMSE destination: the CA that signs its certificate and, when it wants
    one, our client certificate and key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class DimseDestination:
    """A DICOM node reached with C-STORE."""

    name: str
    host: str
    port: int
    called_aet: str
    calling_aet: str
    delivery: Delivery = Delivery(workers=2)
    tls: DimseTls | None = None
    instances_per_association: int = 100
    outbound: Outbound = AS_RECEIVED

    kind = DestinationKind.DIMSE

    @property
    def max_associations(self) -> int:
        return self.delivery.workers


Destination = DicomwebDestination | DimseDestination
