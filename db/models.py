"""SQLAlchemy models for the queue.

Times are stored as naive UTC in the database (SQLite has no time zones) and
come back as aware UTC datetimes through :class:`UTCDateTime`.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Enum,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Status(enum.StrEnum):
    """Lifecycle of one delivery: a received instance on its way to one destination.

    ``pending`` -> ``in_flight`` (claimed with a lease) -> ``done`` | ``pending``
    (retry) | ``failed`` (kept for an operator). An operator moves ``failed``
    (or any state) back to ``pending`` with ``queue requeue``. ``unrouted``: no
    routing rule chose a destination and there is no default; the instance is
    kept (never claimed) until an operator reroutes or purges it.
    """

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    FAILED = "failed"
    UNROUTED = "unrouted"


class DestinationState(enum.StrEnum):
    """Whether the forwarder may send to a destination."""

    OK = "ok"
    BLOCKED = "blocked"


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


def _state_column(states: type[enum.Enum], name: str) -> Enum:
    """A Python enum stored as its values in a VARCHAR(16) with a CHECK constraint named
    ``name`` (no native database enum: adding a state is a plain migration)."""
    return Enum(
        states,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


_status_enum = _state_column(Status, "instance_status")


#: The destination an instance goes to when nothing names another: ``--dicomweb-url``
#: alone, and every row queued before destinations had names.
DEFAULT_DESTINATION = "default"


class Instance(Base):
    """One delivery: a received instance (its spool file) and its forwarding state at
    one destination. An instance routed to several destinations has a row for each,
    sharing the spool file, which stays until every one of them is done."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_aet: Mapped[str] = mapped_column(String(16))
    # The AE title the sender called us by (routing rules may test it).
    called_aet: Mapped[str] = mapped_column(String(16), server_default="")
    peer_address: Mapped[str] = mapped_column(String(64))
    # Which volume holds the spool file: each receiver node forwards only its own files.
    node_id: Mapped[str] = mapped_column(String(128), server_default="")
    # Where this row delivers to (a destination's name; empty while unrouted).
    destination: Mapped[str] = mapped_column(String(64), server_default=DEFAULT_DESTINATION)
    spool_path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[Status] = mapped_column(_status_enum)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    forwarded_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # What the destination was sent, recorded when it took it (JSON: the redaction
    # profile and UID scheme, the compression; NULL: the spooled bytes as received).
    applied: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        # The claim's access path: due pending rows, oldest first.
        # Each destination's workers claim only its rows.
        Index("ix_instances_due", "status", "node_id", "destination", "next_attempt_at", "id"),
        # Expired leases are re-claimed through this one, in lease order (with
        # ``id`` last, Postgres needs no sort step).
        Index("ix_instances_lease", "status", "node_id", "destination", "lease_expires_at", "id"),
        # A claim's rows of one study (both branches, in due order), and any
        # lookup by study: the study first, then the claim's columns.
        Index(
            "ix_instances_study_due",
            "study_instance_uid",
            "status",
            "node_id",
            "destination",
            "next_attempt_at",
            "id",
        ),
        Index("ix_instances_spool_path", "spool_path"),
        # At most one pending row per SOP Instance UID and destination: a re-send
        # replaces the copy queued for each destination.
        Index(
            "uq_instances_pending_sop",
            "sop_instance_uid",
            "destination",
            unique=True,
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_instances_sop", "sop_instance_uid"),
        # Done rows by when they were forwarded (NULL: closed without an upload, by
        # id): the done-file sweep, retention and "uploaded in the last hour".
        Index(
            "ix_instances_done",
            "forwarded_at",
            "node_id",
            "id",
            sqlite_where=text("status = 'done'"),
            postgresql_where=text("status = 'done'"),
        ),
        # Each destination's oldest pending row, without reading the others.
        Index(
            "ix_instances_pending_age",
            "destination",
            "received_at",
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
    )


class Destination(Base):
    """Forwarding state of one destination (blocked on 401/403 or a rejected association)."""

    __tablename__ = "destinations"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Where it is (a DICOMweb URL, or ``dimse://AET@host:port``), for operators.
    url: Mapped[str] = mapped_column(String(1024), server_default="")
    state: Mapped[DestinationState] = mapped_column(
        _state_column(DestinationState, "destination_state")
    )
    since: Mapped[datetime] = mapped_column(UTCDateTime())
    reason: Mapped[str | None] = mapped_column(Text)
    next_probe_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class InstanceEvent(Base):
    """History of one instance: every failure and operator action, newest last."""

    __tablename__ = "instance_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    instance_id: Mapped[int] = mapped_column(BigInteger, index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)


# -- storage commitment (PS3.4 Annex J) -------------------------------------------


class CommitmentStatus(enum.StrEnum):
    """Lifecycle of one storage commitment request.

    ``open`` -> (every item settled) the result is written and the report is due ->
    ``reported`` (the requester answered the N-EVENT-REPORT) | ``abandoned`` (the
    requester could not be reached for ``--commitment-report-for``). A request stays
    ``open`` while it waits for its instances and while its report is retried;
    ``settled_at`` says which of the two.
    """

    OPEN = "open"
    REPORTED = "reported"
    ABANDONED = "abandoned"


class ItemResult(enum.StrEnum):
    """What stowaway commits to for one referenced instance."""

    COMMITTED = "committed"
    FAILED = "failed"


class Commitment(Base):
    """One N-ACTION storage commitment request, from its receipt to its report."""

    __tablename__ = "commitments"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    transaction_uid: Mapped[str] = mapped_column(String(64))
    #: the requester: its AE title (the AE dictionary gives its address for a report
    #: on a new association) and where the N-ACTION came from
    calling_aet: Mapped[str] = mapped_column(String(16))
    called_aet: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    #: the process that answered the N-ACTION (only it can use that association)
    received_by: Mapped[str] = mapped_column(String(128))
    status: Mapped[CommitmentStatus] = mapped_column(
        _state_column(CommitmentStatus, "commitment_status")
    )
    #: 1 every instance committed, 2 a failure exists (set when settled)
    event_type: Mapped[int | None] = mapped_column(Integer)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime())
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: when the reporter looks next (settle again, or send again after a failure)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    report_attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        # A Transaction UID identifies a request of one requester (PS3.4 J.3.2.1.2).
        Index("uq_commitments_transaction", "calling_aet", "transaction_uid", unique=True),
        # The reporter's access path: open requests by due time.
        Index("ix_commitments_due", "status", "next_attempt_at", "id"),
    )


class CommitmentItem(Base):
    """One Referenced SOP Sequence item of a request, and what became of it."""

    __tablename__ = "commitment_items"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    commitment_id: Mapped[int] = mapped_column(BigInteger, index=True)
    #: its place in the request's Referenced SOP Sequence (the report keeps the order)
    position: Mapped[int] = mapped_column(Integer)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    result: Mapped[ItemResult | None] = mapped_column(_state_column(ItemResult, "item_result"))
    #: the Failure Reason (0008,1197) of a failed item
    failure_reason: Mapped[int | None] = mapped_column(Integer)
    #: why, in words, for operators (never sent to the requester)
    detail: Mapped[str | None] = mapped_column(Text)


class QueueCount(Base):
    """How many rows (and bytes) each destination has in each status.

    Kept by triggers on ``instances`` (migration 0005), in the transaction of
    every insert, status change and delete, whatever statement makes it: ``queue
    stats`` and ``/metrics`` read these few rows instead of counting the table.
    On Postgres the triggers append to :data:`queue_count_deltas` instead, so
    that concurrent writers never wait on one counter row; readers add the two,
    and :meth:`stowaway.db.queue.Queue.fold_counts` moves the deltas in here.
    """

    __tablename__ = "queue_counts"

    destination: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    instances: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)


#: Changes of :class:`QueueCount` not folded in yet (Postgres; empty on SQLite).
#: No key and no index: rows are only appended, and read and deleted all at once.
queue_count_deltas = Table(
    "queue_count_deltas",
    Base.metadata,
    Column("destination", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("instances", BigInteger, nullable=False),
    Column("bytes", BigInteger, nullable=False),
)
