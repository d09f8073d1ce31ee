"""Retention (``--retain-done``): the service deletes old done rows, and nothing else.

On SQLite and Postgres: rows go in batches, pending, in-flight, failed and unrouted
rows and recent done rows stay, 0 keeps everything, a done row that keeps an older
copy from being sent again stays, the files no row needs any more go, a stop
request ends a pass between batches, and concurrent passes (several pods on one
Postgres queue) delete each row once.
"""

from __future__ import annotations

import io
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from stowaway.cli import build_parser
from stowaway.db.engine import make_engine
from stowaway.db.models import Instance, Status, utcnow
from stowaway.db.queue import NewInstance, Queue
from stowaway.db.spool import Spool
from stowaway.retention import QueueUpkeep
from stowaway.settings import SettingsError, load_settings
from tests.support.seeding import spooled_instance

LEASE = timedelta(minutes=5)
WEEK = timedelta(days=7)


def spooled(
    spool: Spool, n: int, sop: str | None = None, destinations: tuple[str, ...] = ("default",)
) -> NewInstance:
    return spooled_instance(
        spool, sop or f"1.2.3.{n}", f"instance {n}".encode(), destinations=destinations
    )


def age(queue: Queue, ids: list[int], by: timedelta) -> None:
    """Move rows' times ``by`` into the past, as if that long had passed."""
    with queue.engine.begin() as conn:
        for row_id in ids:
            row = queue.get(row_id)
            assert row is not None
            conn.execute(
                update(Instance)
                .where(Instance.id == row_id)
                .values(
                    received_at=row.received_at - by,
                    forwarded_at=row.forwarded_at - by if row.forwarded_at else None,
                )
            )


def forwarded(queue: Queue, spool: Spool, first: int, count: int) -> list[int]:
    ids = [queue.enqueue(spooled(spool, n)).id for n in range(first, first + count)]
    while claimed := queue.claim_batch("w", 50, LEASE):
        queue.complete_many([r.id for r in claimed], "w")
    return ids


def left(queue: Queue) -> dict[Status, int]:
    stats = queue.stats()
    assert queue.maintained_counts() == queue.full_counts()
    return {s: n for s, n in stats.counts.items() if n}


def test_old_done_rows_go_in_batches_and_nothing_else(queue: Queue, spool: Spool) -> None:
    old_done = forwarded(queue, spool, 0, 25)
    recent_done = forwarded(queue, spool, 100, 3)
    failed = queue.enqueue(spooled(spool, 200)).id
    in_flight = queue.enqueue(spooled(spool, 201)).id
    pending = queue.enqueue(spooled(spool, 202)).id
    unrouted = queue.enqueue(spooled(spool, 203, destinations=())).id
    (f,) = queue.claim_batch("w", 1, LEASE)
    queue.fail(f.id, "w", "HTTP 400")
    (g,) = queue.claim_batch("w2", 1, LEASE)
    assert (f.id, g.id) == (failed, in_flight)
    age(queue, [*old_done, pending, failed, in_flight, unrouted], WEEK + timedelta(hours=1))
    queue.fold_counts()
    before = queue.full_counts()

    report = QueueUpkeep(queue, spool, retain_done=WEEK, batch=10).run_pass()

    assert report.deleted == 25
    assert report.batches >= 3  # 10 + 10 + 5: never all at once
    assert all(queue.get(i) is None for i in old_done)
    assert all(queue.get(i) is not None for i in recent_done)
    kept = {i: queue.get(i) for i in (pending, failed, in_flight, unrouted)}
    assert {i: r.status if r else None for i, r in kept.items()} == {
        pending: Status.PENDING,
        failed: Status.FAILED,
        in_flight: Status.IN_FLIGHT,
        unrouted: Status.UNROUTED,
    }
    assert left(queue) == {
        Status.DONE: 3,
        Status.PENDING: 1,
        Status.FAILED: 1,
        Status.IN_FLIGHT: 1,
        Status.UNROUTED: 1,
    }
    assert before[("default", Status.DONE)][0] == 28


def test_zero_keeps_every_done_row(queue: Queue, spool: Spool) -> None:
    ids = forwarded(queue, spool, 0, 5)
    age(queue, ids, timedelta(days=3650))
    assert QueueUpkeep(queue, spool, retain_done=timedelta(0)).run_pass().deleted == 0
    assert QueueUpkeep(queue, spool, retain_done=None).run_pass().deleted == 0
    assert left(queue) == {Status.DONE: 5}


def test_superseded_copies_go_too_but_not_one_that_keeps_an_older_copy_out(
    queue: Queue, spool: Spool
) -> None:
    # A superseded copy: done, never uploaded (forwarded_at NULL).
    old = queue.enqueue(spooled(spool, 1, sop="1.2.3.9")).id
    queue.claim_batch("w", 1, LEASE)
    newer = queue.enqueue(spooled(spool, 2, sop="1.2.3.9")).id
    queue.retry(old, "w", "HTTP 503", utcnow())
    (claimed,) = queue.claim_batch("w", 1, LEASE)
    queue.complete(claimed.id, "w")
    # An older copy that failed, and a newer one delivered since: requeueing the
    # failed one must still find the newer one and be superseded by it.
    stuck = queue.enqueue(spooled(spool, 3, sop="1.2.3.10")).id
    queue.claim_batch("w", 1, LEASE)
    queue.fail(stuck, "w", "HTTP 400")
    delivered = queue.enqueue(spooled(spool, 4, sop="1.2.3.10")).id
    queue.claim_batch("w", 1, LEASE)
    queue.complete(delivered, "w")
    age(queue, [old, newer, stuck, delivered], WEEK * 2)

    report = QueueUpkeep(queue, spool, retain_done=WEEK).run_pass()

    assert report.deleted == 2
    assert queue.get(old) is None and queue.get(newer) is None
    assert queue.get(delivered) is not None
    result = queue.requeue([stuck])
    assert result.superseded == (stuck,) and not result.requeued
    # Settled now: the next pass lets the delivered copy go.
    assert QueueUpkeep(queue, spool, retain_done=WEEK).run_pass().deleted == 2


def test_files_go_with_the_last_row_that_needs_them(queue: Queue, spool: Spool) -> None:
    both = queue.enqueue(spooled(spool, 1, destinations=("default", "archive")))
    (done_here,) = queue.claim_batch("w", 1, LEASE, destination="default")
    queue.complete(done_here.id, "w")  # the forwarder would keep the file: archive needs it
    age(queue, [done_here.id], WEEK * 2)
    path = spool.absolute(done_here.spool_path)

    assert QueueUpkeep(queue, spool, retain_done=WEEK).run_pass().deleted == 1
    assert path.exists(), "the archive delivery still needs the file"

    (other,) = queue.claim_batch("w", 1, LEASE, destination="archive")
    assert other.id == both.ids[1]
    queue.complete(other.id, "w")
    age(queue, [other.id], WEEK * 2)
    report = QueueUpkeep(queue, spool, retain_done=WEEK).run_pass()
    assert report.deleted == 1 and report.files_removed == 1
    assert not path.exists()


def test_a_stop_request_ends_the_pass_between_batches(queue: Queue, spool: Spool) -> None:
    ids = forwarded(queue, spool, 0, 40)
    age(queue, ids, WEEK * 2)
    upkeep = QueueUpkeep(queue, spool, retain_done=WEEK, batch=2, pause_ratio=1000.0)
    upkeep.start()  # a first pass at once, pausing long after each batch
    deadline = time.monotonic() + 10
    while len(queue.rows(status=Status.DONE)) == 40 and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    upkeep.stop(timeout=10)
    assert upkeep._thread is not None and not upkeep._thread.is_alive()
    assert time.monotonic() - started < 5
    remaining = len(queue.rows(status=Status.DONE))
    assert 0 < remaining < 40 and remaining % 2 == 0, remaining  # whole batches only
    assert queue.maintained_counts() == queue.full_counts()


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_concurrent_passes_on_one_postgres_queue_delete_each_row_once(
    queue: Queue, spool: Spool, db_url: str
) -> None:
    ids = forwarded(queue, spool, 0, 120)
    age(queue, ids, WEEK * 2)
    deleted: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def pod() -> None:
        engine = make_engine(db_url)
        own = Queue(engine)
        upkeep = QueueUpkeep(own, spool, retain_done=WEEK, batch=7, pause_ratio=0.0)
        try:
            for _ in range(200):
                report = upkeep.run_pass()
                with lock:
                    deleted.append(report.deleted)
                if not report.interrupted and not own.rows(status=Status.DONE):
                    return
        except Exception as exc:
            errors.append(exc)
        finally:
            own.close()
            engine.dispose()

    threads = [threading.Thread(target=pod) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert sum(deleted) == 120
    assert queue.rows() == []
    queue.fold_counts()
    assert queue.maintained_counts() == queue.full_counts() == {}


def settings(*argv: str):  # type: ignore[no-untyped-def]
    return load_settings(build_parser().parse_args(["serve", *argv]), environ={})


def test_retain_done_takes_durations_and_zero(tmp_path: Path) -> None:
    data = ("--data-dir", str(tmp_path))
    assert settings(*data).retain_done == 7 * 86400
    assert settings(*data, "--retain-done", "12h").retain_done == 12 * 3600
    assert settings(*data, "--retain-done", "30m").retain_done == 1800
    assert settings(*data, "--retain-done", "0").retain_done == 0
    with pytest.raises(SettingsError, match="--retain-done"):
        settings(*data, "--retain-done", "soon")
    with pytest.raises(SettingsError, match="shorter than --keep-done"):
        settings(*data, "--retain-done", "1d", "--keep-done", "2d")
    assert settings(*data, "--retain-done", "0", "--keep-done", "2d").retain_done == 0


def test_a_pass_prunes_empty_hour_directories_of_the_past_not_the_present(
    queue: Queue, spool: Spool
) -> None:
    month_ago = spool.write(b"", io.BytesIO(b"x"), utcnow() - timedelta(days=30))
    spool.remove(month_ago.relative_path)
    ids = forwarded(queue, spool, 0, 3)  # their files are gone; their hour is now
    now_hour = spool.absolute(queue.rows()[0].spool_path).parent
    age(queue, ids, WEEK * 2)

    report = QueueUpkeep(queue, spool, retain_done=WEEK).run_pass()

    assert report.deleted == 3 and report.directories_removed >= 1
    assert not spool.absolute(month_ago.relative_path).parent.exists()
    assert now_hour.is_dir()
