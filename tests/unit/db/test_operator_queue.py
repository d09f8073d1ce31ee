"""The queue's operator actions (requeue, purge, reconcile helpers), on SQLite and Postgres."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from sqlalchemy import update

from stowaway.db.models import DestinationState, Instance, Status, utcnow
from stowaway.db.queue import NewInstance, PurgeResult, Queue, ReleaseResult, RequeueResult

LEASE = timedelta(minutes=5)
EXPIRED = timedelta(seconds=-1)


def new(
    n: int, sop: str | None = None, path: str | None = None, study: str = "1.2.3"
) -> NewInstance:
    return NewInstance(
        sop_instance_uid=sop or f"1.2.3.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=study,
        series_instance_uid="1.2.3.0",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_aet="MODALITY",
        peer_address="127.0.0.1:5000",
        spool_path=path or f"2026/01/01/00/{n}.dcm",
        size_bytes=1000 + n,
        sha256="0" * 64,
    )


def failed_row(queue: Queue, n: int, error: str = "HTTP 403", **kw: str) -> int:
    """Enqueue, claim and fail one row; returns its id."""
    row_id = queue.enqueue(new(n, **kw)).id
    claimed = queue.claim_batch("op-test", 100, LEASE)
    assert row_id in [r.id for r in claimed]
    for r in claimed:
        if r.id == row_id:
            queue.fail(r.id, "op-test", error)
        else:
            queue.release(r.id, "op-test")
    return row_id


def status_of(queue: Queue, row_id: int) -> Status:
    row = queue.get(row_id)
    assert row is not None
    return row.status


def test_requeue_puts_failed_rows_back_due_now_and_keeps_the_error_in_history(
    queue: Queue,
) -> None:
    row_id = failed_row(queue, 1, "HTTP 403 Permission denied")
    before = queue.get(row_id)
    assert before is not None and before.attempts == 1
    result = queue.requeue([row_id])
    assert result == RequeueResult(requeued=(row_id,), superseded=(), leased=())
    row = queue.get(row_id)
    assert row is not None
    assert row.status == Status.PENDING
    assert row.attempts == 0 and row.last_error is None
    assert row.next_attempt_at <= utcnow()
    assert row.lease_owner is None
    assert [(k, d) for _at, k, d in queue.events(row_id)][-1] == (
        "requeued",
        "HTTP 403 Permission denied",
    )
    # and the forwarder can claim it at once
    assert [r.id for r in queue.claim_batch("w", 10, LEASE)] == [row_id]


def test_requeue_leaves_live_leases_alone_and_takes_back_expired_ones(queue: Queue) -> None:
    live = queue.enqueue(new(1)).id
    queue.claim_batch("w-live", 1, LEASE)
    stale = queue.enqueue(new(2)).id
    queue.claim_batch("w-dead", 1, EXPIRED)
    result = queue.requeue([live, stale])
    assert result.leased == (live,)
    assert result.requeued == (stale,)
    assert status_of(queue, live) == Status.IN_FLIGHT
    assert status_of(queue, stale) == Status.PENDING
    # The dead forwarder can no longer settle the row it lost.
    row = queue.get(stale)
    assert row is not None and row.lease_owner is None


def test_requeue_of_a_failed_copy_when_a_newer_copy_is_pending_supersedes_it(
    queue: Queue,
) -> None:
    old = failed_row(queue, 1, path="old.dcm")
    newer = queue.enqueue(new(1, path="new.dcm")).id
    assert newer != old
    result = queue.requeue([old])  # must not violate the unique pending index
    assert result == RequeueResult(requeued=(), superseded=(old,), leased=())
    assert status_of(queue, newer) == Status.PENDING
    row = queue.get(old)
    assert row is not None and row.status == Status.DONE
    assert f"row {newer}" in (row.last_error or "")
    assert [r.id for r in queue.rows(status=Status.PENDING)] == [newer]


def test_requeue_of_the_newer_copy_closes_the_older_pending_one(queue: Queue) -> None:
    older = queue.enqueue(new(1, path="a.dcm")).id
    [claimed] = queue.claim_batch("w", 1, LEASE)
    newer = queue.enqueue(new(1, path="b.dcm")).id  # re-sent while in flight
    [claimed_newer] = queue.claim_batch("w", 1, LEASE)
    assert claimed_newer.id == newer
    queue.fail(newer, "w", "409 conflict")
    queue.retry(older, "w", "503", utcnow() + timedelta(hours=1))  # older pending again
    assert claimed.id == older and status_of(queue, older) == Status.PENDING
    result = queue.requeue([newer])
    assert result == RequeueResult(requeued=(newer,), superseded=(older,), leased=())
    assert [r.id for r in queue.rows(status=Status.PENDING)] == [newer]
    assert status_of(queue, older) == Status.DONE


def test_requeue_of_two_failed_copies_of_one_instance_leaves_one_pending(queue: Queue) -> None:
    first = failed_row(queue, 1, path="a.dcm")
    second = failed_row(queue, 1, path="b.dcm")
    result = queue.requeue([first, second])
    assert sorted(result.requeued) == [first, second]
    assert result.superseded == (first,)
    assert [r.id for r in queue.rows(status=Status.PENDING)] == [second]


def test_purge_deletes_rows_and_history_and_hands_back_unreferenced_files(queue: Queue) -> None:
    a = failed_row(queue, 1, path="a.dcm")
    b = failed_row(queue, 2, path="b.dcm")
    pending = queue.enqueue(new(3, path="c.dcm")).id
    result = queue.purge([a, b, pending], [Status.FAILED])
    assert result == PurgeResult(
        deleted=(a, b), size_bytes=1001 + 1002, unreferenced_paths=("a.dcm", "b.dcm")
    )
    assert queue.get(a) is None and queue.events(a) == []
    assert status_of(queue, pending) == Status.PENDING  # not in the statuses asked for


def test_purge_never_takes_a_row_under_a_live_lease(queue: Queue) -> None:
    live = queue.enqueue(new(1)).id
    queue.claim_batch("w", 1, LEASE)
    stale = queue.enqueue(new(2)).id
    queue.claim_batch("w2", 1, EXPIRED)
    assert queue.purge([live, stale]).deleted == (stale,)
    assert status_of(queue, live) == Status.IN_FLIGHT


def test_purge_keeps_a_file_another_row_still_points_to(queue: Queue) -> None:
    a = failed_row(queue, 1, path="shared.dcm")
    failed_row(queue, 2, path="shared.dcm")
    result = queue.purge([a])
    assert result.deleted == (a,) and result.unreferenced_paths == ()


def test_select_ids_filters(queue: Queue) -> None:
    old_failed = failed_row(queue, 1, study="9.9")
    done = queue.enqueue(new(2)).id
    [c] = queue.claim_batch("w", 1, LEASE)
    queue.complete(c.id, "w")
    fresh = queue.enqueue(new(3)).id
    long_ago = utcnow() - timedelta(days=10)
    with queue.engine.begin() as conn:
        conn.execute(update(Instance).where(Instance.id == old_failed).values(received_at=long_ago))
        # done long ago, but received recently: --older-than looks at forwarded_at for done
        conn.execute(update(Instance).where(Instance.id == done).values(forwarded_at=long_ago))
    cutoff = utcnow() - timedelta(days=7)
    assert queue.select_ids(older_than=cutoff) == [old_failed, done]
    assert queue.select_ids(statuses=[Status.FAILED]) == [old_failed]
    assert queue.select_ids(study_instance_uid="9.9") == [old_failed]
    assert queue.select_ids(ids=[fresh, 12345]) == [fresh]
    assert queue.select_ids(ids=[fresh], node_id="other-node") == []
    assert queue.total_bytes([old_failed, fresh]) == 1001 + 1003


def test_activity_and_destinations(queue: Queue) -> None:
    failed_row(queue, 1)
    queue.enqueue(new(2))
    [c] = queue.claim_batch("w", 1, LEASE)
    queue.retry(c.id, "w", "503", utcnow())
    [c] = queue.claim_batch("w", 1, LEASE)
    queue.complete(c.id, "w")
    activity = queue.activity_since(utcnow() - timedelta(hours=1))
    assert activity == {"uploaded": 1, "failed": 1, "retried": 1}
    assert queue.activity_since(utcnow() + timedelta(seconds=5))["uploaded"] == 0
    queue.set_destination("https://b.example/dicomWeb", DestinationState.BLOCKED, "403", None)
    queue.set_destination("https://a.example/dicomWeb", DestinationState.OK, None, None)
    listed = queue.list_destinations()
    assert [(d.name, d.state) for d in listed] == [
        ("https://a.example/dicomWeb", DestinationState.OK),
        ("https://b.example/dicomWeb", DestinationState.BLOCKED),
    ]


def test_mark_file_broken_is_guarded(queue: Queue) -> None:
    pending = queue.enqueue(new(1, path="p.dcm")).id
    assert not queue.mark_file_broken(pending, "other.dcm", "missing")  # path changed
    assert queue.mark_file_broken(pending, "p.dcm", "reconcile: spool file is missing")
    row = queue.get(pending)
    assert row is not None and row.status == Status.FAILED
    assert row.last_error == "reconcile: spool file is missing"
    assert queue.events(pending)[-1][1:] == ("failed", "reconcile: spool file is missing")
    live = queue.enqueue(new(2, path="l.dcm")).id
    queue.claim_batch("w", 1, LEASE)
    assert not queue.mark_file_broken(live, "l.dcm", "missing")
    assert status_of(queue, live) == Status.IN_FLIGHT
    done = queue.enqueue(new(3, path="d.dcm")).id
    [c] = queue.claim_batch("w", 1, LEASE)
    queue.complete(c.id, "w")
    assert not queue.mark_file_broken(done, "d.dcm", "missing")  # deleted after upload: fine


def test_release_expired(queue: Queue) -> None:
    live = queue.enqueue(new(1)).id
    queue.claim_batch("w", 1, LEASE)
    stale = queue.enqueue(new(2)).id
    superseded = queue.enqueue(new(3, path="x.dcm")).id
    assert len(queue.claim_batch("dead", 2, EXPIRED)) == 2
    newer = queue.enqueue(new(3, path="y.dcm")).id  # re-sent while the old copy was held
    result = queue.release_expired([live, stale, superseded])
    assert result == ReleaseResult(released=(stale,), superseded=(superseded,))
    assert status_of(queue, live) == Status.IN_FLIGHT
    assert status_of(queue, stale) == Status.PENDING
    assert status_of(queue, superseded) == Status.DONE
    assert status_of(queue, newer) == Status.PENDING


def test_spool_paths_and_rows_pages(queue: Queue) -> None:
    ids = [queue.enqueue(new(n)).id for n in range(1, 6)]
    first = queue.spool_paths_page(0, 2)
    assert [i for i, _ in first] == ids[:2]
    rest = queue.spool_paths_page(first[-1][0], 100)
    assert [i for i, _ in rest] == ids[2:]
    page = queue.rows_page(ids[0], 2, [Status.PENDING], "")
    assert [r.id for r in page] == ids[1:3]
    assert queue.rows_page(0, 10, [Status.PENDING], "other-node") == []


def test_requeue_racing_a_forwarder_ends_consistent(queue: Queue) -> None:
    """Chunked requeues of failed rows while a forwarder claims and completes: every row
    ends done, each requeued exactly once, nothing raises (SKIP LOCKED vs FOR UPDATE on
    Postgres, BEGIN IMMEDIATE on SQLite)."""
    n = 120
    ids = [failed_row(queue, i) for i in range(1, n + 1)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def forwarder() -> None:
        try:
            while not stop.is_set():
                batch = queue.claim_batch("fw", 7, LEASE)
                for row in batch:
                    queue.complete(row.id, "fw")
                if not batch:
                    time.sleep(0.005)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=forwarder)
    thread.start()
    try:
        requeued: list[int] = []
        for i in range(0, n, 25):
            requeued.extend(queue.requeue(ids[i : i + 25]).requeued)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(r.status == Status.DONE for r in queue.rows()):
                break
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
    assert not errors
    assert sorted(requeued) == ids
    rows = queue.rows()
    assert [r.status for r in rows] == [Status.DONE] * n
    for row_id in ids:
        kinds = [kind for _at, kind, _d in queue.events(row_id)]
        assert kinds.count("requeued") == 1
