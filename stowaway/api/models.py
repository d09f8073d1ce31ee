"""The API's request and response bodies: the OpenAPI document is generated from these.

Responses carry UIDs, AE titles, counts and sizes, never a patient's name or ID
(the queue holds none). Request bodies forbid unknown fields and bound every list.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stowaway.db.models import Status
from stowaway.forwarder.destinations import NAME_PATTERN

#: Row ids one action request may name (a selector such as ``failed`` has no limit).
MAX_IDS = 1000
RowId = Annotated[int, Field(ge=1, le=2**63 - 1)]
#: A UID as the queue stores it: printable ASCII (strict DICOM UIDs are digits and dots).
Uid = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
DestinationName = Annotated[str, Field(pattern=NAME_PATTERN.pattern)]
#: ``2h``, ``7d``, or (``since`` only) an ISO 8601 date/time.
When = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x20-\x7e]+$")]


class Problem(BaseModel):
    """Every error answer: one line saying what is wrong."""

    detail: str


class ServerInfo(BaseModel):
    version: str
    api: Literal["v1"] = "v1"
    #: whether ``--admin-token-file`` is given: actions can be taken with a token
    actions_enabled: bool
    node_id: str


class Destination(BaseModel):
    name: str
    #: deliveries pending or in flight
    pending: int
    failed: int
    oldest_pending_received_at: str | None
    url: str
    #: ``ok``, ``blocked``, or ``unknown`` (no forwarder has recorded it yet)
    state: str
    since: str | None
    reason: str | None
    next_probe_at: str | None
    #: what ``stowaway check`` would say to do about ``reason`` (blocked only)
    fix: str | None = None


class StatusCounts(BaseModel):
    pending: int
    in_flight: int
    done: int
    failed: int
    unrouted: int


class LastHour(BaseModel):
    uploaded: int
    failed: int
    retried: int


class Summary(StatusCounts):
    """``stowaway queue stats --json``, each destination with its ``fix``."""

    bytes: StatusCounts
    oldest_pending_age_seconds: float | None
    bytes_waiting: int
    destinations: list[Destination]
    last_hour: LastHour


class Instance(BaseModel):
    """One queue row: one instance on its way to one destination (a delivery)."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    calling_aet: str
    called_aet: str
    peer_address: str
    node_id: str
    #: ``""`` while unrouted
    destination: str
    spool_path: str
    size_bytes: int
    sha256: str
    status: Status
    attempts: int
    next_attempt_at: str
    lease_owner: str | None
    lease_expires_at: str | None
    last_error: str | None
    received_at: str
    forwarded_at: str | None
    #: what the destination was sent (redaction, compression), recorded when it took it;
    #: null: the spooled bytes as received, or not delivered yet
    applied: dict[str, Any] | None = None


class InstancePage(BaseModel):
    items: list[Instance]
    #: pass as ``cursor`` for the next page; null on the last page
    next_cursor: str | None


class SpoolFile(BaseModel):
    absolute_path: str
    present: bool
    intact: bool
    problem: str | None


class Event(BaseModel):
    at: str
    kind: str
    detail: str | None


class InstanceDetails(Instance):
    """``stowaway queue show ID --json``: the row, its spool file and its history."""

    spool_file: SpoolFile
    events: list[Event]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequeueRequest(_Request):
    """Row ``ids``, or ``failed``, or a ``status`` (optionally with ``study``); optionally
    only one ``destination``'s rows: ``stowaway queue requeue``'s selectors."""

    ids: list[RowId] = Field(default_factory=list, max_length=MAX_IDS)
    failed: bool = False
    status: Status | None = None
    study: Uid | None = None
    destination: DestinationName | None = None


class RequeueResult(BaseModel):
    """``stowaway queue requeue --json``."""

    requeued: int
    #: closed as superseded: a newer copy of the same instance exists
    superseded: list[int]
    #: left alone: in flight under a live lease
    leased: list[int]
    #: skipped: done and the spool file is gone
    file_gone: list[int]
    not_found: list[int]


class PurgeRequest(_Request):
    """Row ``ids``, or ``failed``, or ``done``, optionally ``older_than`` an age and only
    one ``destination``'s: ``stowaway queue purge``'s selectors. ``dry_run``: say what
    would go."""

    ids: list[RowId] = Field(default_factory=list, max_length=MAX_IDS)
    failed: bool = False
    done: bool = False
    older_than: When | None = None
    destination: DestinationName | None = None
    dry_run: bool = False


class PurgeResult(BaseModel):
    """``stowaway queue purge --json`` (with ``dry_run``: what would be purged)."""

    dry_run: bool
    purged: int
    bytes: int
    files_removed: int
    file_errors: list[str]
    #: left alone: in flight under a live lease, or changed meanwhile
    skipped: list[int]
    not_found: list[int]
    #: dry run only: the rows that would go (at most ``MAX_IDS`` of them)
    would_purge: list[int] | None = None


class RerouteRequest(_Request):
    """Unrouted row ``ids`` (none: every unrouted row); ``dry_run``: change nothing."""

    ids: list[RowId] = Field(default_factory=list, max_length=MAX_IDS)
    dry_run: bool = False


class RerouteRow(BaseModel):
    id: int
    destinations: list[str]
    created: list[int] | None = None
    skipped: list[str] | None = None


class RerouteResult(BaseModel):
    """``stowaway queue reroute --json``."""

    rows: list[RerouteRow]
    dry_run: bool
    not_found: list[int]
