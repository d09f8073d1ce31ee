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

    __table_args__ = (
        # The claim's access path: due pending rows, oldest first.
        # Each destination's workers claim only its rows.
        Index("ix_instances_due", "status", "node_id", "destination", "next_attempt_at", "id"),
        # Expired leases are re-claimed through this one, in lease order (with
        # ``id`` last, Postgres needs no sort step).
        Index("ix_instances_lease", "status", "node_id", "destination", "lease_expires_at", "id"),
        Index("ix_instances_study", "study_instance_uid"),
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
