"""Storage commitment requests in the queue database: every statement about them, and the
settlement rule.

A request (PS3.4 J.3.2, an N-ACTION of the Storage Commitment Push Model SOP Class) is
recorded with each of its Referenced SOP Sequence items before the N-ACTION is answered,
in one durable transaction. The reporter (any process on the queue) claims open requests
with a lease (``FOR UPDATE SKIP LOCKED`` on Postgres, the write lock on SQLite), so one
process at a time works on each, and every write it makes is guarded by that lease.

The settlement rule (:func:`settle_item`) is written here once: an item is committed
when its instance is ``done`` at every destination its routing chose, judged on the copies
that count (:func:`deliveries`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from sqlalchemy import Connection, Engine, and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from tenacity import retry, retry_if_exception_type, stop_after_attempt

from stowaway.db.engine import TxMode, with_tx_mode
from stowaway.db.models import (
    Commitment,
    CommitmentItem,
    CommitmentStatus,
    Instance,
    ItemResult,
    Status,
    utcnow,
)
from stowaway.db.statements import newer_copies

#: Failure Reason (0008,1197) values a report uses (PS3.4 J.3.3.1, PS3.3 C.14).
PROCESSING_FAILURE: Final = 0x0110
NO_SUCH_OBJECT_INSTANCE: Final = 0x0112
CLASS_INSTANCE_CONFLICT: Final = 0x0119

#: Event Type ID of the N-EVENT-REPORT (PS3.4 J.3.3.1.2).
ALL_COMMITTED: Final = 1
FAILURES_EXIST: Final = 2

#: UIDs per ``IN (...)`` list.
_CHUNK = 500

#: Two receipts of one Transaction UID from one requester raced on the unique index: the
#: second, run again, sees the first.
_retry_on_duplicate = retry(
    retry=retry_if_exception_type(IntegrityError), stop=stop_after_attempt(3), reraise=True
)


# -- records -------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestedItem:
    """One Referenced SOP Sequence item of an N-ACTION."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class CommitmentRequest:
    """What the receiver knows about an N-ACTION it is about to answer."""

    transaction_uid: str
    calling_aet: str
    called_aet: str
    peer_address: str
    #: the process answering it (the only one that can report on its association)
    received_by: str
    items: tuple[RequestedItem, ...]


class Recorded(StrEnum):
    """What :meth:`Commitments.record` made of a request."""

    #: a new request, open
    NEW = "new"
    #: the same request again while it is open: nothing added (its N-ACTION-RSP was lost)
    DUPLICATE = "duplicate"
    #: the same request again after its report: open again, the report will be sent again
    REOPENED = "reopened"
    #: the Transaction UID names a different request of this requester: refused
    CONFLICT = "conflict"


@dataclass(frozen=True)
class RecordResult:
    id: int
    outcome: Recorded


@dataclass(frozen=True)
class CommitmentRecord:
    """A row of ``commitments``."""

    id: int
    transaction_uid: str
    calling_aet: str
    called_aet: str
    peer_address: str
    received_by: str
    status: CommitmentStatus
    event_type: int | None
    requested_at: datetime
    settled_at: datetime | None
    reported_at: datetime | None
    next_attempt_at: datetime
    report_attempts: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.isoformat() if isinstance(value, datetime) else value
        out["status"] = self.status.value
        return out


@dataclass(frozen=True)
class ItemRecord:
    """A row of ``commitment_items``."""

    position: int
    sop_class_uid: str
    sop_instance_uid: str
    result: ItemResult | None
    failure_reason: int | None
    detail: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "sop_class_uid": self.sop_class_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "result": self.result.value if self.result else None,
            "failure_reason": f"0x{self.failure_reason:04X}" if self.failure_reason else None,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Delivery:
    """A copy of an instance that counts for the settlement, at one destination."""

    destination: str
    status: Status
    sop_class_uid: str
    last_error: str | None


@dataclass(frozen=True)
class Settlement:
    """What the rule says of one item: committed, failed (with its reason) or, with
    ``result`` None, not settled yet."""

    result: ItemResult | None
    failure_reason: int | None = None
    detail: str | None = None
    #: the destinations it was delivered to (those a verification asks)
    delivered_to: tuple[str, ...] = ()


@dataclass(frozen=True)
class CommitmentStats:
    counts: dict[CommitmentStatus, int]
    oldest_open_requested_at: datetime | None
    #: open requests whose result is written and whose report waits to be delivered
    reports_due: int


# -- the settlement rule -----------------------------------------------------------------


def settle_item(
    requested_class: str,
    deliveries: Sequence[Delivery],
    *,
    expired: bool,
    not_found_at: Sequence[str] = (),
) -> Settlement:
    """The one settlement rule for a referenced instance.

    ``deliveries`` are the copies of its SOP Instance UID that count (:meth:`Commitments.
    deliveries`: superseded copies left out), one or more per destination its routing
    chose. ``expired``: ``--commitment-timeout`` has passed since the request.
    ``not_found_at``: destinations where a verification did not find it.

    * no copy at all: never received, 0x0112 (no such object instance);
    * a copy of another SOP Class than the request names: 0x0119 (class/instance conflict);
    * a delivery failed permanently (``failed``, for an operator): 0x0110;
    * every copy ``done`` (and found wherever verified): committed;
    * otherwise (pending, in flight, unrouted, not found yet) it waits, until the
      timeout makes it 0x0110.
    """
    if not deliveries:
        return Settlement(ItemResult.FAILED, NO_SUCH_OBJECT_INSTANCE, "never received by stowaway")
    classes = sorted({d.sop_class_uid for d in deliveries if d.sop_class_uid != requested_class})
    if classes:
        return Settlement(
            ItemResult.FAILED,
            CLASS_INSTANCE_CONFLICT,
            f"stored with SOP Class UID {classes[0]}, not {requested_class}",
        )
    failed = [d for d in deliveries if d.status == Status.FAILED]
    if failed:
        first = failed[0]
        return Settlement(
            ItemResult.FAILED,
            PROCESSING_FAILURE,
            f"delivery to {first.destination} failed: {first.last_error or 'no reason recorded'}",
        )
    waiting = sorted({_waiting_at(d) for d in deliveries if d.status != Status.DONE})
    waiting += sorted(set(not_found_at) - set(waiting))
    if not waiting:
        return Settlement(
            ItemResult.COMMITTED, delivered_to=tuple(sorted({d.destination for d in deliveries}))
        )
    if expired:
        return Settlement(
            ItemResult.FAILED,
            PROCESSING_FAILURE,
            f"not delivered within --commitment-timeout: {', '.join(waiting)}",
        )
    return Settlement(None, detail=f"waiting for {', '.join(waiting)}")


def _waiting_at(delivery: Delivery) -> str:
    if delivery.status == Status.UNROUTED:
        return "a destination (unrouted: queue reroute)"
    return delivery.destination


def event_type(settlements: Sequence[Settlement]) -> int:
    """Event Type ID of a report: 1 when every item is committed, else 2."""
    if all(s.result == ItemResult.COMMITTED for s in settlements):
        return ALL_COMMITTED
    return FAILURES_EXIST


# -- the queue operations --------------------------------------------------------------

_COMMITMENT_COLUMNS = list(Commitment.__table__.c)
_ITEM_COLUMNS = (
    CommitmentItem.position,
    CommitmentItem.sop_class_uid,
    CommitmentItem.sop_instance_uid,
    CommitmentItem.result,
    CommitmentItem.failure_reason,
    CommitmentItem.detail,
)


def _commitment(row: Any) -> CommitmentRecord:
    values = row._mapping
    return CommitmentRecord(**{f.name: values[f.name] for f in fields(CommitmentRecord)})


def _item(row: Any) -> ItemRecord:
    values = row._mapping
    return ItemRecord(**{f.name: values[f.name] for f in fields(ItemRecord)})


class LeaseLost(RuntimeError):
    """A write whose guard matched nothing: the lease expired and another process took it."""


class Commitments:
    """The commitments tables and their state machine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._engines = {mode: with_tx_mode(engine, mode) for mode in TxMode}

    @contextmanager
    def _tx(self, mode: TxMode = TxMode.DURABLE) -> Iterator[Connection]:
        with self._engines[mode].begin() as conn:
            yield conn

    # -- the receiver's record -------------------------------------------------------

    @_retry_on_duplicate
    def record(self, request: CommitmentRequest) -> RecordResult:
        """Record a request durably (before its N-ACTION is answered Success).

        A Transaction UID identifies one request of one requester (PS3.4 J.3.2.1.2): the
        same request again is never recorded twice (see :class:`Recorded`).
        """
        now = utcnow()
        with self._tx() as conn:
            existing = conn.execute(
                select(Commitment.id, Commitment.status)
                .where(
                    Commitment.calling_aet == request.calling_aet,
                    Commitment.transaction_uid == request.transaction_uid,
                )
                .with_for_update()
            ).first()
            if existing is None:
                return RecordResult(self._insert(conn, request, now), Recorded.NEW)
            row_id = int(existing.id)
            stored = [
                RequestedItem(str(r.sop_class_uid), str(r.sop_instance_uid))
                for r in conn.execute(
                    select(CommitmentItem.sop_class_uid, CommitmentItem.sop_instance_uid)
                    .where(CommitmentItem.commitment_id == row_id)
                    .order_by(CommitmentItem.position)
                )
            ]
            if stored != list(request.items):
                return RecordResult(row_id, Recorded.CONFLICT)
            # The requester is on a new association: a report may use that one.
            values: dict[str, Any] = {
                "received_by": request.received_by,
                "peer_address": request.peer_address,
                "called_aet": request.called_aet,
            }
            outcome = Recorded.DUPLICATE
            if existing.status != CommitmentStatus.OPEN:
                outcome = Recorded.REOPENED
                values.update(_reopened(now))
                conn.execute(
                    update(CommitmentItem)
                    .where(CommitmentItem.commitment_id == row_id)
                    .values(result=None, failure_reason=None, detail=None)
                )
            conn.execute(update(Commitment).where(Commitment.id == row_id).values(**values))
            return RecordResult(row_id, outcome)

    @staticmethod
    def _insert(conn: Connection, request: CommitmentRequest, now: datetime) -> int:
        row_id = conn.execute(
            insert(Commitment)
            .values(
                transaction_uid=request.transaction_uid,
                calling_aet=request.calling_aet,
                called_aet=request.called_aet,
                peer_address=request.peer_address,
                received_by=request.received_by,
                status=CommitmentStatus.OPEN,
                requested_at=now,
                next_attempt_at=now,
                report_attempts=0,
            )
            .returning(Commitment.id)
        ).scalar_one()
        if request.items:
            conn.execute(
                insert(CommitmentItem),
                [
                    {
                        "commitment_id": row_id,
                        "position": position,
                        "sop_class_uid": item.sop_class_uid,
                        "sop_instance_uid": item.sop_instance_uid,
                    }
                    for position, item in enumerate(request.items)
                ],
            )
        return int(row_id)

    # -- the reporter ----------------------------------------------------------------

    def claim_due(
        self, owner: str, lease: timedelta, limit: int, handover: timedelta = timedelta(0)
    ) -> list[CommitmentRecord]:
        """Lease up to ``limit`` open requests that are due, or whose lease expired.

        A request is first the process's that took its N-ACTION (``received_by``): it
        may hold the requester's association, on which the report should go. Another
        process takes it only once it has been due for ``handover`` (that process is
        gone, or busy), or when its lease expired.
        """
        now = utcnow()
        due = and_(
            Commitment.lease_owner.is_(None),
            Commitment.next_attempt_at <= now,
            or_(Commitment.received_by == owner, Commitment.next_attempt_at <= now - handover),
        )
        candidates = (
            select(Commitment.id)
            .where(
                Commitment.status == CommitmentStatus.OPEN,
                or_(due, Commitment.lease_expires_at < now),
            )
            .order_by(Commitment.next_attempt_at, Commitment.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        with self._tx(TxMode.LAZY) as conn:
            rows = conn.execute(
                update(Commitment)
                .where(Commitment.id.in_(candidates))
                .values(lease_owner=owner, lease_expires_at=now + lease)
                .returning(*_COMMITMENT_COLUMNS)
            ).all()
        return sorted((_commitment(r) for r in rows), key=lambda c: (c.next_attempt_at, c.id))

    def deliveries(self, sop_instance_uids: Sequence[str]) -> dict[str, list[Delivery]]:
        """The copies that count for the settlement of each SOP Instance UID.

        A copy counts unless it is superseded: closed as superseded (``done`` without
        an upload), or a newer copy of it exists for its destination
        (:func:`stowaway.db.statements.newer_copies`, the duplicate rule's one
        comparison). A ``failed`` newer copy does not supersede, so a failure of the
        latest copy counts even when an older one was delivered.
        """
        found: dict[str, list[Delivery]] = {uid: [] for uid in sop_instance_uids}
        superseded = newer_copies(
            Instance.sop_instance_uid, Instance.destination, Instance.received_at, Instance.id
        ).exists()
        closed_as_superseded = and_(Instance.status == Status.DONE, Instance.forwarded_at.is_(None))
        uids = sorted(found)
        with self._tx(TxMode.READ) as conn:
            for start in range(0, len(uids), _CHUNK):
                rows = conn.execute(
                    select(
                        Instance.sop_instance_uid,
                        Instance.destination,
                        Instance.status,
                        Instance.sop_class_uid,
                        Instance.last_error,
                    )
                    .where(
                        Instance.sop_instance_uid.in_(uids[start : start + _CHUNK]),
                        ~closed_as_superseded,
                        ~superseded,
                    )
                    .order_by(Instance.id)
                )
                for row in rows:
                    found[str(row.sop_instance_uid)].append(
                        Delivery(
                            str(row.destination),
                            Status(row.status),
                            str(row.sop_class_uid),
                            row.last_error,
                        )
                    )
        return found

    def items(self, commitment_id: int) -> list[ItemRecord]:
        with self._tx(TxMode.READ) as conn:
            rows = conn.execute(
                select(*_ITEM_COLUMNS)
                .where(CommitmentItem.commitment_id == commitment_id)
                .order_by(CommitmentItem.position)
            ).all()
        return [_item(r) for r in rows]

    def settle(self, commitment_id: int, owner: str, settlements: Sequence[Settlement]) -> int:
        """Write the result of every item (in request order) and make the report due now.

        Returns the Event Type ID. Raises :class:`LeaseLost` when ``owner`` no longer
        holds the request.
        """
        if any(s.result is None for s in settlements):
            raise ValueError("every item must be settled")
        kind = event_type(settlements)
        now = utcnow()
        with self._tx() as conn:
            self._guarded(
                conn,
                commitment_id,
                owner,
                settled_at=now,
                event_type=kind,
                next_attempt_at=now,
            )
            for position, settlement in enumerate(settlements):
                conn.execute(
                    update(CommitmentItem)
                    .where(
                        CommitmentItem.commitment_id == commitment_id,
                        CommitmentItem.position == position,
                    )
                    .values(
                        result=settlement.result,
                        failure_reason=settlement.failure_reason,
                        detail=settlement.detail,
                    )
                )
        return kind

    def wait(self, commitment_id: int, owner: str, next_attempt_at: datetime) -> None:
        """Not settled yet: give the request back, to be looked at again then."""
        with self._tx(TxMode.LAZY) as conn:
            self._guarded(
                conn,
                commitment_id,
                owner,
                next_attempt_at=next_attempt_at,
                lease_owner=None,
                lease_expires_at=None,
            )

    def reported(self, commitment_id: int, owner: str) -> None:
        """The requester answered the N-EVENT-REPORT: the request is closed."""
        with self._tx() as conn:
            self._guarded(
                conn,
                commitment_id,
                owner,
                status=CommitmentStatus.REPORTED,
                reported_at=utcnow(),
                report_attempts=Commitment.report_attempts + 1,
                last_error=None,
                lease_owner=None,
                lease_expires_at=None,
            )

    def report_failed(
        self, commitment_id: int, owner: str, error: str, next_attempt_at: datetime | None
    ) -> None:
        """The report did not reach the requester: again at ``next_attempt_at``, or
        (None) give up: ``abandoned``."""
        values: dict[str, Any] = {
            "report_attempts": Commitment.report_attempts + 1,
            "last_error": error,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if next_attempt_at is None:
            values["status"] = CommitmentStatus.ABANDONED
        else:
            values["next_attempt_at"] = next_attempt_at
        with self._tx() as conn:
            self._guarded(conn, commitment_id, owner, **values)

    def release(self, commitment_id: int, owner: str) -> None:
        """Give a request back untouched (shutdown), due at once for the next process."""
        with self._tx(TxMode.LAZY) as conn:
            conn.execute(
                update(Commitment)
                .where(Commitment.id == commitment_id, Commitment.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    def lease_owners(self) -> list[str]:
        """The processes holding a lease on an open request."""
        with self._tx(TxMode.READ) as conn:
            owners = conn.execute(
                select(Commitment.lease_owner)
                .where(
                    Commitment.status == CommitmentStatus.OPEN, Commitment.lease_owner.is_not(None)
                )
                .distinct()
            ).scalars()
            return sorted(str(o) for o in owners)

    def release_owner(self, owner: str) -> int:
        """Give back every request ``owner`` holds (a process known to be dead)."""
        with self._tx() as conn:
            return conn.execute(
                update(Commitment)
                .where(Commitment.status == CommitmentStatus.OPEN, Commitment.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            ).rowcount

    @staticmethod
    def _guarded(conn: Connection, commitment_id: int, owner: str, **values: Any) -> None:
        result = conn.execute(
            update(Commitment)
            .where(
                Commitment.id == commitment_id,
                Commitment.status == CommitmentStatus.OPEN,
                Commitment.lease_owner == owner,
            )
            .values(**values)
        )
        if result.rowcount != 1:
            raise LeaseLost(f"commitment {commitment_id} is not open under lease {owner!r}")

    # -- reading -------------------------------------------------------------------

    def get(self, commitment_id: int) -> CommitmentRecord | None:
        with self._tx(TxMode.READ) as conn:
            row = conn.execute(
                select(*_COMMITMENT_COLUMNS).where(Commitment.id == commitment_id)
            ).first()
        return _commitment(row) if row is not None else None

    def find(self, transaction_uid: str) -> list[CommitmentRecord]:
        """The requests with this Transaction UID (one per requester using it)."""
        with self._tx(TxMode.READ) as conn:
            rows = conn.execute(
                select(*_COMMITMENT_COLUMNS)
                .where(Commitment.transaction_uid == transaction_uid)
                .order_by(Commitment.id)
            ).all()
        return [_commitment(r) for r in rows]

    def rows(
        self, status: CommitmentStatus | None = None, limit: int | None = None
    ) -> list[CommitmentRecord]:
        """Requests, newest first."""
        query = select(*_COMMITMENT_COLUMNS).order_by(Commitment.id.desc())
        if status is not None:
            query = query.where(Commitment.status == status)
        if limit is not None:
            query = query.limit(limit)
        with self._tx(TxMode.READ) as conn:
            return [_commitment(r) for r in conn.execute(query).all()]

    def item_counts(self, commitment_ids: Sequence[int]) -> dict[int, dict[str, int]]:
        """Per request: its items by result (``waiting`` for those not settled)."""
        out: dict[int, dict[str, int]] = {i: {} for i in commitment_ids}
        if not commitment_ids:
            return out
        with self._tx(TxMode.READ) as conn:
            rows = conn.execute(
                select(CommitmentItem.commitment_id, CommitmentItem.result, func.count())
                .where(CommitmentItem.commitment_id.in_(list(commitment_ids)))
                .group_by(CommitmentItem.commitment_id, CommitmentItem.result)
            ).all()
        for commitment_id, result, count in rows:
            key = result.value if result is not None else "waiting"
            out[int(commitment_id)][key] = int(count)
        return out

    def stats(self) -> CommitmentStats:
        with self._tx(TxMode.READ) as conn:
            counts = {
                CommitmentStatus(status): int(count)
                for status, count in conn.execute(
                    select(Commitment.status, func.count()).group_by(Commitment.status)
                )
            }
            oldest = conn.execute(
                select(func.min(Commitment.requested_at)).where(
                    Commitment.status == CommitmentStatus.OPEN
                )
            ).scalar_one_or_none()
            due = conn.execute(
                select(func.count()).where(
                    Commitment.status == CommitmentStatus.OPEN,
                    Commitment.settled_at.is_not(None),
                )
            ).scalar_one()
        full = {status: counts.get(status, 0) for status in CommitmentStatus}
        return CommitmentStats(full, oldest, int(due))


def _reopened(now: datetime) -> dict[str, Any]:
    """What sending a request's report again writes: open, not settled, due now."""
    return {
        "status": CommitmentStatus.OPEN,
        "event_type": None,
        "settled_at": None,
        "reported_at": None,
        "next_attempt_at": now,
        "report_attempts": 0,
        "last_error": None,
        "lease_owner": None,
        "lease_expires_at": None,
    }
