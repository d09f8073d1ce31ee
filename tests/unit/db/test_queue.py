"""The queue's operations and state machine, on SQLite and on Postgres."""

from __future__ import annotations

import dataclasses
import threading
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from stowaway.db.models import Base, Status, utcnow
from stowaway.db.queue import NewInstance, Queue, TransitionError

LEASE = timedelta(minutes=5)


def new(n: int = 1, sop: str | None = None, path: str | None = None) -> NewInstance:
    return NewInstance(
        sop_instance_uid=sop or f"1.2.3.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.0",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_aet="MODALITY",
        peer_address="127.0.0.1:5000",
        spool_path=path or f"2026/01/01/00/{n}.dcm",
        size_bytes=1000 + n,
        sha256="0" * 64,
    )


def test_enqueue_records_a_pending_row(queue: Queue) -> None:
    result = queue.enqueue(new(1))
    row = queue.get(result.id)
    assert row is not None
    assert row.status == Status.PENDING
    assert row.attempts == 0
    assert row.sop_instance_uid == "1.2.3.1"
    assert row.received_at.tzinfo is not None
    assert row.next_attempt_at <= utcnow()
    stats = queue.stats()
    assert stats.counts[Status.PENDING] == 1
    assert stats.bytes[Status.PENDING] == 1001
    assert stats.oldest_pending_received_at == row.received_at


def test_resend_while_pending_replaces_the_queued_copy(queue: Queue) -> None:
    first = queue.enqueue(new(1, path="a.dcm"))
    second = queue.enqueue(new(1, path="b.dcm"))
    assert second.id == first.id
    assert second.replaced_spool_path == "a.dcm"
    rows = queue.find_by_sop("1.2.3.1")
    assert [(r.status, r.spool_path) for r in rows] == [(Status.PENDING, "b.dcm")]


def test_resend_while_in_flight_supersedes_the_stale_copy(queue: Queue) -> None:
    first = queue.enqueue(new(1, path="a.dcm"))
    [claimed] = queue.claim_batch("w1", 10, LEASE)
    second = queue.enqueue(new(1, path="b.dcm"))
    assert second.id != first.id and second.replaced_spool_path is None
    # The stale copy fails transiently: it must not come back as a second pending row.
    queue.retry(claimed.id, "w1", "503", utcnow())
    old = queue.get(first.id)
    assert old is not None and old.status == Status.DONE
    assert "superseded" in (old.last_error or "")
    assert [r.id for r in queue.rows(status=Status.PENDING)] == [second.id]


def test_unique_pending_is_enforced_by_the_database(queue: Queue, db_url: str) -> None:
    queue.enqueue(new(1))
    with pytest.raises(IntegrityError), queue.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid,"
                " series_instance_uid, transfer_syntax_uid, calling_aet, peer_address, spool_path,"
                " size_bytes, sha256, status, next_attempt_at, received_at) VALUES ('1.2.3.1',"
                " 'x', 'x', 'x', 'x', 'x', 'x', 'x', 1, 'x', 'pending', :t, :t)"
            ),
            {"t": utcnow().replace(tzinfo=None)},
        )


def test_claim_leases_due_rows_oldest_first(queue: Queue) -> None:
    ids = [queue.enqueue(new(n)).id for n in range(5)]
    claimed = queue.claim_batch("w1", 3, LEASE)
    assert [r.id for r in claimed] == ids[:3]
    assert all(r.status == Status.IN_FLIGHT and r.lease_owner == "w1" for r in claimed)
    rest = queue.claim_batch("w2", 10, LEASE)
    assert [r.id for r in rest] == ids[3:]
    assert queue.claim_batch("w3", 10, LEASE) == []


def of_study(n: int, study: int) -> NewInstance:
    return dataclasses.replace(new(n), study_instance_uid=f"1.2.3.{study}")


def test_interleaved_studies_are_claimed_one_full_study_batch_at_a_time(queue: Queue) -> None:
    # 8 studies arriving interleaved (several modalities sending at once), 10 rows each.
    studies = {n: n % 8 for n in range(80)}
    ids = {queue.enqueue(of_study(n, s)).id: s for n, s in studies.items()}
    served = []
    while batch := queue.claim_batch("w", 10, LEASE):
        assert len(batch) == 10, [r.study_instance_uid for r in batch]
        assert len({r.study_instance_uid for r in batch}) == 1, batch
        assert all(ids[r.id] == int(r.study_instance_uid.rsplit(".", 1)[1]) for r in batch)
        served.append(batch[0].study_instance_uid)
    # Oldest first between studies: each claim serves the study of the oldest due row.
    assert served == [f"1.2.3.{s}" for s in range(8)]


def test_a_claim_of_one_study_leaves_an_older_study_first_in_line(queue: Queue) -> None:
    old = [queue.enqueue(of_study(n, 1)).id for n in range(3)]
    new_ids = [queue.enqueue(of_study(n, 2)).id for n in range(3, 9)]
    first = queue.claim_batch("w", 2, LEASE)
    assert [r.id for r in first] == old[:2]
    # The older study's last row comes before any of the newer study's, alone.
    assert [r.id for r in queue.claim_batch("w", 5, LEASE)] == old[2:]
    assert [r.id for r in queue.claim_batch("w", 5, LEASE)] == new_ids[:5]


def test_a_claim_serves_the_study_of_an_expired_lease_first(queue: Queue) -> None:
    ids = [queue.enqueue(of_study(n, n % 2)).id for n in range(4)]
    dead = queue.claim_batch("dead-worker", 1, timedelta(seconds=-1))
    assert [r.id for r in dead] == ids[:1]
    later = queue.enqueue(of_study(9, 1)).id
    # The expired row, then the same study's due rows; the other study waits.
    again = queue.claim_batch("w2", 10, LEASE)
    assert [r.id for r in again] == [ids[0], ids[2]]
    assert [r.id for r in queue.claim_batch("w2", 10, LEASE)] == [ids[1], ids[3], later]


def test_expired_lease_is_claimable_again(queue: Queue) -> None:
    row_id = queue.enqueue(new(1)).id
    [held] = queue.claim_batch("dead-worker", 1, timedelta(seconds=-1))
    [again] = queue.claim_batch("w2", 1, LEASE)
    assert again.id == held.id == row_id
    assert again.lease_owner == "w2"
    # The crashed worker's late completion is refused.
    with pytest.raises(TransitionError):
        queue.complete(row_id, "dead-worker")
    queue.complete(row_id, "w2")


def test_future_attempt_is_not_due(queue: Queue) -> None:
    row_id = queue.enqueue(new(1)).id
    [row] = queue.claim_batch("w", 1, LEASE)
    queue.retry(row.id, "w", "HTTP 503", utcnow() + timedelta(hours=1))
    assert queue.claim_batch("w", 1, LEASE) == []
    retried = queue.get(row_id)
    assert retried is not None
    assert (retried.status, retried.attempts, retried.last_error) == (Status.PENDING, 1, "HTTP 503")


def test_transitions_are_guarded(queue: Queue) -> None:
    row_id = queue.enqueue(new(1)).id
    with pytest.raises(TransitionError):
        queue.complete(row_id, "w")  # pending, not in_flight
    queue.claim_batch("w", 1, LEASE)
    with pytest.raises(TransitionError):
        queue.fail(row_id, "someone-else", "x")
    queue.complete(row_id, "w")
    done = queue.get(row_id)
    assert done is not None and done.status == Status.DONE and done.forwarded_at is not None
    with pytest.raises(TransitionError):
        queue.retry(row_id, "w", "x", utcnow())


def test_fail_keeps_the_reason_and_history(queue: Queue) -> None:
    row_id = queue.enqueue(new(1)).id
    queue.claim_batch("w", 1, LEASE)
    queue.fail(row_id, "w", "HTTP 400: bad instance")
    row = queue.get(row_id)
    assert row is not None and row.status == Status.FAILED
    assert row.last_error == "HTTP 400: bad instance"
    assert [kind for _at, kind, _d in queue.events(row_id)] == ["failed"]


def test_release_does_not_count_an_attempt(queue: Queue) -> None:
    row_id = queue.enqueue(new(1)).id
    queue.claim_batch("w", 1, LEASE)
    queue.release(row_id, "w")
    row = queue.get(row_id)
    assert row is not None and (row.status, row.attempts) == (Status.PENDING, 0)


def test_held_by_lists_only_the_owners_in_flight_rows(queue: Queue) -> None:
    ids = [queue.enqueue(new(i)).id for i in range(4)]
    mine = {r.id for r in queue.claim_batch("w1", 2, LEASE)}
    theirs = {r.id for r in queue.claim_batch("w2", 1, LEASE)}
    assert set(queue.held_by("w1")) == mine
    assert set(queue.held_by("w2")) == theirs
    queue.complete(min(mine), "w1")
    assert queue.held_by("w1") == [max(mine)]
    assert queue.held_by("nobody") == []
    assert len(set(ids) - mine - theirs) == 1


def test_status_enum_matches_the_database_check(queue: Queue, db_url: str) -> None:
    with queue.engine.connect() as conn:
        if db_url.startswith("sqlite"):
            ddl = conn.execute(
                text("SELECT sql FROM sqlite_master WHERE name = 'instances'")
            ).scalar_one()
        else:
            ddl = " ".join(
                conn.execute(
                    text(
                        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                        "WHERE conrelid = 'instances'::regclass AND contype = 'c'"
                    )
                ).scalars()
            )
    for status in Status:
        assert f"'{status.value}'" in ddl
    row_id = queue.enqueue(new(1)).id
    with pytest.raises(IntegrityError), queue.engine.begin() as conn:
        conn.execute(text("UPDATE instances SET status = 'lost' WHERE id = :id"), {"id": row_id})


def test_migrations_match_the_models(queue: Queue) -> None:
    with queue.engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    assert diff == []


def test_concurrent_claimers_claim_each_row_exactly_once(queue: Queue) -> None:
    total = 200
    for n in range(total):
        queue.enqueue(new(n))
    seen: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while batch := queue.claim_batch(name, 7, LEASE):
            with lock:
                seen.extend(r.id for r in batch)
            for r in batch:
                queue.complete(r.id, name)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(seen) == total
    assert len(set(seen)) == total
    assert queue.stats().counts[Status.DONE] == total


def test_receive_and_forward_concurrently_never_fail(queue: Queue) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()

    def receiver(offset: int) -> None:
        try:
            for n in range(100):
                queue.enqueue(new(offset + n))
        except BaseException as exc:
            errors.append(exc)

    def forwarder() -> None:
        try:
            while not stop.is_set():
                for r in queue.claim_batch("f", 5, LEASE):
                    queue.complete(r.id, "f")
        except BaseException as exc:
            errors.append(exc)

    producers = [threading.Thread(target=receiver, args=(k * 1000,)) for k in range(3)]
    consumer = threading.Thread(target=forwarder)
    consumer.start()
    for t in producers:
        t.start()
    for t in producers:
        t.join(60)
    stop.set()
    consumer.join(60)
    assert errors == []
    counts = queue.stats().counts
    assert counts[Status.PENDING] + counts[Status.DONE] == 300
