"""The counts behind ``queue stats`` and ``/metrics`` equal a full count of the table.

The triggers of migration 0005 keep them; these tests drive every kind of queue
operation in a seeded random order on SQLite and Postgres and compare the kept
counts with ``COUNT(*) ... GROUP BY destination, status`` after each step.
"""

from __future__ import annotations

import random
import threading
from datetime import timedelta

from sqlalchemy import text, update

from stowaway.db.models import Instance, Status, utcnow
from stowaway.db.queue import NewInstance, Queue, TransitionError

LEASE = timedelta(minutes=5)
DESTINATIONS = ("default", "archive")


def new(rng: random.Random, n: int) -> NewInstance:
    # Few UIDs, so that re-sends replace pending copies and supersede older ones.
    sop = f"1.2.3.{rng.randrange(12)}"
    routed = rng.choice([("default",), ("archive",), DESTINATIONS, DESTINATIONS, ()])
    return NewInstance(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=f"1.2.{rng.randrange(3)}",
        series_instance_uid="1.2.3.0",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_aet="MODALITY",
        peer_address="127.0.0.1:5000",
        spool_path=f"2026/01/01/00/{n:032x}.dcm",
        size_bytes=rng.randrange(1, 10_000),
        sha256="0" * 64,
        destinations=routed,
    )


def assert_counts_exact(queue: Queue, step: str) -> None:
    maintained, full = queue.maintained_counts(), queue.full_counts()
    assert maintained == full, step
    stats = queue.stats()
    for status in Status:
        assert stats.counts[status] == sum(n for (_d, s), (n, _b) in full.items() if s == status)
        assert stats.bytes[status] == sum(b for (_d, s), (_n, b) in full.items() if s == status)


def one_random_operation(queue: Queue, rng: random.Random, n: int) -> str:
    """Apply one queue operation chosen at random; returns what it was."""
    rows = queue.rows()
    kind = rng.choice(
        [
            "enqueue",
            "enqueue",
            "enqueue_many",
            "claim",
            "claim",
            "complete",
            "complete_many",
            "retry",
            "release",
            "fail",
            "requeue",
            "purge",
            "reroute",
            "broken",
            "expire_and_release",
            "supersede_if_newer",
            "delete_rows",
            "retire",
            "extend_lease",
        ]
    )
    held = [r for r in rows if r.status == Status.IN_FLIGHT and r.lease_owner]
    some = rng.sample(rows, min(len(rows), rng.randrange(1, 5))) if rows else []
    try:
        if kind == "enqueue":
            queue.enqueue(new(rng, n))
        elif kind == "enqueue_many":
            queue.enqueue_many([new(rng, n * 10 + i) for i in range(3)])
        elif kind == "claim":
            queue.claim_batch(
                f"w{n}", rng.randrange(1, 6), LEASE, destination=rng.choice(DESTINATIONS)
            )
        elif kind in ("complete", "retry", "release", "fail", "supersede_if_newer") and held:
            row = rng.choice(held)
            owner = row.lease_owner or ""
            if kind == "complete":
                queue.complete(row.id, owner)
            elif kind == "retry":
                queue.retry(row.id, owner, "HTTP 503", utcnow())
            elif kind == "release":
                queue.release(row.id, owner)
            elif kind == "fail":
                queue.fail(row.id, owner, "HTTP 400")
            else:
                queue.supersede_if_newer(row.id, owner)
        elif kind == "complete_many" and held:
            owner = rng.choice(held).lease_owner or ""
            queue.complete_many([r.id for r in held if r.lease_owner == owner], owner)
        elif kind == "requeue" and some:
            queue.requeue([r.id for r in some])
        elif kind == "purge" and some:
            queue.purge([r.id for r in some])
        elif kind == "reroute":
            unrouted = [r for r in rows if r.status == Status.UNROUTED]
            if unrouted:
                queue.reroute(rng.choice(unrouted).id, rng.choice([DESTINATIONS, ("archive",)]))
        elif kind == "broken" and some:
            queue.mark_file_broken(some[0].id, some[0].spool_path, "reconcile: missing")
        elif kind == "expire_and_release" and held:
            with queue.engine.begin() as conn:
                conn.execute(
                    update(Instance)
                    .where(Instance.id == held[0].id)
                    .values(lease_expires_at=utcnow() - timedelta(seconds=1))
                )
            queue.release_expired([held[0].id])
        elif kind == "delete_rows" and some:
            queue.delete_rows([some[0].id])
        elif kind == "retire":
            queue.retire_done("", utcnow() + timedelta(days=1), 2, forwarded=rng.random() < 0.5)
        elif kind == "extend_lease" and held:
            queue.extend_lease([held[0].id], held[0].lease_owner or "", LEASE)
    except TransitionError:
        pass
    return kind


def test_kept_counts_equal_a_full_count_after_random_operations(queue: Queue) -> None:
    rng = random.Random(20)
    done: set[str] = set()
    for n in range(160):
        kind = one_random_operation(queue, rng, n)
        done.add(kind)
        assert_counts_exact(queue, f"step {n}: {kind}")
        if n % 25 == 0:
            queue.fold_counts()
            assert_counts_exact(queue, f"step {n}: fold")
    assert len(queue.rows()) > 10
    assert {"enqueue", "claim", "complete", "requeue", "purge", "retire"} <= done


def test_concurrent_writers_and_folds_keep_the_counts_exact(queue: Queue) -> None:
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for n in range(40):
                one_random_operation(queue, rng, seed * 1000 + n)
                if n % 7 == 0:
                    queue.fold_counts()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    # A unique-index race between two receipts of one UID is the queue's to retry;
    # anything else is a failure of the test.
    assert not [e for e in errors if "uq_instances_pending_sop" not in str(e)], errors
    assert_counts_exact(queue, "after concurrent writers")
    queue.fold_counts()
    assert_counts_exact(queue, "after the last fold")


def test_counts_start_from_the_rows_already_there(queue: Queue) -> None:
    """The migration counts the table once; a bulk insert (the benchmark's) is counted too."""
    with queue.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
                "series_instance_uid, transfer_syntax_uid, calling_aet, peer_address, node_id, "
                "destination, spool_path, size_bytes, sha256, status, attempts, "
                "next_attempt_at, received_at) VALUES "
                "('1', '1', '1', '1', '1', 'A', 'p', '', 'default', 'a', 5, 'x', 'done', 0, "
                ":t, :t), ('2', '1', '1', '1', '1', 'A', 'p', '', 'default', 'b', 7, 'x', "
                "'pending', 0, :t, :t)"
            ),
            {"t": utcnow().replace(tzinfo=None)},
        )
    assert queue.maintained_counts() == {
        ("default", Status.DONE): (1, 5),
        ("default", Status.PENDING): (1, 7),
    }
    assert_counts_exact(queue, "bulk insert")
