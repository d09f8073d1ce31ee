"""Every queue operation: with :mod:`stowaway.db.statements`, the only SQL in stowaway.

Each operation runs in its own short transaction and returns small frozen
records. Status changes are guarded in the WHERE clause: a transition from the
wrong state changes nothing and raises :class:`TransitionError`.

Duplicate rule: at most one ``pending`` row per SOP Instance UID, and the later
``(received_at, id)`` wins (:func:`stowaway.db.statements.newer_copies` is the one
comparison). A re-sent instance that is still pending replaces the queued copy
(the old spool file is returned to the caller for deletion). If the earlier copy
is already ``in_flight``, the new copy gets its own pending row. Wherever an
older copy would be sent again (claimed, retried, given back, released,
requeued, overwritten on a conflict) while a newer copy is pending, in flight
or done, the older one is superseded instead: closed as ``done`` with a note
naming the newer row.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    delete,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.exc import IntegrityError
from tenacity import retry, retry_if_exception_type, stop_after_attempt

from stowaway.db.engine import TxMode, make_claim_engine, with_tx_mode
from stowaway.db.models import (
    DEFAULT_DESTINATION,
    Destination,
    DestinationState,
    Instance,
    InstanceEvent,
    QueueCount,
    Status,
    queue_count_deltas,
    utcnow,
)
from stowaway.db.statements import (
    CLAIM_BRANCHES,
    ROW_COLUMNS,
    ListParameter,
    PendingInsert,
    back_to_pending,
    claim_params,
    claim_statement,
    claim_statement_single,
    claim_study_statement,
    done_at,
    expired_done,
    full_counts,
    in_status,
    maintained_counts,
    newer_copies,
    oldest_pending,
    superseded_by,
)

#: A write that a concurrent receipt of the same UID beat to the unique pending
#: index: run again, it sees that receipt (the durable retry schedule is the row's).
_retry_on_pending_conflict = retry(
    retry=retry_if_exception_type(IntegrityError), stop=stop_after_attempt(3), reraise=True
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
    #: the AE title the sender called (one of ``--aet``'s)
    called_aet: str = ""
    #: where routing sent it: a row (a delivery) for each; none: kept as ``unrouted``
    destinations: tuple[str, ...] = (DEFAULT_DESTINATION,)


@dataclass(frozen=True)
class EnqueueResult:
    #: the first of its rows (the only one for a single destination)
    id: int
    #: spool file of the pending copy this one replaced, to delete after commit
    #: (only once no row points at it any more)
    replaced_spool_path: str | None
    #: every row recorded for it, one per destination
    ids: tuple[int, ...] = ()
    #: every replaced copy's spool file that no row points at any more (the first is
    #: ``replaced_spool_path``): copies queued for two destinations may differ
    replaced_spool_paths: tuple[str, ...] = ()


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
    called_aet: str
    peer_address: str
    node_id: str
    destination: str
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
    #: what the destination was sent, set when it took it (JSON; None: as received)
    applied: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.isoformat() if isinstance(value, datetime) else value
        out["status"] = self.status.value
        # What the destination was sent (redaction, compression): a JSON record.
        out["applied"] = json.loads(self.applied) if self.applied else None
        return out


@dataclass(frozen=True)
class QueueStats:
    counts: dict[Status, int]
    bytes: dict[Status, int]
    oldest_pending_received_at: datetime | None

    @staticmethod
    def total(parts: Sequence[QueueStats]) -> QueueStats:
        """The stats of several destinations together."""
        firsts = [p.oldest_pending_received_at for p in parts if p.oldest_pending_received_at]
        return QueueStats(
            {s: sum(p.counts[s] for p in parts) for s in Status},
            {s: sum(p.bytes[s] for p in parts) for s in Status},
            min(firsts) if firsts else None,
        )


@dataclass(frozen=True)
class RequeueResult:
    """What :meth:`Queue.requeue` did with the rows it was given."""

    #: now pending, due now
    requeued: tuple[int, ...] = ()
    #: closed as superseded by a newer copy (may include rows not asked for)
    superseded: tuple[int, ...] = ()
    #: left alone: ``in_flight`` under a live lease
    leased: tuple[int, ...] = ()


@dataclass(frozen=True)
class RerouteResult:
    """What :meth:`Queue.reroute` did with one unrouted row."""

    #: the new deliveries, pending and due now
    created: tuple[int, ...] = ()
    #: destinations skipped: a newer copy of the instance is already queued there
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class PurgeResult:
    """What :meth:`Queue.purge` deleted."""

    deleted: tuple[int, ...] = ()
    size_bytes: int = 0
    #: spool files no remaining row points to: the caller deletes them
    unreferenced_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReleaseResult:
    """What :meth:`Queue.release_expired` did with the rows it was given."""

    released: tuple[int, ...] = ()
    superseded: tuple[int, ...] = ()


@dataclass(frozen=True)
class RetiredBatch:
    """What one batch of :meth:`Queue.retire_done` deleted."""

    deleted: int = 0
    #: spool files no remaining row points to: the caller deletes them (most are
    #: gone already: the forwarder deletes a file once its rows are done)
    unreferenced_paths: tuple[str, ...] = ()
    #: where the next batch of the same kind starts (``after``)
    resume_after: datetime | int | None = None
    #: no more such rows before the cutoff: this pass is over
    finished: bool = True
    #: another process is retiring this node's rows right now (Postgres): try later
    busy: bool = False


#: Counts per ``(destination, status)``: ``(instances, bytes)``.
Counts = dict[tuple[str, Status], tuple[int, int]]


@dataclass(frozen=True)
class DestinationStatus:
    name: str
    url: str
    state: DestinationState
    since: datetime
    reason: str | None
    next_probe_at: datetime | None


def _record(row: Any) -> QueuedInstance:
    values = row._mapping
    return QueuedInstance(**{f.name: values[f.name] for f in fields(QueuedInstance)})


class Queue:
    """The queue table and its state machine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._engines = {mode: with_tx_mode(engine, mode) for mode in TxMode}
        self._claim = {branch: claim_statement(branch) for branch in CLAIM_BRANCHES}
        # Postgres: one statement, in autocommit, on connections that commit lazily.
        self._claim_engine = make_claim_engine(engine)
        self._claim_single = claim_statement_single()
        self._claim_study = claim_study_statement()
        self._insert_pending = PendingInsert(engine.dialect)
        self._id_list = ListParameter(engine.dialect.name, "id_list")
        self._path_list = ListParameter(engine.dialect.name, "path_list")
        # SQLite has one writer at a time, and a writer that finds the database locked
        # sleeps in SQLite's busy handler (1, 2, 5, 10 ms... between looks). The busy
        # writers of one process (claims, completions, the receiver's commits,
        # retention batches) take turns on this lock first: one that finds another
        # at work wakes the moment it ends.
        self._write_turn = threading.Lock() if engine.dialect.name == "sqlite" else None

    def close(self) -> None:
        """Close the claim pool's connections (the main engine is the caller's)."""
        if self._claim_engine is not None:
            self._claim_engine.dispose()

    @contextmanager
    def _tx(self, mode: TxMode = TxMode.DURABLE, *, turn: bool = False) -> Iterator[Connection]:
        """A transaction; with ``turn``, on SQLite, after this process's other busy
        writers (see ``_write_turn``)."""
        if turn and self._write_turn is not None:
            with self._write_turn, self._engines[mode].begin() as conn:
                yield conn
            return
        with self._engines[mode].begin() as conn:
            yield conn

    # -- receiver side -----------------------------------------------------

    @_retry_on_pending_conflict
    def enqueue(self, new: NewInstance) -> EnqueueResult:
        """Record a spooled instance as pending, due now (see the duplicate rule)."""
        with self._tx(turn=True) as conn:
            return self._enqueue_in(conn, new, utcnow())

    @_retry_on_pending_conflict
    def enqueue_many(self, news: Sequence[NewInstance]) -> list[EnqueueResult]:
        """:meth:`enqueue` for several instances in one transaction (one commit).

        The receiver's group commit uses it when instances arrive on several
        associations at once. Applied in order, so a later copy of a SOP
        Instance UID in ``news`` replaces an earlier one, as separate calls would.
        """
        now = utcnow()
        with self._tx(turn=True) as conn:
            return [self._enqueue_in(conn, new, now) for new in news]

    def _enqueue_in(self, conn: Connection, new: NewInstance, now: datetime) -> EnqueueResult:
        """A row per destination (the duplicate rule applies to each on its own), or
        one ``unrouted`` row when routing chose none."""
        if not new.destinations:
            row_id = conn.execute(
                insert(Instance)
                .values(
                    **self._row_values(new, now),
                    sop_instance_uid=new.sop_instance_uid,
                    destination="",
                    status=Status.UNROUTED,
                    attempts=0,
                )
                .returning(Instance.id)
            ).scalar_one()
            _log_event(conn, row_id, "unrouted", "no routing rule matched and no default")
            return EnqueueResult(row_id, None, (row_id,))
        ids: list[int] = []
        replaced: set[str] = set()
        for destination in dict.fromkeys(new.destinations):
            row_id, replaced_path = self._enqueue_for(conn, new, destination, now)
            ids.append(row_id)
            if replaced_path is not None:
                replaced.add(replaced_path)
        if not replaced:  # the common case: no query more on the receiver's path
            return EnqueueResult(ids[0], None, tuple(ids))
        still_used = set(
            conn.execute(
                select(Instance.spool_path).where(Instance.spool_path.in_(sorted(replaced)))
            ).scalars()
        )
        unused = tuple(sorted(replaced - still_used))
        return EnqueueResult(ids[0], unused[0] if unused else None, tuple(ids), unused)

    @staticmethod
    def _row_values(new: NewInstance, now: datetime) -> dict[str, Any]:
        return {
            "sop_class_uid": new.sop_class_uid,
            "study_instance_uid": new.study_instance_uid,
            "series_instance_uid": new.series_instance_uid,
            "transfer_syntax_uid": new.transfer_syntax_uid,
            "calling_aet": new.calling_aet,
            "called_aet": new.called_aet,
            "peer_address": new.peer_address,
            "node_id": new.node_id,
            "spool_path": new.spool_path,
            "size_bytes": new.size_bytes,
            "sha256": new.sha256,
            "received_at": now,
            "next_attempt_at": now,
        }

    def _enqueue_for(
        self, conn: Connection, new: NewInstance, destination: str, now: datetime
    ) -> tuple[int, str | None]:
        """One destination's row; returns it and the spool path of the pending copy it
        replaced, if any."""
        values = {**self._row_values(new, now), "destination": destination}
        # The common case, a UID with no pending copy for this destination, is one
        # statement: insert unless the partial unique index (one pending row per UID
        # and destination) already holds one.
        row_id = self._insert_pending(
            conn,
            {
                **values,
                "sop_instance_uid": new.sop_instance_uid,
                "status": Status.PENDING.value,
                "attempts": 0,
            },
        )
        if row_id is not None:
            return row_id, None
        existing = conn.execute(
            select(Instance.id, Instance.spool_path)
            .where(
                Instance.sop_instance_uid == new.sop_instance_uid,
                Instance.destination == destination,
                Instance.status == Status.PENDING,
            )
            .with_for_update()
        ).first()
        if existing is not None and existing.spool_path == new.spool_path:
            # This very receipt is already queued (a retried commit that had
            # succeeded): nothing to replace, and its file must stay.
            return existing.id, None
        if existing is not None:
            conn.execute(
                update(Instance)
                .where(Instance.id == existing.id, Instance.status == Status.PENDING)
                .values(**values, attempts=0, last_error=None)
            )
            _log_event(conn, existing.id, "replaced", f"re-sent; was {existing.spool_path}")
            return existing.id, existing.spool_path
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
        return row_id, None

    # -- forwarder side ----------------------------------------------------

    def claim_batch(
        self,
        owner: str,
        limit: int,
        lease: timedelta,
        node_id: str = "",
        destination: str = DEFAULT_DESTINATION,
    ) -> list[QueuedInstance]:
        """Lease up to ``limit`` of ``destination``'s rows of one study: expired leases
        first, then due pending rows.

        The study is the first expired lease's, else the oldest due row's
        (:func:`claim_study`), so a batch fills one STOW-RS request even when
        studies arrive interleaved, and studies are served oldest first.

        On Postgres the candidate rows are locked with ``FOR UPDATE SKIP
        LOCKED``, so concurrent forwarders never claim the same row. On SQLite
        the transaction holds the write lock (``BEGIN IMMEDIATE``) throughout.
        """
        now = utcnow()
        params = claim_params(now, node_id, limit, owner, now + lease, destination)
        if self._claim_engine is not None:
            claimed = self._claim_in_one_round_trip(params)
        else:
            claimed = self._claim_branch_by_branch(params)
        claimed.sort(key=lambda r: (r.next_attempt_at, r.id))
        return claimed

    def claim_plan(self, *, analyze: bool = False, seqscan: bool = True) -> str:
        """Postgres's plan of the single-statement claim (10 rows, now), rolled back.

        ``analyze`` runs it (and shows the timings); ``seqscan=False`` asks
        whether an index path exists at all, whatever the table's size.
        """
        if self._claim_engine is None:
            raise ValueError("only Postgres claims with a single statement")
        now = utcnow()
        with self.engine.connect() as conn:
            compiled = self._claim_single.compile(dialect=conn.dialect)
            params = {
                **compiled.params,
                **claim_params(now, "", 10, "plan", now, DEFAULT_DESTINATION),
            }
            naive = {
                key: value.astimezone(UTC).replace(tzinfo=None)
                if isinstance(value, datetime)
                else value
                for key, value in params.items()
            }
            with conn.begin() as tx:
                if not seqscan:
                    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                explain = "EXPLAIN ANALYZE" if analyze else "EXPLAIN"
                rows = conn.exec_driver_sql(f"{explain} {compiled}", naive).all()
                tx.rollback()
        return "\n".join(str(r[0]) for r in rows)

    def _claim_in_one_round_trip(self, params: dict[str, Any]) -> list[QueuedInstance]:
        """Postgres: :func:`claim_statement_single` in autocommit (see make_claim_engine)."""
        assert self._claim_engine is not None
        with self._claim_engine.connect() as conn:
            rows = conn.execute(self._claim_single, params).all()
        claimed = [_record(r) for r in rows]
        if any(r.superseded for r in rows):
            # Rare (a copy re-sent while another was in flight): close the
            # older copies in a transaction of their own. They are leased to
            # the caller, so nothing else touches them in between.
            with self._tx() as conn:
                claimed = self._drop_superseded(conn, claimed)
        return claimed

    def _claim_branch_by_branch(self, params: dict[str, Any]) -> list[QueuedInstance]:
        """SQLite: the study to serve, each branch's ``UPDATE`` of that study's rows, then
        the superseded copies, in one transaction (see :func:`claim_study`)."""
        claimed: list[QueuedInstance] = []
        with self._tx(TxMode.LAZY, turn=True) as conn:
            study = conn.execute(self._claim_study, params).scalar()
            if study is None:
                return []
            for branch in CLAIM_BRANCHES:
                wanted = params["claim_limit"] - len(claimed)
                if wanted <= 0:
                    break
                values = {**params, "claim_limit": wanted, "claim_study": study}
                rows = conn.execute(self._claim[branch], values)
                claimed.extend(_record(r) for r in rows.all())
            if claimed:
                claimed = self._drop_superseded(conn, claimed)
        return claimed

    def _drop_superseded(
        self, conn: Connection, claimed: list[QueuedInstance]
    ) -> list[QueuedInstance]:
        """The duplicate rule at claim time: never hand out a copy that a newer one replaces.

        A claimed row is closed as superseded when a newer copy of its SOP
        Instance UID (:func:`newer_copies`) exists, this batch included. Without
        it, a copy whose forwarder died (expired lease) was claimed together
        with the copy the sender sent again meanwhile: two parts with one UID in
        one STOW-RS request, which the client refuses, and the rows went back
        and forth between claim and lease expiry for ever.
        """
        newest = newer_copies(
            Instance.sop_instance_uid,
            Instance.destination,
            Instance.received_at,
            Instance.id,
            newest_first=True,
        ).limit(1)
        replaced = {
            int(row_id): int(newer_id)
            for row_id, newer_id in conn.execute(
                select(Instance.id, newest.scalar_subquery()).where(
                    Instance.id.in_([r.id for r in claimed]), newest.exists()
                )
            )
        }
        for row_id, newer_id in replaced.items():
            self._supersede(conn, row_id, Status.IN_FLIGHT, newer_id)
        return [r for r in claimed if r.id not in replaced]

    def extend_lease(self, ids: Sequence[int], owner: str, lease: timedelta) -> int:
        """Push the lease of rows still held by ``owner``; returns how many."""
        with self._tx(TxMode.LAZY) as conn:
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

    def complete_many(
        self, ids: Sequence[int], owner: str, applied: Mapping[int, str] | None = None
    ) -> list[int]:
        """:meth:`complete` for the rows of one upload, in one transaction.

        ``applied`` records, by row id, what the destination was sent (JSON; a row
        without an entry was sent as received). Returns the ids that were
        ``in_flight`` under ``owner`` and are now ``done``; the others (a lost
        lease) are left alone, and the caller treats them as :meth:`complete`
        raising :class:`TransitionError` for them.
        """
        if not ids:
            return []
        applied = applied or {}
        # One UPDATE per distinct record (usually one: a destination's profile).
        by_record: dict[str | None, list[int]] = {}
        for row_id in ids:
            by_record.setdefault(applied.get(row_id), []).append(row_id)
        now = utcnow()
        done: list[int] = []
        with self._tx(turn=True) as conn:
            for record, some in by_record.items():
                done.extend(
                    int(i)
                    for i in conn.execute(
                        update(Instance)
                        .where(*self._held(some, owner))
                        .values(
                            status=Status.DONE,
                            forwarded_at=now,
                            last_error=None,
                            lease_owner=None,
                            lease_expires_at=None,
                            applied=record,
                        )
                        .returning(Instance.id)
                    ).scalars()
                )
            return done

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
        with self._tx(TxMode.LAZY) as conn:
            copy, newer = self._close_if_superseded(conn, row_id, owner)
            if newer is not None:
                return
            self._supersede_older_pending(conn, copy, row_id)
            values = back_to_pending(next_attempt_at)
            if count_attempt:
                values["attempts"] = Instance.attempts + 1
                values["last_error"] = error
            self._transition(conn, row_id, owner, **values)
            if error is not None:
                _log_event(conn, row_id, "retry", error)

    def _supersede_older_pending(self, conn: Connection, copy: Copy, row_id: int) -> int | None:
        """Close the pending copy of ``copy`` that ``row_id`` replaces, if any.

        Called before ``row_id`` becomes pending, once no copy newer than it
        exists: any other pending copy is older, and the unique pending index
        allows one. Returns the id closed.
        """
        older = conn.execute(
            select(Instance.id).where(
                Instance.sop_instance_uid == copy.sop_instance_uid,
                Instance.destination == copy.destination,
                Instance.status == Status.PENDING,
                Instance.id != row_id,
            )
        ).scalar_one_or_none()
        if older is not None:
            self._supersede(conn, older, Status.PENDING, row_id)
        return older

    def supersede_if_newer(self, row_id: int, owner: str) -> int | None:
        """Close a row ``owner`` holds as superseded when a newer copy of it exists.

        The forwarder asks before acting on a conflict (``--on-conflict
        overwrite``): the instance stored at the destination may be that newer
        copy, which deleting would replace with this older one. Returns the
        newer copy's id, or None (the row is left as it was).
        """
        with self._tx() as conn:
            return self._close_if_superseded(conn, row_id, owner)[1]

    def _close_if_superseded(
        self, conn: Connection, row_id: int, owner: str
    ) -> tuple[Copy, int | None]:
        """Close a held row as superseded if a newer copy exists.

        Returns which instance-and-destination the row is a copy of and the newer
        copy's id (None: the row is left as it was). Raises :class:`TransitionError`
        when ``owner`` does not hold the row.
        """
        row = conn.execute(
            select(Instance.sop_instance_uid, Instance.destination, Instance.received_at).where(
                *self._held([row_id], owner)
            )
        ).first()
        if row is None:
            raise TransitionError(f"row {row_id} is not in_flight under lease {owner!r}")
        copy = Copy(str(row.sop_instance_uid), str(row.destination))
        newer = _newest_copy_after(conn, copy, row.received_at, row_id)
        if newer is not None:
            self._transition(conn, row_id, owner, **superseded_by(newer))
            _log_event(conn, row_id, "superseded", f"row {newer}")
        return copy, newer

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
        with self._tx(TxMode.READ) as conn:
            row = conn.execute(select(*ROW_COLUMNS).where(Instance.id == row_id)).first()
        return _record(row) if row is not None else None

    def held_by(self, owner: str) -> list[int]:
        """Ids of the rows ``in_flight`` under ``owner``'s lease."""
        with self._tx(TxMode.READ) as conn:
            ids = conn.execute(
                select(Instance.id).where(
                    Instance.status == Status.IN_FLIGHT, Instance.lease_owner == owner
                )
            ).scalars()
            return [int(i) for i in ids]

    def unneeded_files(self, spool_paths: Sequence[str]) -> list[str]:
        """Those of ``spool_paths`` that no row still needs: every row pointing at
        the file is ``done`` (an instance routed to several destinations has a row
        for each, sharing one file, which stays until all of them are done)."""
        if not spool_paths:
            return []
        paths = sorted(set(spool_paths))
        with self._tx(TxMode.READ) as conn:
            needed = set(
                conn.execute(
                    select(Instance.spool_path).where(
                        Instance.spool_path.in_(paths), Instance.status != Status.DONE
                    )
                ).scalars()
            )
        return [p for p in paths if p not in needed]

    def references(self, spool_path: str) -> bool:
        """Whether any row points at ``spool_path``."""
        with self._tx(TxMode.READ) as conn:
            found = conn.execute(
                select(Instance.id).where(Instance.spool_path == spool_path).limit(1)
            ).first()
        return found is not None

    def find_by_sop(self, sop_instance_uid: str) -> list[QueuedInstance]:
        with self._tx(TxMode.READ) as conn:
            rows = conn.execute(
                select(*ROW_COLUMNS)
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
        destination: str | None = None,
        sop_instance_uid: str | None = None,
        after_id: int = 0,
    ) -> list[QueuedInstance]:
        """Rows oldest first, optionally filtered."""
        order: Any = Instance.id
        if status is not None and self.is_minority(status):
            # Read the status's rows through an index that starts with the status
            # and sort them, rather than walk the table by id past the others (SQLite
            # picks that walk for "status = ? ORDER BY id", and a year of done rows
            # made ``queue ls --status failed`` a full scan).
            order = Instance.id + 0
        query = select(*ROW_COLUMNS).order_by(order)
        if after_id:
            query = query.where(Instance.id > after_id)
        if sop_instance_uid is not None:
            query = query.where(Instance.sop_instance_uid == sop_instance_uid)
        if status is not None:
            query = query.where(Instance.status == status)
        if destination is not None:
            query = query.where(Instance.destination == destination)
        if study_instance_uid is not None:
            query = query.where(Instance.study_instance_uid == study_instance_uid)
        if since is not None:
            query = query.where(Instance.received_at >= since)
        if limit is not None:
            query = query.limit(limit)
        with self._tx(TxMode.READ) as conn:
            return [_record(r) for r in conn.execute(query).all()]

    def done_spool_paths(
        self,
        forwarded_after: datetime,
        forwarded_before: datetime,
        limit: int = 1000,
        node_id: str = "",
    ) -> list[tuple[datetime, str]]:
        """Spool paths of ``node_id``'s rows forwarded in a time window, oldest first.

        One half of the done-file sweep (``--keep-done``; docs/design.md).
        """
        with self._tx(TxMode.READ) as conn:
            rows = conn.execute(
                select(Instance.forwarded_at, Instance.spool_path)
                .where(
                    in_status(Status.DONE),  # ix_instances_done
                    Instance.node_id == node_id,
                    Instance.forwarded_at > forwarded_after,
                    Instance.forwarded_at <= forwarded_before,
                )
                .order_by(Instance.forwarded_at)
                .limit(limit)
            ).all()
        return [(r.forwarded_at, r.spool_path) for r in rows]

    def unforwarded_done_spool_paths(
        self, after_id: int, done_before: datetime, limit: int = 1000, node_id: str = ""
    ) -> list[tuple[int, str]]:
        """``(id, spool_path)`` of ``node_id``'s rows closed without an upload, by id.

        The other half of the done-file sweep: rows ``done`` with no
        ``forwarded_at`` (superseded copies) whose done time (:func:`done_at`)
        is before ``done_before``. They are not in ``forwarded_at`` order, so
        the sweep pages through them by id (keyset), round and round.
        """
        with self._tx(TxMode.READ) as conn:
            rows = conn.execute(
                select(Instance.id, Instance.spool_path)
                .where(
                    Instance.id > after_id,
                    in_status(Status.DONE),  # ix_instances_done
                    Instance.node_id == node_id,
                    Instance.forwarded_at.is_(None),
                    done_at() < done_before,
                )
                .order_by(Instance.id)
                .limit(limit)
            ).all()
        return [(int(r.id), str(r.spool_path)) for r in rows]

    def stats(self, destination: str | None = None) -> QueueStats:
        """Counts and bytes per status (of one destination's rows, or all).

        Read from the counts the triggers keep (``queue_counts``), never by
        counting the table; the oldest pending row of each destination is the
        first entry of ``ix_instances_pending_age``. Exact, and as cheap with ten
        million rows as with ten.
        """
        parts = self.stats_by_destination(destination)
        if destination is not None:
            return parts.get(destination) or QueueStats.total([])
        return QueueStats.total(list(parts.values()))

    def stats_by_destination(self, destination: str | None = None) -> dict[str, QueueStats]:
        """:meth:`stats` of each destination that has rows (``""``: unrouted), in one
        read transaction."""
        with self._tx(TxMode.READ) as conn:
            by_name: dict[str, tuple[dict[Status, int], dict[Status, int]]] = {}
            for name, status, count, size in conn.execute(maintained_counts(destination)):
                counts, sizes = by_name.setdefault(
                    str(name), ({s: 0 for s in Status}, {s: 0 for s in Status})
                )
                counts[Status(status)] += int(count)
                sizes[Status(status)] += int(size)
            return {
                name: QueueStats(
                    counts,
                    sizes,
                    conn.execute(oldest_pending(name)).scalar_one_or_none()
                    if counts[Status.PENDING]
                    else None,
                )
                for name, (counts, sizes) in sorted(by_name.items())
                if any(counts.values()) or any(sizes.values())
            }

    def maintained_counts(self) -> Counts:
        """The kept counts per destination and status (zero ones left out)."""
        with self._tx(TxMode.READ) as conn:
            return _counts(conn.execute(maintained_counts()).all())

    def full_counts(self) -> Counts:
        """:meth:`maintained_counts` counted from the table itself: a full scan, for checks."""
        with self._tx(TxMode.READ) as conn:
            return _counts(conn.execute(full_counts()).all())

    def fold_counts(self) -> int:
        """Postgres: move the triggers' deltas into ``queue_counts``; returns the counter
        rows changed. SQLite keeps no deltas (0).

        One statement, so a reader sees the deltas or their sum, never both. Several
        processes may call it: one folds while the others skip (an advisory lock).
        """
        if self.engine.dialect.name == "sqlite":
            return 0
        with self._tx(TxMode.LAZY) as conn:
            if not _try_lock(conn, "stowaway:fold-counts"):
                return 0
            moved = (
                delete(queue_count_deltas)
                .returning(
                    queue_count_deltas.c.destination,
                    queue_count_deltas.c.status,
                    queue_count_deltas.c.instances,
                    queue_count_deltas.c.bytes,
                )
                .cte("moved")
            )
            sums = select(
                moved.c.destination,
                moved.c.status,
                func.sum(moved.c.instances),
                func.sum(moved.c.bytes),
            ).group_by(moved.c.destination, moved.c.status)
            upsert = postgresql_insert(QueueCount).from_select(
                ["destination", "status", "instances", "bytes"], sums
            )
            upsert = upsert.on_conflict_do_update(
                index_elements=[QueueCount.destination, QueueCount.status],
                set_={
                    "instances": QueueCount.instances + upsert.excluded.instances,
                    "bytes": QueueCount.bytes + upsert.excluded.bytes,
                },
            )
            return int(conn.execute(upsert).rowcount)

    def destination_names(self) -> list[str]:
        """The destinations that rows are queued for (``""``: unrouted rows)."""
        return sorted({name for name, _status in self.maintained_counts()})

    def is_minority(self, status: Status) -> bool:
        """Whether fewer than half of the rows are in ``status`` (from the kept counts)."""
        counts = self.maintained_counts()
        of_status = sum(n for (_d, s), (n, _b) in counts.items() if s == status)
        return of_status * 2 < sum(n for n, _b in counts.values())

    def events(self, row_id: int) -> list[tuple[datetime, str, str | None]]:
        with self._tx(TxMode.READ) as conn:
            rows = conn.execute(
                select(InstanceEvent.at, InstanceEvent.kind, InstanceEvent.detail)
                .where(InstanceEvent.instance_id == row_id)
                .order_by(InstanceEvent.id)
            ).all()
        return [(r.at, r.kind, r.detail) for r in rows]

    # -- destinations --------------------------------------------------------

    def destination(self, name: str) -> DestinationStatus | None:
        with self._tx(TxMode.READ) as conn:
            row = conn.execute(select(Destination).where(Destination.name == name)).first()
        return _destination_status(row) if row is not None else None

    def set_destination(
        self,
        name: str,
        state: DestinationState,
        reason: str | None,
        next_probe_at: datetime | None,
        url: str = "",
    ) -> bool:
        """Record a destination's state; returns True if the state changed."""
        now = utcnow()
        with self._tx() as conn:
            current = conn.execute(
                select(Destination.state).where(Destination.name == name).with_for_update()
            ).scalar_one_or_none()
            if current is None:
                conn.execute(
                    insert(Destination).values(
                        name=name,
                        url=url,
                        state=state,
                        since=now,
                        reason=reason,
                        next_probe_at=next_probe_at,
                    )
                )
                return state != DestinationState.OK
            values: dict[str, Any] = {"reason": reason, "next_probe_at": next_probe_at}
            if url:
                values["url"] = url
            if current != state:
                values["since"] = now
            conn.execute(
                update(Destination).where(Destination.name == name).values(state=state, **values)
            )
            return bool(current != state)

    # -- retention ------------------------------------------------------------

    def retire_done(
        self,
        node_id: str,
        cutoff: datetime,
        limit: int,
        *,
        forwarded: bool,
        after: datetime | int | None = None,
    ) -> RetiredBatch:
        """Delete up to ``limit`` of ``node_id``'s done rows closed before ``cutoff``
        (and their history), in one short transaction: one batch of a retention pass.

        ``forwarded`` picks uploaded rows (by ``forwarded_at``, from ``after``) or
        rows closed without an upload (superseded copies, by id after ``after``);
        :func:`stowaway.db.statements.expired_done` says which rows qualify: never
        one that still keeps an older copy from being sent again. Only ``node_id``'s
        rows, as the caller deletes the files that are then unreferenced (after this
        returns, like :meth:`purge`).

        The commit does not wait for the disk: a delete a power loss undoes is
        simply made again by the next pass (the row is done; its file is gone or
        goes then). On Postgres one process at a time retires a node's rows (an
        advisory lock; the others get ``busy``), so two passes never both keep a
        file that each thought the other's row still needed.
        """
        with self._tx(TxMode.LAZY, turn=True) as conn:
            if self.engine.dialect.name != "sqlite" and not _try_lock(
                conn, f"stowaway:retention:{node_id}"
            ):
                return RetiredBatch(resume_after=after, finished=False, busy=True)
            # Materialized: the candidates are picked (and locked) once. Inlined in the
            # DELETE, Postgres may run a ``LIMIT ... SKIP LOCKED`` subquery again for
            # each row it visits, and delete many times ``limit`` rows.
            doomed = (
                expired_done(node_id, cutoff, limit, forwarded=forwarded, after=after)
                .with_only_columns(Instance.id)
                .cte("doomed")
                .prefix_with("MATERIALIZED")
            )
            rows = conn.execute(
                delete(Instance)
                .where(Instance.id.in_(select(doomed.c.id)), in_status(Status.DONE))
                # forwarded_at as the driver gives it: only the batch's last one is needed.
                .returning(Instance.id, _RAW_FORWARDED_AT, Instance.spool_path)
            ).all()
            if not rows:
                return RetiredBatch(resume_after=after)
            ids, paths = self._id_list, self._path_list
            conn.execute(
                delete(InstanceEvent).where(ids.contains(InstanceEvent.instance_id)),
                {ids.name: ids.value([r.id for r in rows])},
            )
            unique_paths = sorted({str(r.spool_path) for r in rows})
            still_used = set(
                conn.execute(
                    select(Instance.spool_path).where(paths.contains(Instance.spool_path)),
                    {paths.name: paths.value(unique_paths)},
                ).scalars()
            )
        resume: datetime | int = (
            _utc(max(r.forwarded_at for r in rows)) if forwarded else max(r.id for r in rows)
        )
        return RetiredBatch(
            len(rows),
            tuple(p for p in unique_paths if p not in still_used),
            resume,
            finished=len(rows) < limit,
        )

    # -- maintenance ----------------------------------------------------------

    def delete_rows(self, ids: Sequence[int]) -> int:
        with self._tx() as conn:
            conn.execute(delete(InstanceEvent).where(InstanceEvent.instance_id.in_(ids)))
            return conn.execute(delete(Instance).where(Instance.id.in_(ids))).rowcount

    # -- operator actions ---------------------------------------------------
    #
    # Used by ``stowaway queue requeue|purge|stats`` and ``stowaway reconcile``. Each
    # call is one short transaction; callers pass at most a few hundred ids at a time
    # (``OPERATOR_CHUNK``) so that a requeue or purge of many thousands of rows never
    # holds the SQLite write lock, or Postgres row locks, for long. Every change is
    # guarded by the state the row must be in, so they are safe while ``serve`` runs.

    #: ids per transaction for the operator actions below
    OPERATOR_CHUNK = 500

    def list_destinations(self) -> list[DestinationStatus]:
        """Every destination the forwarder has recorded a state for, by name."""
        with self._tx(TxMode.READ) as conn:
            rows = conn.execute(select(Destination).order_by(Destination.name)).all()
        return [_destination_status(r) for r in rows]

    def activity_since(self, since: datetime) -> dict[str, int]:
        """``uploaded`` (rows forwarded), ``failed`` and ``retried`` (events) since ``since``."""
        with self._tx(TxMode.READ) as conn:
            uploaded = conn.execute(
                select(func.count())
                .select_from(Instance)
                .where(in_status(Status.DONE), Instance.forwarded_at >= since)
            ).scalar_one()
            events = dict(
                conn.execute(
                    select(InstanceEvent.kind, func.count())
                    .where(InstanceEvent.at >= since, InstanceEvent.kind.in_(("failed", "retry")))
                    .group_by(InstanceEvent.kind)
                ).all()
            )
        return {
            "uploaded": int(uploaded),
            "failed": int(events.get("failed", 0)),
            "retried": int(events.get("retry", 0)),
        }

    def select_ids(
        self,
        *,
        ids: Sequence[int] | None = None,
        statuses: Sequence[Status] | None = None,
        study_instance_uid: str | None = None,
        older_than: datetime | None = None,
        node_id: str | None = None,
        destination: str | None = None,
    ) -> list[int]:
        """Ids of the rows matching every filter given, ascending.

        ``older_than`` compares ``forwarded_at`` for done rows that have one, else
        ``received_at``. ``ids`` are looked up in chunks (unknown ids are left out).
        """
        conditions: list[Any] = []
        if statuses is not None:
            conditions.append(Instance.status.in_(list(statuses)))
        if study_instance_uid is not None:
            conditions.append(Instance.study_instance_uid == study_instance_uid)
        if older_than is not None:
            conditions.append(
                ((Instance.status == Status.DONE) & (done_at() < older_than))
                | ((Instance.status != Status.DONE) & (Instance.received_at < older_than))
            )
        if node_id is not None:
            conditions.append(Instance.node_id == node_id)
        if destination is not None:
            conditions.append(Instance.destination == destination)
        found: list[int] = []
        id_chunks: list[Sequence[int] | None] = (
            [None]
            if ids is None
            else [ids[i : i + self.OPERATOR_CHUNK] for i in range(0, len(ids), self.OPERATOR_CHUNK)]
        )
        for chunk in id_chunks:
            query = select(Instance.id).where(*conditions).order_by(Instance.id)
            if chunk is not None:
                query = query.where(Instance.id.in_(list(chunk)))
            with self._tx(TxMode.READ) as conn:
                found.extend(int(i) for i in conn.execute(query).scalars())
        return sorted(found)

    def total_bytes(self, ids: Sequence[int]) -> int:
        """Sum of ``size_bytes`` of the given rows."""
        total = 0
        for i in range(0, len(ids), self.OPERATOR_CHUNK):
            with self._tx(TxMode.READ) as conn:
                total += int(
                    conn.execute(
                        select(func.coalesce(func.sum(Instance.size_bytes), 0)).where(
                            Instance.id.in_(list(ids[i : i + self.OPERATOR_CHUNK]))
                        )
                    ).scalar_one()
                )
        return total

    @_retry_on_pending_conflict
    def requeue(self, ids: Sequence[int]) -> RequeueResult:
        """Put rows back to ``pending``, due now, attempts 0, in one transaction.

        The old ``last_error`` is kept as a ``requeued`` history event. Rows
        ``in_flight`` under a live lease are left alone (their forwarder owns them);
        an expired lease is taken back. Duplicate rule: when the SOP Instance UID
        already has another pending row, the more recently received copy is the one
        left pending and the other is closed as ``done``, superseded (the same rule
        the forwarder applies), so a requeue never violates the unique pending index.
        Ids not found appear nowhere in the result.
        """
        now = utcnow()
        requeued: list[int] = []
        superseded: list[int] = []
        leased: list[int] = []
        with self._tx() as conn:
            rows = conn.execute(
                select(
                    Instance.id,
                    Instance.sop_instance_uid,
                    Instance.destination,
                    Instance.status,
                    Instance.lease_expires_at,
                    Instance.last_error,
                    Instance.received_at,
                )
                .where(Instance.id.in_(list(ids)))
                .order_by(Instance.id)
                .with_for_update()
            ).all()
            # Rows of this call that it takes back: whichever of them is newest
            # supersedes the others as it is requeued, so they do not count as
            # newer copies that stop an older one from being requeued first.
            taken = [
                r.id
                for r in rows
                if not (r.status == Status.IN_FLIGHT and _lease_live(r.lease_expires_at, now))
            ]
            for row in rows:
                if row.id not in taken:
                    leased.append(row.id)
                    continue
                copy = Copy(row.sop_instance_uid, row.destination)
                newer = _newest_copy_after(conn, copy, row.received_at, row.id, excluding=taken)
                if newer is not None:
                    self._supersede(conn, row.id, row.status, newer)
                    superseded.append(row.id)
                    continue
                older = self._supersede_older_pending(conn, copy, row.id)
                if older is not None:
                    superseded.append(older)
                changed = conn.execute(
                    update(Instance)
                    .where(Instance.id == row.id, Instance.status == row.status)
                    .values(
                        **back_to_pending(now),
                        attempts=0,
                        last_error=None,
                        forwarded_at=None,
                        applied=None,
                    )
                ).rowcount
                if changed == 1:
                    _log_event(conn, row.id, "requeued", row.last_error)
                    requeued.append(row.id)
        return RequeueResult(tuple(requeued), tuple(superseded), tuple(leased))

    def reroute(self, row_id: int, destinations: Sequence[str]) -> RerouteResult:
        """Give an ``unrouted`` row the deliveries routing now chooses for it.

        A delivery is created for each destination (pending, due now, sharing the row's
        spool file), unless a newer copy of the instance is already queued or sent there;
        an older pending copy there is closed as superseded by the new delivery. The
        unrouted row itself goes (its history with it): it has been replaced. Raises
        :class:`TransitionError` when the row is not ``unrouted`` (anymore).
        """
        now = utcnow()
        created: list[int] = []
        skipped: list[str] = []
        with self._tx() as conn:
            row = conn.execute(
                select(*ROW_COLUMNS)
                .where(Instance.id == row_id, Instance.status == Status.UNROUTED)
                .with_for_update()
            ).first()
            if row is None:
                raise TransitionError(f"row {row_id} is not unrouted")
            facts = {
                c.name: getattr(row, c.name)
                for c in ROW_COLUMNS
                if c.name not in ("id", "destination", "status", "last_error")
            }
            for destination in dict.fromkeys(destinations):
                newer = conn.execute(
                    newer_copies(
                        row.sop_instance_uid,
                        destination,
                        row.received_at,
                        row.id,
                    ).limit(1)
                ).scalar_one_or_none()
                if newer is not None:
                    skipped.append(destination)
                    continue
                older = conn.execute(
                    select(Instance.id).where(
                        Instance.sop_instance_uid == row.sop_instance_uid,
                        Instance.destination == destination,
                        Instance.status == Status.PENDING,
                    )
                ).scalar_one_or_none()
                new_id = conn.execute(
                    insert(Instance)
                    .values(
                        **{
                            **facts,
                            "attempts": 0,
                            "next_attempt_at": now,
                            "lease_owner": None,
                            "lease_expires_at": None,
                            "forwarded_at": None,
                            "applied": None,
                        },
                        destination=destination,
                        status=Status.DONE if older is not None else Status.PENDING,
                    )
                    .returning(Instance.id)
                ).scalar_one()
                if older is not None:
                    # The unique pending index allows one: close the older, then open ours.
                    self._supersede(conn, older, Status.PENDING, new_id)
                    conn.execute(
                        update(Instance).where(Instance.id == new_id).values(status=Status.PENDING)
                    )
                _log_event(conn, new_id, "rerouted", f"from unrouted row {row_id}")
                created.append(new_id)
            if not created:
                # Newer copies are on their way everywhere: close this one, keep its file
                # for ``purge --done`` like any superseded copy.
                conn.execute(
                    update(Instance)
                    .where(Instance.id == row_id)
                    .values(status=Status.DONE, last_error="rerouted: newer copies queued")
                )
                _log_event(conn, row_id, "superseded", "rerouted: newer copies queued")
                return RerouteResult((), tuple(skipped))
            conn.execute(delete(InstanceEvent).where(InstanceEvent.instance_id == row_id))
            conn.execute(delete(Instance).where(Instance.id == row_id))
        return RerouteResult(tuple(created), tuple(skipped))

    @staticmethod
    def _supersede(conn: Connection, row_id: int, status: Status, newer_id: int) -> None:
        conn.execute(
            update(Instance)
            .where(Instance.id == row_id, Instance.status == status)
            .values(**superseded_by(newer_id))
        )
        _log_event(conn, row_id, "superseded", f"row {newer_id}")

    def purge(self, ids: Sequence[int], statuses: Sequence[Status] | None = None) -> PurgeResult:
        """Delete rows (and their history) in one transaction; the files are the caller's.

        Only rows in ``statuses`` (any status when None) are deleted, and never a row
        ``in_flight`` under a live lease. The result names the spool paths no
        remaining row points to: delete those files *after* this returns (a crash in
        between leaves orphan files, which ``reconcile`` removes, never a row
        pointing at a missing file).
        """
        now = utcnow()
        with self._tx() as conn:
            rows = conn.execute(
                select(
                    Instance.id,
                    Instance.status,
                    Instance.lease_expires_at,
                    Instance.size_bytes,
                    Instance.spool_path,
                )
                .where(Instance.id.in_(list(ids)))
                .order_by(Instance.id)
                .with_for_update()
            ).all()
            doomed = [
                r
                for r in rows
                if (statuses is None or r.status in statuses)
                and not (r.status == Status.IN_FLIGHT and _lease_live(r.lease_expires_at, now))
            ]
            if not doomed:
                return PurgeResult()
            doomed_ids = [r.id for r in doomed]
            conn.execute(delete(InstanceEvent).where(InstanceEvent.instance_id.in_(doomed_ids)))
            conn.execute(delete(Instance).where(Instance.id.in_(doomed_ids)))
            paths = sorted({r.spool_path for r in doomed})
            still_used = set(
                conn.execute(
                    select(Instance.spool_path).where(Instance.spool_path.in_(paths))
                ).scalars()
            )
        return PurgeResult(
            tuple(doomed_ids),
            sum(r.size_bytes for r in doomed),
            tuple(p for p in paths if p not in still_used),
        )

    def spool_paths_page(self, after_id: int, limit: int) -> list[tuple[int, str]]:
        """``(id, spool_path)`` of every row (any node, any status) after ``after_id``.

        Keyset pages keep each transaction short while reconcile walks a big table.
        """
        with self._tx(TxMode.READ) as conn:
            rows = conn.execute(
                select(Instance.id, Instance.spool_path)
                .where(Instance.id > after_id)
                .order_by(Instance.id)
                .limit(limit)
            ).all()
        return [(int(r.id), str(r.spool_path)) for r in rows]

    def rows_page(
        self, after_id: int, limit: int, statuses: Sequence[Status], node_id: str
    ) -> list[QueuedInstance]:
        """Rows of ``node_id`` in ``statuses`` after ``after_id``, by id (keyset paging)."""
        with self._tx(TxMode.READ) as conn:
            rows = conn.execute(
                select(*ROW_COLUMNS)
                .where(
                    Instance.id > after_id,
                    Instance.status.in_(list(statuses)),
                    Instance.node_id == node_id,
                )
                .order_by(Instance.id)
                .limit(limit)
            ).all()
        return [_record(r) for r in rows]

    def mark_file_broken(self, row_id: int, spool_path: str, reason: str) -> bool:
        """Mark a row whose spool file is missing or corrupt as ``failed`` with ``reason``.

        Guarded: the row must still point at ``spool_path`` and be ``pending``,
        ``failed`` or ``in_flight`` with an expired lease (an upload in progress, or a
        row that was forwarded or replaced meanwhile, is left alone). Returns whether
        the row changed.
        """
        now = utcnow()
        with self._tx() as conn:
            current = conn.execute(
                select(Instance.status)
                .where(
                    Instance.id == row_id,
                    Instance.spool_path == spool_path,
                    Instance.status.in_((Status.PENDING, Status.FAILED))
                    | ((Instance.status == Status.IN_FLIGHT) & (Instance.lease_expires_at < now)),
                )
                .with_for_update()
            ).scalar_one_or_none()
            if current is None:
                return False
            conn.execute(
                update(Instance)
                .where(Instance.id == row_id, Instance.status == current)
                .values(
                    status=Status.FAILED,
                    last_error=reason,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            _log_event(conn, row_id, "failed" if current != Status.FAILED else "reconcile", reason)
        return True

    def release_expired(self, ids: Sequence[int]) -> ReleaseResult:
        """Give rows whose lease has expired back to ``pending``, due now.

        Only ``in_flight`` rows whose lease is past are touched (a live lease is
        never broken). When a newer pending copy of the same SOP Instance UID exists
        the row is closed as superseded instead.
        """
        now = utcnow()
        released: list[int] = []
        superseded: list[int] = []
        with self._tx() as conn:
            rows = conn.execute(
                select(
                    Instance.id,
                    Instance.sop_instance_uid,
                    Instance.destination,
                    Instance.received_at,
                )
                .where(
                    Instance.id.in_(list(ids)),
                    Instance.status == Status.IN_FLIGHT,
                    Instance.lease_expires_at < now,
                )
                .order_by(Instance.id)
                .with_for_update()
            ).all()
            for row in rows:
                copy = Copy(row.sop_instance_uid, row.destination)
                newer = _newest_copy_after(conn, copy, row.received_at, row.id)
                if newer is not None:
                    self._supersede(conn, row.id, Status.IN_FLIGHT, newer)
                    superseded.append(row.id)
                    continue
                self._supersede_older_pending(conn, copy, row.id)
                conn.execute(
                    update(Instance)
                    .where(Instance.id == row.id, Instance.status == Status.IN_FLIGHT)
                    .values(**back_to_pending(now))
                )
                _log_event(conn, row.id, "released", "lease expired; released by reconcile")
                released.append(row.id)
        return ReleaseResult(tuple(released), tuple(superseded))


@dataclass(frozen=True)
class Copy:
    """What the duplicate rule compares copies of: one instance on its way to one
    destination."""

    sop_instance_uid: str
    destination: str


def _destination_status(row: Any) -> DestinationStatus:
    return DestinationStatus(row.name, row.url, row.state, row.since, row.reason, row.next_probe_at)


def _newest_copy_after(
    conn: Connection,
    copy: Copy,
    received_at: datetime,
    row_id: int,
    excluding: Sequence[int] = (),
) -> int | None:
    """The newest copy of ``copy`` newer than row ``row_id``, or None."""
    query = newer_copies(
        copy.sop_instance_uid, copy.destination, received_at, row_id, newest_first=True
    )
    if excluding:
        query = query.where(query.selected_columns[0].not_in(list(excluding)))
    return conn.execute(query.limit(1)).scalar_one_or_none()


#: ``forwarded_at`` without the column type's per-row conversion (see :func:`_utc`).
_RAW_FORWARDED_AT: ColumnElement[Any] = literal_column("forwarded_at")


def _utc(raw: datetime | str) -> datetime:
    """A raw ``forwarded_at`` (a naive datetime, or SQLite's text) as aware UTC."""
    value = datetime.fromisoformat(raw) if isinstance(raw, str) else raw
    return value.replace(tzinfo=UTC)


def _counts(rows: Sequence[Any]) -> Counts:
    out: Counts = {}
    for name, status, count, size in rows:
        if count or size:
            out[(str(name), Status(status))] = (int(count), int(size))
    return out


def _try_lock(conn: Connection, name: str) -> bool:
    """Postgres: take the transaction-scoped advisory lock ``name`` if it is free."""
    return bool(
        conn.execute(select(func.pg_try_advisory_xact_lock(func.hashtext(name)))).scalar_one()
    )


def _lease_live(lease_expires_at: datetime | None, now: datetime) -> bool:
    """Whether an ``in_flight`` row's forwarder still owns it (no lease: assume so)."""
    return lease_expires_at is None or lease_expires_at >= now


def _log_event(conn: Connection, row_id: int, kind: str, detail: str | None) -> None:
    conn.execute(
        insert(InstanceEvent).values(instance_id=row_id, at=utcnow(), kind=kind, detail=detail)
    )
