"""Migration 0003 (a row per delivery) on a populated database of the schema before it:
every row is kept and goes to the destination named ``default``."""

from __future__ import annotations

from datetime import timedelta

import pytest
from alembic import command
from sqlalchemy import text

from stowaway.db.engine import make_engine
from stowaway.db.migrate import alembic_config, current_revision, upgrade_to_head
from stowaway.db.models import DEFAULT_DESTINATION, Status
from stowaway.db.queue import NewInstance, Queue

LEASE = timedelta(minutes=5)
BEFORE = "0002"
OLD_ROWS = [
    # id, sop uid, status, lease owner
    (1, "1.2.3.1", "pending", None),
    (2, "1.2.3.2", "in_flight", "old-forwarder"),
    (3, "1.2.3.3", "done", None),
    (4, "1.2.3.4", "failed", None),
]


def _at(db_url: str, revision: str) -> None:
    engine = make_engine(db_url)
    try:
        config = alembic_config(engine)
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, revision)
    finally:
        engine.dispose()


def _populate_the_old_schema(db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.begin() as conn:
        for row_id, uid, status, owner in OLD_ROWS:
            conn.execute(
                text(
                    "INSERT INTO instances (id, sop_instance_uid, sop_class_uid, "
                    "study_instance_uid, series_instance_uid, transfer_syntax_uid, calling_aet, "
                    "peer_address, node_id, spool_path, size_bytes, sha256, status, attempts, "
                    "next_attempt_at, lease_owner, lease_expires_at, received_at) VALUES "
                    "(:id, :uid, '1.2.840.10008.5.1.4.1.1.2', '1.2.3', '1.2.3.0', "
                    "'1.2.840.10008.1.2.1', 'CT1', '127.0.0.1:1', '', :path, 10, 'x', :status, "
                    "2, '2026-11-30 10:00:00', :owner, '2026-11-30 10:00:00', "
                    "'2026-11-30 09:00:00')"
                ),
                {"id": row_id, "uid": uid, "status": status, "owner": owner, "path": f"{uid}.dcm"},
            )
        conn.execute(
            text(
                "INSERT INTO instance_events (instance_id, at, kind, detail) "
                "VALUES (4, '2026-11-30 10:00:00', 'failed', 'HTTP 400')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO destinations (url, state, since) "
                "VALUES ('https://h.example/dicomWeb', 'blocked', '2026-11-30 10:00:00')"
            )
        )
    engine.dispose()


def test_every_existing_row_is_kept_for_the_default_destination(db_url: str) -> None:
    _at(db_url, BEFORE)
    _populate_the_old_schema(db_url)
    engine = make_engine(db_url)
    upgrade_to_head(engine)
    queue = Queue(engine)
    try:
        rows = {r.id: r for r in queue.rows()}
        assert sorted(rows) == [1, 2, 3, 4]
        for row_id, uid, status, owner in OLD_ROWS:
            row = rows[row_id]
            assert (row.sop_instance_uid, row.status.value, row.lease_owner, row.attempts) == (
                uid,
                status,
                owner,
                2,
            )
            assert row.destination == DEFAULT_DESTINATION
        assert [kind for _at, kind, _d in queue.events(4)] == ["failed"]
        # The forwarder of --dicomweb-url alone takes them up: the expired lease, then due.
        claimed = queue.claim_batch("new-forwarder", 10, LEASE)
        assert sorted(r.id for r in claimed) == [1, 2]
        # The destination table is keyed by name now (its old state is found again).
        assert queue.list_destinations() == []
    finally:
        queue.close()
        engine.dispose()


def test_after_it_an_instance_has_a_row_per_destination_and_the_duplicate_rule_is_per_destination(
    queue: Queue,
) -> None:
    def new(path: str, destinations: tuple[str, ...]) -> NewInstance:
        return NewInstance(
            sop_instance_uid="1.2.3.9",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.0",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_aet="CT1",
            peer_address="127.0.0.1:1",
            spool_path=path,
            size_bytes=10,
            sha256="x",
            destinations=destinations,
        )

    first = queue.enqueue(new("a.dcm", ("clinical", "research")))
    assert len(first.ids) == 2 and first.replaced_spool_path is None
    # research has started on its copy; a re-send replaces clinical's pending one only
    [taken] = queue.claim_batch("w", 10, LEASE, destination="research")
    again = queue.enqueue(new("b.dcm", ("clinical", "research")))
    by_destination = {r.destination: r for r in queue.rows(status=Status.PENDING)}
    assert by_destination["clinical"].spool_path == "b.dcm"
    assert by_destination["research"].spool_path == "b.dcm"
    assert queue.get(taken.id).spool_path == "a.dcm"  # type: ignore[union-attr]
    # a.dcm is still needed by research's copy in flight: not handed back for deletion
    assert again.replaced_spool_path is None
    assert queue.unneeded_files(["a.dcm", "b.dcm"]) == []


def test_an_instance_no_rule_routes_is_kept_unrouted(queue: Queue) -> None:
    result = queue.enqueue(
        NewInstance(
            sop_instance_uid="1.2.3.7",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.0",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_aet="CT1",
            peer_address="127.0.0.1:1",
            spool_path="u.dcm",
            size_bytes=10,
            sha256="x",
            destinations=(),
        )
    )
    [row] = queue.rows(status=Status.UNROUTED)
    assert row.id == result.id and row.destination == ""
    assert queue.claim_batch("w", 10, LEASE, destination="") == []
    assert queue.stats().counts[Status.UNROUTED] == 1
    assert queue.unneeded_files(["u.dcm"]) == []  # kept with its file


def test_downgrade_refuses_to_lose_deliveries_to_other_destinations(
    db_url: str, queue: Queue
) -> None:
    queue.enqueue(
        NewInstance(
            sop_instance_uid="1.2.3.8",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.0",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_aet="CT1",
            peer_address="127.0.0.1:1",
            spool_path="r.dcm",
            size_bytes=10,
            sha256="x",
            destinations=("research",),
        )
    )
    with pytest.raises(RuntimeError, match="purge them"):
        _at(db_url, BEFORE)
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) != BEFORE
    finally:
        engine.dispose()
