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

from stowaway.forwarder.auth import AuthKind

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
    batch_max_instances: int = 50
    batch_max_bytes: int = 64 * 1024 * 1024
    on_conflict: ConflictPolicy = ConflictPolicy.FAIL
    read_timeout: float = 120.0

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

    kind = DestinationKind.DIMSE

    @property
    def max_associations(self) -> int:
        return self.delivery.workers


Destination = DicomwebDestination | DimseDestination
