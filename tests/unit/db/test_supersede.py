"""The duplicate rule wherever a copy is superseded: the later ``(received_at, id)`` wins.

Each test builds a state in which an older copy of an instance meets a newer one
through one of the queue's paths (retry, release, lease expiry, requeue, claim)
and checks that the older copy never becomes the one that is sent.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from stowaway.db.models import Instance, Status, utcnow
from stowaway.db.queue import NewInstance, Queue, ReleaseResult, RequeueResult

LEASE = timedelta(minutes=5)
SOP = "1.2.3.7"


def copy(path: str) -> NewInstance:
    return NewInstance(
        sop_instance_uid=SOP,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.0",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_aet="MODALITY",
        peer_address="127.0.0.1:5000",
        spool_path=path,
        size_bytes=1000,
        sha256="0" * 64,
    )


def in_flight_pair(queue: Queue, old_lease_expired: bool = False) -> tuple[int, int]:
    """The old copy in flight under ``old``, the re-sent newer copy in flight under ``new``."""
    old = queue.enqueue(copy("old.dcm")).id
    assert [r.id for r in queue.claim_batch("old", 1, LEASE)] == [old]
    newer = queue.enqueue(copy("new.dcm")).id
    assert [r.id for r in queue.claim_batch("new", 1, LEASE)] == [newer]
    if old_lease_expired:  # the old copy's forwarder died
        with queue.engine.begin() as conn:
            conn.execute(
                update(Instance)
                .where(Instance.id == old)
                .values(lease_expires_at=utcnow() - timedelta(seconds=1))
            )
    return old, newer


def status(queue: Queue, row_id: int) -> Status:
    row = queue.get(row_id)
    assert row is not None
    return row.status


def superseded_by(queue: Queue, row_id: int, newer: int) -> bool:
    row = queue.get(row_id)
    assert row is not None
    return row.status == Status.DONE and f"row {newer}" in (row.last_error or "")


def pending(queue: Queue) -> list[int]:
    return [r.id for r in queue.rows(status=Status.PENDING)]


def test_an_older_copy_retried_while_the_newer_is_in_flight_is_superseded(
    queue: Queue,
) -> None:
    old, newer = in_flight_pair(queue)
    queue.retry(old, "old", "503", utcnow())
    queue.retry(newer, "new", "503", utcnow())
    assert pending(queue) == [newer]
    assert superseded_by(queue, old, newer)


def test_a_newer_copy_given_back_after_an_older_pending_one_stays_pending(
    queue: Queue,
) -> None:
    """An older pending copy (left by an earlier version of the rules) is not newer."""
    old, newer = in_flight_pair(queue)
    # Craft the state the old rules left: the older copy pending beside the newer in flight.
    with queue.engine.begin() as conn:
        conn.execute(
            update(Instance)
            .where(Instance.id == old)
            .values(status=Status.PENDING, lease_owner=None, lease_expires_at=None)
        )
    queue.release(newer, "new")
    assert pending(queue) == [newer]
    assert superseded_by(queue, old, newer)


def test_release_of_an_expired_older_copy_while_the_newer_is_in_flight_supersedes_it(
    queue: Queue,
) -> None:
    old, newer = in_flight_pair(queue, old_lease_expired=True)
    assert queue.release_expired([old]) == ReleaseResult(superseded=(old,))
    queue.retry(newer, "new", "503", utcnow())
    assert pending(queue) == [newer]
    assert superseded_by(queue, old, newer)


def test_requeue_of_a_failed_older_copy_while_the_newer_is_in_flight_supersedes_it(
    queue: Queue,
) -> None:
    old, newer = in_flight_pair(queue)
    queue.fail(old, "old", "HTTP 400")
    assert queue.requeue([old]) == RequeueResult(superseded=(old,))
    queue.complete(newer, "new")
    # Nothing is left to send: the older version never reaches the destination.
    assert queue.claim_batch("w", 10, LEASE) == []
    assert superseded_by(queue, old, newer)


def test_requeue_of_an_older_done_copy_whose_newer_copy_was_forwarded_supersedes_it(
    queue: Queue,
) -> None:
    """``queue requeue --status done``: the newer copy's file is gone, so only the older
    (superseded) copy is handed to requeue; it must not be sent again."""
    old, newer = in_flight_pair(queue)
    queue.retry(old, "old", "503", utcnow())  # superseded by the newer copy
    queue.complete(newer, "new")
    assert status(queue, old) == Status.DONE
    assert queue.requeue([old]) == RequeueResult(superseded=(old,))
    assert queue.claim_batch("w", 10, LEASE) == []


def test_an_expired_older_copy_is_not_claimed_once_the_newer_copy_was_forwarded(
    queue: Queue,
) -> None:
    old, newer = in_flight_pair(queue, old_lease_expired=True)
    queue.complete(newer, "new")
    assert queue.claim_batch("w", 10, LEASE) == []
    assert superseded_by(queue, old, newer)


def test_supersede_if_newer_closes_only_an_older_copy(queue: Queue) -> None:
    old, newer = in_flight_pair(queue)
    queue.complete(newer, "new")
    assert queue.supersede_if_newer(old, "old") == newer
    assert superseded_by(queue, old, newer)
    alone = queue.enqueue(copy("again.dcm")).id
    [claimed] = queue.claim_batch("w", 1, LEASE)
    assert claimed.id == alone
    assert queue.supersede_if_newer(alone, "w") is None
    assert status(queue, alone) == Status.IN_FLIGHT
