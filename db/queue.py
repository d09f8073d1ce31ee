"""Every queue operation, and the only SQL in stowaway.

Each operation runs in its own short transaction and returns small frozen
records. Status changes are guarded in the WHERE clause: a transition from the
wrong state changes nothing and raises :class:`TransitionError`.

Duplicate rule: at most one ``pending`` row per SOP Instance UID. A re-sent
instance that is still pending replaces the queued copy (latest copy wins; the
old spool file is returned to the caller for deletion). If the earlier copy is
already ``in_flight``, the new copy gets its own pending row; should the
in-flight one come back for a retry, it is superseded by the newer copy
(closed as ``done`` with a note) instead of being sent again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    and_,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from db.models import (
    Destination,
    DestinationState,
    Instance,
    InstanceEvent,
    Status,
    utcnow,
)


class TransitionError(RuntimeError):
    """A status change whose guard matched no row (wrong state or lost lease)."""


@dataclass(frozen=True)
class NewInstance:
    """What the receiver knows about an instance it has just spooled."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    calling_aet: str
    peer_address: str
    spool_path: str
    size_bytes: int
    sha256: str
    node_id: str = ""


@dataclass(frozen=True)
class EnqueueResult:
    id: int
    #: spool file of the pending copy this one replaced, to delete after commit
    replaced_spool_path: str | None


@dataclass(frozen=True)
class QueuedInstance:
    """A row of the queue."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    calling_aet: str
    peer_address: str
    node_id: str
    spool_path: str
    size_bytes: int
    sha256: str
    status: Status
    attempts: int
    next_attempt_at: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    received_at: datetime
    forwarded_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.isoformat() if isinstance(value, datetime) else value
        out["status"] = self.status.value
        return out


@dataclass(frozen=True)
class QueueStats:
    counts: dict[Status, int]
    bytes: dict[Status, int]
    oldest_pending_received_at: datetime | None


@dataclass(frozen=True)
class DestinationStatus:
    url: str
    state: DestinationState
    since: datetime
    reason: str | None
    next_probe_at: datetime | None


_COLUMNS = [Instance.__table__.c[f.name] for f in fields(QueuedInstance)]


def _record(row: Any) -> QueuedInstance:
    values = row._mapping
    return QueuedInstance(**{f.name: values[f.name] for f in fields(QueuedInstance)})


#: The claim looks at expired leases first (their forwarder died), then due rows.
CLAIM_BRANCHES = ("expired_lease", "due")


def claim_candidates(branch: str, now: datetime, node_id: str, limit: int) -> Select[Any]:
    """The ids one claim branch would take, oldest first, skipping locked rows.

    Each branch is a range scan of its own index (``ix_instances_lease``,
    ``ix_instances_due``); a test checks the query plans use them.
    """
    if branch == "expired_lease":
        condition = and_(Instance.status == Status.IN_FLIGHT, Instance.lease_expires_at < now)
        order = (Instance.lease_expires_at, Instance.id)
    else:
        condition = and_(Instance.status == Status.PENDING, Instance.next_attempt_at <= now)
        order = (Instance.next_attempt_at, Instance.id)
    return (
        select(Instance.id)
        .where(condition, Instance.node_id == node_id)
        .order_by(*order)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


class Queue:
    """The queue table and its state machine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- receiver side -----------------------------------------------------

    def enqueue(self, new: NewInstance) -> EnqueueResult:
        """Record a spooled instance as pending, due now (see the duplicate rule)."""
        for attempt in range(3):
            try:
                return self._enqueue_once(new)
            except IntegrityError:
                # A concurrent receipt of the same UID inserted first; retry sees it.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _enqueue_once(self, new: NewInstance) -> EnqueueResult:
        now = utcnow()
        values = {
            "sop_class_uid": new.sop_class_uid,
            "study_instance_uid": new.study_instance_uid,
            "series_instance_uid": new.series_instance_uid,
            "transfer_syntax_uid": new.transfer_syntax_uid,
            "calling_aet": new.calling_aet,
            "peer_address": new.peer_address,
            "node_id": new.node_id,
            "spool_path": new.spool_path,
            "size_bytes": new.size_bytes,
            "sha256": new.sha256,
            "received_at": now,
            "next_attempt_at": now,
        }
        with self._tx() as conn:
            existing = conn.execute(
                select(Instance.id, Instance.spool_path)
                .where(
                    Instance.sop_instance_uid == new.sop_instance_uid,
                    Instance.status == Status.PENDING,
                )
                .with_for_update()
            ).first()
            if existing is not None:
                conn.execute(
                    update(Instance)
                    .where(Instance.id == existing.id, Instance.status == Status.PENDING)
                    .values(**values, attempts=0, last_error=None)
                )
                _log_event(conn, existing.id, "replaced", f"re-sent; was {existing.spool_path}")
                return EnqueueResult(existing.id, existing.spool_path)
            row_id = conn.execute(
                insert(Instance)
                .values(
                    **values,
                    sop_instance_uid=new.sop_instance_uid,
                    status=Status.PENDING,
                    attempts=0,
                )
                .returning(Instance.id)
            ).scalar_one()
            return EnqueueResult(row_id, None)

    # -- forwarder side ----------------------------------------------------

    def claim_batch(
        self, owner: str, limit: int, lease: timedelta, node_id: str = ""
    ) -> list[QueuedInstance]:
        """Lease up to ``limit`` rows: expired leases first, then due pending rows.

        On Postgres the candidate rows are locked with ``FOR UPDATE SKIP
        LOCKED``, so concurrent forwarders never claim the same row. On SQLite
        the transaction holds the write lock (``BEGIN IMMEDIATE``) throughout.
        """
        now = utcnow()
        claimed: list[QueuedInstance] = []
        with self._tx() as conn:
            for branch in CLAIM_BRANCHES:
                wanted = limit - len(claimed)
                if wanted <= 0:
                    break
                candidates = claim_candidates(branch, now, node_id, wanted).scalar_subquery()
                rows = conn.execute(
                    update(Instance)
                    .where(Instance.id.in_(candidates))
                    .values(
                        status=Status.IN_FLIGHT,
                        lease_owner=owner,
                        lease_expires_at=now + lease,
                    )
                    .returning(*_COLUMNS)
                ).all()
                claimed.extend(_record(r) for r in rows)
        claimed.sort(key=lambda r: (r.next_attempt_at, r.id))
        return claimed

    def extend_lease(self, ids: Sequence[int], owner: str, lease: timedelta) -> int:
        """Push the lease of rows still held by ``owner``; returns how many."""
        with self._tx() as conn:
            return conn.execute(
                update(Instance)
                .where(*self._held(ids, owner))
                .values(lease_expires_at=utcnow() + lease)
            ).rowcount

    def complete(self, row_id: int, owner: str) -> None:
        """The destination confirmed the instance: ``in_flight`` -> ``done``."""
        with self._tx() as conn:
            self._transition(
                conn,
                row_id,
                owner,
                status=Status.DONE,
                forwarded_at=utcnow(),
                last_error=None,
                lease_owner=None,
                lease_expires_at=None,
            )

    def retry(self, row_id: int, owner: str, error: str, next_attempt_at: datetime) -> None:
        """A transient failure: back to ``pending`` later, one more attempt counted."""
        self._back_to_pending(row_id, owner, error, next_attempt_at, count_attempt=True)

    def release(self, row_id: int, owner: str, next_attempt_at: datetime | None = None) -> None:
        """Give the row back untouched (shutdown, or the destination is blocked)."""
        self._back_to_pending(row_id, owner, None, next_attempt_at or utcnow(), False)

    def fail(self, row_id: int, owner: str, error: str) -> None:
        """A permanent failure: ``failed``, kept with its file for an operator."""
        with self._tx() as conn:
            self._transition(
                conn,
                row_id,
                owner,
                status=Status.FAILED,
                attempts=Instance.attempts + 1,
                last_error=error,
                lease_owner=None,
                lease_expires_at=None,
            )
            _log_event(conn, row_id, "failed", error)

    def _back_to_pending(
        self,
        row_id: int,
        owner: str,
        error: str | None,
        next_attempt_at: datetime,
        count_attempt: bool,
    ) -> None:
        with self._tx() as conn:
            sop = conn.execute(
                select(Instance.sop_instance_uid).where(Instance.id == row_id)
            ).scalar_one_or_none()
            newer = conn.execute(
                select(Instance.id).where(
                    Instance.sop_instance_uid == sop, Instance.status == Status.PENDING
                )
            ).scalar_one_or_none()
            if newer is not None:
                self._transition(
                    conn,
                    row_id,
                    owner,
                    status=Status.DONE,
                    last_error=f"superseded by a newer copy (row {newer})",
                    lease_owner=None,
                    lease_expires_at=None,
                )
                _log_event(conn, row_id, "superseded", f"row {newer}")
                return
            values: dict[str, Any] = {
                "status": Status.PENDING,
                "next_attempt_at": next_attempt_at,
                "lease_owner": None,
                "lease_expires_at": None,
            }
            if count_attempt:
                values["attempts"] = Instance.attempts + 1
                values["last_error"] = error
            self._transition(conn, row_id, owner, **values)
            if error is not None:
                _log_event(conn, row_id, "retry", error)

    @staticmethod
    def _held(ids: Sequence[int], owner: str) -> tuple[Any, ...]:
        return (
            Instance.id.in_(ids),
            Instance.status == Status.IN_FLIGHT,
            Instance.lease_owner == owner,
        )

    def _transition(self, conn: Connection, row_id: int, owner: str, **values: Any) -> None:
        result = conn.execute(update(Instance).where(*self._held([row_id], owner)).values(**values))
        if result.rowcount != 1:
            raise TransitionError(
                f"row {row_id} is not in_flight under lease {owner!r}; "
                f"cannot set {values.get('status')}"
            )

    # -- reading -----------------------------------------------------------

    def get(self, row_id: int) -> QueuedInstance | None:
        with self._tx() as conn:
            row = conn.execute(select(*_COLUMNS).where(Instance.id == row_id)).first()
        return _record(row) if row is not None else None

    def find_by_sop(self, sop_instance_uid: str) -> list[QueuedInstance]:
        with self._tx() as conn:
            rows = conn.execute(
                select(*_COLUMNS)
                .where(Instance.sop_instance_uid == sop_instance_uid)
                .order_by(Instance.id)
            ).all()
        return [_record(r) for r in rows]

    def rows(
        self,
        status: Status | None = None,
        limit: int | None = None,
        study_instance_uid: str | None = None,
        since: datetime | None = None,
    ) -> list[QueuedInstance]:
        """Rows oldest first, optionally filtered."""
        query = select(*_COLUMNS).order_by(Instance.id)
        if status is not None:
            query = query.where(Instance.status == status)
        if study_instance_uid is not None:
            query = query.where(Instance.study_instance_uid == study_instance_uid)
        if since is not None:
            query = query.where(Instance.received_at >= since)
        if limit is not None:
            query = query.limit(limit)
        with self._tx() as conn:
            return [_record(r) for r in conn.execute(query).all()]

    def done_spool_paths(
        self, forwarded_after: datetime, forwarded_before: datetime, limit: int = 1000
    ) -> list[tuple[datetime, str]]:
        """Spool paths of rows forwarded in a time window, oldest first (for --keep-done)."""
        with self._tx() as conn:
            rows = conn.execute(
                select(Instance.forwarded_at, Instance.spool_path)
                .where(
                    Instance.status == Status.DONE,
                    Instance.forwarded_at > forwarded_after,
                    Instance.forwarded_at <= forwarded_before,
                )
                .order_by(Instance.forwarded_at)
                .limit(limit)
            ).all()
        return [(r.forwarded_at, r.spool_path) for r in rows]

    def stats(self) -> QueueStats:
        with self._tx() as conn:
            rows = conn.execute(
                select(
                    Instance.status,
                    func.count(),
                    func.coalesce(func.sum(Instance.size_bytes), 0),
                ).group_by(Instance.status)
            ).all()
            oldest = conn.execute(
                select(Instance.received_at)
                .where(Instance.status == Status.PENDING)
                .order_by(Instance.received_at)
                .limit(1)
            ).scalar_one_or_none()
        counts = {s: 0 for s in Status}
        sizes = {s: 0 for s in Status}
        for status, count, size in rows:
            counts[Status(status)] = int(count)
            sizes[Status(status)] = int(size)
        return QueueStats(counts, sizes, oldest)

    def events(self, row_id: int) -> list[tuple[datetime, str, str | None]]:
        with self._tx() as conn:
            rows = conn.execute(
                select(InstanceEvent.at, InstanceEvent.kind, InstanceEvent.detail)
                .where(InstanceEvent.instance_id == row_id)
                .order_by(InstanceEvent.id)
            ).all()
        return [(r.at, r.kind, r.detail) for r in rows]

    # -- destinations --------------------------------------------------------

    def destination(self, url: str) -> DestinationStatus | None:
        with self._tx() as conn:
            row = conn.execute(select(Destination).where(Destination.url == url)).first()
        if row is None:
            return None
        return DestinationStatus(row.url, row.state, row.since, row.reason, row.next_probe_at)

    def set_destination(
        self, url: str, state: DestinationState, reason: str | None, next_probe_at: datetime | None
    ) -> bool:
        """Record a destination's state; returns True if the state changed."""
        now = utcnow()
        with self._tx() as conn:
            current = conn.execute(
                select(Destination.state).where(Destination.url == url).with_for_update()
            ).scalar_one_or_none()
            if current is None:
                conn.execute(
                    insert(Destination).values(
                        url=url, state=state, since=now, reason=reason, next_probe_at=next_probe_at
                    )
                )
                return state != DestinationState.OK
            values: dict[str, Any] = {"reason": reason, "next_probe_at": next_probe_at}
            if current != state:
                values["since"] = now
            conn.execute(
                update(Destination).where(Destination.url == url).values(state=state, **values)
            )
            return bool(current != state)

    # -- maintenance ----------------------------------------------------------

    def delete_rows(self, ids: Sequence[int]) -> int:
        with self._tx() as conn:
            conn.execute(delete(InstanceEvent).where(InstanceEvent.instance_id.in_(ids)))
            return conn.execute(delete(Instance).where(Instance.id.in_(ids))).rowcount


def _log_event(conn: Connection, row_id: int, kind: str, detail: str | None) -> None:
    conn.execute(
        insert(InstanceEvent).values(instance_id=row_id, at=utcnow(), kind=kind, detail=detail)
    )
