"""The done-file sweep: every done row's spool file goes once its retention has passed.

Including the rows nothing else deletes files for: copies closed as superseded
(``forwarded_at`` is NULL) and rows whose ``complete_many`` commit answer was
lost (done in the database, file left by the forwarder that never heard so).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

from stowaway.db.models import Instance, Status, utcnow
from stowaway.db.queue import NewInstance, Queue
from stowaway.db.spool import Spool
from stowaway.forwarder.worker import Forwarder, ForwarderConfig
from tests.support.seeding import spooled_instance

LEASE = timedelta(seconds=3)  # housekeeping runs every second


def spooled(spool: Spool, sop: str, content: bytes) -> NewInstance:
    return spooled_instance(spool, sop, content)


@contextmanager
def housekeeping(queue: Queue, spool: Spool, keep_done: timedelta) -> Iterator[None]:
    unused: Any = None
    config = ForwarderConfig("http://127.0.0.1:1", lease=LEASE, keep_done=keep_done)
    forwarder = Forwarder(config, queue, spool, unused)
    thread = threading.Thread(target=forwarder._housekeeping)
    thread.start()
    try:
        yield
    finally:
        forwarder._stop.set()
        thread.join(10)


def eventually(condition: Callable[[], bool], timeout: float = 6.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def file_of(queue: Queue, spool: Spool, row_id: int) -> Path:
    row = queue.get(row_id)
    assert row is not None
    return spool.absolute(row.spool_path)


def superseded_and_newer(queue: Queue, spool: Spool) -> tuple[int, int]:
    old = queue.enqueue(spooled(spool, "1.2.3.9", b"old")).id
    queue.claim_batch("w", 1, timedelta(minutes=5))
    newer = queue.enqueue(spooled(spool, "1.2.3.9", b"new")).id
    queue.retry(old, "w", "HTTP 503", utcnow())  # closed: superseded by the newer copy
    row = queue.get(old)
    assert row is not None and row.status == Status.DONE and row.forwarded_at is None
    return old, newer


def test_a_superseded_copys_file_is_swept_and_the_newer_copys_kept(
    queue: Queue, spool: Spool
) -> None:
    old, newer = superseded_and_newer(queue, spool)
    with housekeeping(queue, spool, keep_done=timedelta(0)):
        assert eventually(lambda: not file_of(queue, spool, old).exists())
    assert file_of(queue, spool, newer).exists()  # pending: still to be sent


def test_a_superseded_copys_file_is_kept_for_the_retention(queue: Queue, spool: Spool) -> None:
    old, _newer = superseded_and_newer(queue, spool)
    with housekeeping(queue, spool, keep_done=timedelta(hours=1)):
        time.sleep(2.5)  # two passes
        assert file_of(queue, spool, old).exists()
    with queue.engine.begin() as conn:  # received (so closed) over an hour ago
        conn.execute(
            update(Instance)
            .where(Instance.id == old)
            .values(received_at=utcnow() - timedelta(hours=2))
        )
    with housekeeping(queue, spool, keep_done=timedelta(hours=1)):
        assert eventually(lambda: not file_of(queue, spool, old).exists())


def test_a_done_row_whose_commit_answer_was_lost_has_its_file_swept(
    queue: Queue, spool: Spool
) -> None:
    row_id = queue.enqueue(spooled(spool, "1.2.3.10", b"data")).id
    queue.claim_batch("w", 1, timedelta(minutes=5))
    # The commit reached the database; its answer never reached the forwarder,
    # which therefore did not delete the file.
    assert queue.complete_many([row_id], "w") == [row_id]
    assert file_of(queue, spool, row_id).exists()
    with housekeeping(queue, spool, keep_done=timedelta(0)):
        assert eventually(lambda: not file_of(queue, spool, row_id).exists())
