"""The queue's statements and the column values its transitions write.

:mod:`stowaway.db.queue` runs these and reads as the state machine; this module
says what the statements are. Each rule the queue applies in several places is
written here once: which copy of a SOP Instance UID is newer
(:func:`newer_copies`), what a claim writes (``LEASED``), what giving a row
back writes (:func:`back_to_pending`), what closing a superseded copy writes
(:func:`superseded_by`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    BindParameter,
    ColumnElement,
    Connection,
    Integer,
    Select,
    String,
    Update,
    and_,
    any_,
    bindparam,
    cast,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import aliased

from stowaway.db.models import Instance, QueueCount, Status, UTCDateTime, queue_count_deltas

#: Every column of a queue row (``QueuedInstance`` has a field for each).
ROW_COLUMNS = list(Instance.__table__.c)


#: Copies that were or will be delivered. A newer one of these supersedes an
#: older copy: sending the older one would put an older version at the
#: destination. A ``failed`` copy waits for an operator and may never be
#: delivered, so it leaves an older copy eligible (requeueing it then
#: supersedes the older one).
SUPERSEDING_STATUSES = (Status.PENDING, Status.IN_FLIGHT, Status.DONE)


def newer_copies(
    sop_instance_uid: Any,
    destination: Any,
    received_at: Any,
    row_id: Any,
    *,
    newest_first: bool = False,
) -> Select[Any]:
    """Ids of the copies of a SOP Instance UID, for the same destination, that
    supersede the given one.

    The duplicate rule's one comparison, used wherever a copy may be
    superseded: a copy is newer when its ``(received_at, id)`` is later, and
    it counts when its status is one of ``SUPERSEDING_STATUSES``. It applies per
    destination: a newer copy on its way to one destination says nothing about
    an older one's delivery to another.

    The arguments are columns of an enclosing statement's row (the subquery
    then correlates with it) or plain values. ``.exists()`` of it is the
    "newer copy exists" predicate; with ``newest_first``, its first row names
    the copy a superseded row points to.
    """
    newer = aliased(Instance)
    query = select(newer.id).where(
        newer.sop_instance_uid == sop_instance_uid,
        newer.destination == destination,
        # Not IN (...): an expanding parameter could not be shown by claim_plan.
        or_(*(newer.status == s for s in SUPERSEDING_STATUSES)),
        tuple_(newer.received_at, newer.id) > tuple_(received_at, row_id),
    )
    if newest_first:
        query = query.order_by(newer.received_at.desc(), newer.id.desc())
    return query


def done_at() -> ColumnElement[Any]:
    """When a ``done`` row was closed, as far as the row knows.

    ``forwarded_at`` for an uploaded row; a row closed without an upload (a
    superseded copy) has none, and its ``received_at`` stands in: from then on
    it waited only for the copy that replaced it.
    """
    return func.coalesce(Instance.forwarded_at, Instance.received_at)


def in_status(status: Status) -> ColumnElement[bool]:
    """``status = '<status>'`` with the value written in the SQL, not bound.

    A partial index (``ix_instances_done``, ``ix_instances_pending_age``) is
    only used when the database can see at planning time that the query's
    condition implies the index's, which a bound parameter hides.
    """
    return Instance.status == literal_column(f"'{Status(status).value}'")


def back_to_pending(next_attempt_at: datetime | ColumnElement[Any]) -> dict[str, Any]:
    """What giving a row back writes: ``pending``, due at ``next_attempt_at``, no lease."""
    return {
        "status": Status.PENDING,
        "next_attempt_at": next_attempt_at,
        "lease_owner": None,
        "lease_expires_at": None,
    }


def superseded_by(newer_id: int) -> dict[str, Any]:
    """What closing a copy that a newer one replaces writes (``done``, with a note)."""
    return {
        "status": Status.DONE,
        "last_error": f"superseded by a newer copy (row {newer_id})",
        "lease_owner": None,
        "lease_expires_at": None,
    }


# -- the claim -------------------------------------------------------------------

#: The claim looks at expired leases first (their forwarder died), then due rows.
CLAIM_BRANCHES = ("expired_lease", "due")


def claim_candidates(
    branch: str,
    now: datetime | BindParameter[Any],
    node_id: str,
    limit: int,
    destination: str = "",
    study: Any = None,
) -> Select[Any]:
    """The ids one claim branch would take, oldest first, skipping locked rows.

    Each branch is a range scan of an index (``ix_instances_lease`` for the
    in-flight ones, ``ix_instances_due``), in lease or due order. With
    ``study`` (a value, bind parameter or scalar subquery), only that study's
    rows: due ones from ``ix_instances_study_due``; expired leases still from
    ``ix_instances_lease`` (there are few: those of a forwarder that died),
    filtered by study. A test checks the query plans use these indexes and
    need no sort.
    """
    limit_param = bindparam("claim_limit", limit, type_=Integer)
    return _candidates(branch, now, Instance.id, node_id, destination, study).limit(limit_param)


def _candidates(
    branch: str,
    now: Any,
    column: Any,
    node_id: str,
    destination: str,
    study: Any = None,
) -> Select[Any]:
    if branch == "expired_lease":
        condition = and_(Instance.status == Status.IN_FLIGHT, Instance.lease_expires_at < now)
    else:
        condition = and_(Instance.status == Status.PENDING, Instance.next_attempt_at <= now)
    if branch == "expired_lease":
        order = (Instance.lease_expires_at, Instance.id)
    else:
        order = (Instance.next_attempt_at, Instance.id)
    query = select(column).where(
        condition,
        Instance.node_id == bindparam("claim_node", node_id),
        Instance.destination == bindparam("claim_destination", destination),
    )
    if study is not None:
        query = query.where(Instance.study_instance_uid == study)
    return query.order_by(*order).with_for_update(skip_locked=True)


def claim_study(now: datetime | BindParameter[Any]) -> Select[Any]:
    """The study a claim serves: the first expired lease's, else the oldest due row's.

    Claiming by study: a claim takes this study's rows only (up to the batch
    size), so one claim fills one STOW-RS request even when several studies
    arrive interleaved; the next claim starts again from the oldest due row,
    so studies are served oldest first. Each side reads one row from the
    front of a claim index (``FOR UPDATE SKIP LOCKED``, so concurrent
    claimers each start from a row nobody else holds); ``coalesce`` reads the
    due side only when no lease has expired.
    """

    def first(branch: str) -> Any:
        query = _candidates(branch, now, Instance.study_instance_uid, "", "")
        return query.limit(1).scalar_subquery()

    return select(func.coalesce(first("expired_lease"), first("due")).label("study"))


#: What a claim writes into each row it takes (``claim_owner``, ``claim_until``).
LEASED = {
    Instance.status: Status.IN_FLIGHT,
    Instance.lease_owner: bindparam("claim_owner", type_=String),
    Instance.lease_expires_at: bindparam("claim_until", type_=UTCDateTime),
}


def claim_study_statement() -> Select[Any]:
    """:func:`claim_study` with its values as bind parameters (SQLite's first statement)."""
    return claim_study(bindparam("claim_now", type_=UTCDateTime))


def claim_statement(branch: str) -> Update:
    """One claim branch as a single ``UPDATE ... RETURNING``, built once per queue.

    It takes the rows of the study ``claim_study`` (:func:`claim_study`, read
    first in the same transaction). Its values are bind parameters
    (``claim_now``, ``claim_node``, ``claim_limit``, ``claim_owner``,
    ``claim_until``, ``claim_study``): building the statement cost SQLAlchemy
    more than the database spent running it.
    """
    now = bindparam("claim_now", type_=UTCDateTime)
    study = bindparam("claim_study", type_=String)
    candidates = claim_candidates(branch, now, "", 0, study=study).scalar_subquery()
    claimed = update(Instance).where(Instance.id.in_(candidates)).values(LEASED)
    return claimed.returning(*ROW_COLUMNS)


def claim_statement_single() -> Update:
    """The study, both claim branches and the superseded-copy check as one statement
    (Postgres).

    The study is :func:`claim_study`'s (a CTE, evaluated once); each branch
    then locks up to ``claim_limit`` of that study's rows (``FOR UPDATE SKIP
    LOCKED``); expired leases come first. Each returned row says whether a
    newer copy of its SOP Instance UID exists (``superseded``,
    :func:`newer_copies`), so the usual claim needs no second statement. Run
    in autocommit on connections whose commits do not wait for the disk
    (:func:`db.engine.make_claim_engine`), the whole claim is one round trip.
    """
    now = bindparam("claim_now", type_=UTCDateTime)
    anchor = claim_study(now).cte("anchor")
    study = select(anchor.c.study).scalar_subquery()
    expired = claim_candidates("expired_lease", now, "", 0, study=study).cte("expired")
    due = claim_candidates("due", now, "", 0, study=study).cte("due")
    picked = (
        union_all(
            select(expired.c.id, literal(0).label("branch")),
            select(due.c.id, literal(1).label("branch")),
        )
        .order_by("branch")
        .limit(bindparam("claim_limit", type_=Integer))
        .subquery("picked")
    )
    superseded = (
        newer_copies(
            Instance.sop_instance_uid, Instance.destination, Instance.received_at, Instance.id
        )
        .exists()
        .label("superseded")
    )
    return (
        update(Instance)
        .where(Instance.id.in_(select(picked.c.id)))
        .values(LEASED)
        .returning(*ROW_COLUMNS, superseded)
    )


def claim_params(
    now: datetime, node_id: str, limit: int, owner: str, until: datetime, destination: str
) -> dict[str, Any]:
    """The bind parameters of a :func:`claim_statement`."""
    return {
        "claim_now": now,
        "claim_node": node_id,
        "claim_destination": destination,
        "claim_limit": limit,
        "claim_owner": owner,
        "claim_until": until,
    }


# -- the receiver's insert -----------------------------------------------------------


class PendingInsert:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` against the pending-UID index.

    It runs once per received instance, on the receiver's critical path, so it
    is compiled once and executed on the DBAPI cursor of the caller's
    transaction: SQLAlchemy's per-execution work (statement cache lookup,
    parameter and result processing) cost several times the insert itself.
    Values are passed as the column types would bind them (naive UTC times;
    text in SQLite's format there), and driver errors are re-raised as
    SQLAlchemy's, like any other statement's.
    """

    _KEYS = (
        "sop_instance_uid",
        "sop_class_uid",
        "study_instance_uid",
        "series_instance_uid",
        "transfer_syntax_uid",
        "calling_aet",
        "called_aet",
        "peer_address",
        "node_id",
        "destination",
        "spool_path",
        "size_bytes",
        "sha256",
        "status",
        "attempts",
        "next_attempt_at",
        "received_at",
    )
    _TIMES = ("next_attempt_at", "received_at")

    def __init__(self, dialect: Any) -> None:
        insert_for: Any = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}[dialect.name]
        statement = (
            insert_for(Instance)
            .on_conflict_do_nothing(
                index_elements=[Instance.sop_instance_uid, Instance.destination],
                index_where=text("status = 'pending'"),
            )
            .returning(Instance.id)
        )
        compiled = statement.compile(dialect=dialect, column_keys=list(self._KEYS))
        self._sql = compiled.string
        self._positions = compiled.positiontup  # qmark (SQLite); None for named styles
        self._sqlite = dialect.name == "sqlite"
        self._dbapi_error = dialect.loaded_dbapi.Error

    def __call__(self, conn: Connection, values: dict[str, Any]) -> int | None:
        params = dict(values)
        for key in self._TIMES:
            naive = params[key].astimezone(UTC).replace(tzinfo=None)
            params[key] = naive.strftime("%Y-%m-%d %H:%M:%S.%f") if self._sqlite else naive
        args: Any = tuple(params[k] for k in self._positions) if self._positions else params
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(self._sql, args)
            row = cursor.fetchone()
        except self._dbapi_error as exc:
            raise DBAPIError.instance(self._sql, args, exc, self._dbapi_error) from exc
        finally:
            cursor.close()
        return int(row[0]) if row is not None else None


# -- counts ------------------------------------------------------------------------


def maintained_counts(destination: str | None = None) -> Select[Any]:
    """``(destination, status, instances, bytes)`` from the counts the triggers keep:
    the folded counts plus the deltas not folded yet (none on SQLite)."""
    parts = [
        select(t.c.destination, t.c.status, t.c.instances, t.c.bytes)
        for t in (QueueCount.__table__, queue_count_deltas)
    ]
    if destination is not None:
        parts = [p.where(p.selected_columns.destination == destination) for p in parts]
    both = union_all(*parts).subquery("counted")
    return select(
        both.c.destination,
        both.c.status,
        func.sum(both.c.instances).label("instances"),
        func.sum(both.c.bytes).label("bytes"),
    ).group_by(both.c.destination, both.c.status)


def full_counts() -> Select[str, Status, int, int]:
    """The same numbers counted from the table itself (a full scan: for checks)."""
    return select(
        Instance.destination,
        Instance.status,
        func.count().label("instances"),
        func.coalesce(func.sum(Instance.size_bytes), 0).label("bytes"),
    ).group_by(Instance.destination, Instance.status)


def oldest_pending(destination: str) -> Select[Any]:
    """``received_at`` of the destination's oldest pending row (``ix_instances_pending_age``)."""
    return (
        select(Instance.received_at)
        .where(in_status(Status.PENDING), Instance.destination == destination)
        .order_by(Instance.received_at)
        .limit(1)
    )


# -- retention ---------------------------------------------------------------------


def keeps_an_older_copy_out() -> ColumnElement[bool]:
    """Whether a done row is what stops an older copy from being sent again.

    A done copy supersedes the older copies of its SOP Instance UID (``newer_copies``
    counts ``done``). While an older copy is not done (``failed``, waiting for an
    operator; ``unrouted``; or on its way), deleting the done one would let a
    requeue or reroute send the older version over the newer one. Such a done row
    is kept until the older copy is settled or purged.
    """
    older = aliased(Instance)
    return (
        select(older.id)
        .where(
            older.sop_instance_uid == Instance.sop_instance_uid,
            or_(older.destination == Instance.destination, older.status == Status.UNROUTED),
            older.status != Status.DONE,
            tuple_(older.received_at, older.id) < tuple_(Instance.received_at, Instance.id),
        )
        .exists()
    )


class ListParameter:
    """A list of values bound as one parameter: ``column IN (one JSON array)`` on
    SQLite, ``column = ANY(one array literal)`` on Postgres.

    ``column.in_(values)`` binds one parameter per value, and rendering and parsing
    a statement with a thousand of them cost several times what the database
    spent on it (as did the driver's own adaptation of a list to an array).
    """

    def __init__(self, dialect_name: str, name: str) -> None:
        self.sqlite = dialect_name == "sqlite"
        self.name = name

    def contains(self, column: Any) -> ColumnElement[bool]:
        text_value = bindparam(self.name, type_=String)
        if self.sqlite:
            each = func.json_each(text_value).table_valued("value")
            condition: ColumnElement[bool] = column.in_(select(each.c.value))
        else:
            condition = column == any_(cast(text_value, ARRAY(column.type)))
        return condition

    def value(self, values: Sequence[Any]) -> str:
        if self.sqlite:
            return json.dumps(list(values))
        quoted = (
            str(v)
            if isinstance(v, int)
            else '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
            for v in values
        )
        return "{" + ",".join(quoted) + "}"


def expired_done(
    node_id: str,
    cutoff: datetime,
    limit: int,
    *,
    forwarded: bool,
    after: datetime | int | None = None,
) -> Select[int, datetime | None, str]:
    """``(id, forwarded_at, spool_path)`` of ``node_id``'s done rows closed before
    ``cutoff`` that retention may delete.

    ``forwarded``: rows uploaded before ``cutoff``, by ``forwarded_at`` from
    ``after`` on (a keyset: each batch starts where the last one ended, not at
    the deleted entries a Postgres index keeps until vacuum). Otherwise rows
    closed without an upload (superseded copies) received before ``cutoff``, by
    id after ``after``. Both are ranges of ``ix_instances_done``. Rows another
    pass has locked are skipped (Postgres), so passes may run concurrently.
    """
    if forwarded:
        condition = [Instance.forwarded_at < cutoff]
        if after is not None:
            condition.append(Instance.forwarded_at >= after)
        # node_id is one value: the order is the index's, with no sort step.
        order: tuple[Any, ...] = (Instance.forwarded_at, Instance.node_id, Instance.id)
    else:
        condition = [Instance.forwarded_at.is_(None), Instance.received_at < cutoff]
        if after is not None:
            condition.append(Instance.id > after)
        order = (Instance.id,)
    return (
        select(Instance.id, Instance.forwarded_at, Instance.spool_path)
        .where(
            in_status(Status.DONE),
            Instance.node_id == node_id,
            *condition,
            not_(keeps_an_older_copy_out()),
        )
        .order_by(*order)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
