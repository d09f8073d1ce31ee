"""With a year of done rows, the reads behind ``queue stats``, ``/metrics``, ``queue ls
--status failed``, the done-file sweep and retention never walk the whole table.

Every statement those calls run is captured and explained with its own
parameters: on SQLite none may ``SCAN`` (a walk of the table or of a whole
index), on Postgres none may read ``instances`` sequentially when an index path
exists (``enable_seqscan`` off, as a near-empty table would make a scan cheapest).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import event, text

from stowaway.db.models import Status, utcnow
from stowaway.db.queue import Queue

ROWS = 3000


def fill(queue: Queue) -> None:
    """A year of done rows (many), a few failed and pending ones; statistics gathered."""
    now = utcnow().replace(tzinfo=None)
    values = []
    for i in range(ROWS):
        status = "failed" if i % 500 == 0 else "pending" if i > ROWS - 20 else "done"
        at = now - timedelta(days=365) + timedelta(hours=i)
        values.append(
            {
                "sop": f"2.25.{i}",
                "path": f"2026/01/01/00/{i:032x}.dcm",
                "status": status,
                "at": at,
                "fwd": at if status == "done" else None,
            }
        )
    with queue.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
                "series_instance_uid, transfer_syntax_uid, calling_aet, peer_address, node_id, "
                "destination, spool_path, size_bytes, sha256, status, attempts, "
                "next_attempt_at, received_at, forwarded_at) VALUES (:sop, '1', '1', '1', '1', "
                "'A', 'p', '', 'default', :path, 5, 'x', :status, 0, :at, :at, :fwd)"
            ),
            values,
        )
        conn.execute(text("ANALYZE" if conn.dialect.name == "sqlite" else "ANALYZE instances"))


@contextmanager
def captured(queue: Queue) -> Iterator[list[tuple[str, Any]]]:
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_a: Any) -> None:
        if "instances" in statement and not statement.lstrip().upper().startswith(
            ("PRAGMA", "BEGIN", "SET", "SELECT PG_TRY")
        ):
            statements.append((statement, params))

    event.listen(queue.engine, "before_cursor_execute", capture)
    try:
        yield statements
    finally:
        event.remove(queue.engine, "before_cursor_execute", capture)


def full_scans(queue: Queue, statements: list[tuple[str, Any]]) -> list[str]:
    found = []
    raw = queue.engine.raw_connection()
    try:
        cursor = raw.cursor()
        sqlite = queue.engine.dialect.name == "sqlite"
        if not sqlite:
            cursor.execute("SET enable_seqscan = off")
        for statement, params in statements:
            if sqlite:
                cursor.execute(f"EXPLAIN QUERY PLAN {statement}", params)
                plan = "\n".join(str(r[-1]) for r in cursor.fetchall())
                bad = any(
                    re.match(r"SCAN instances(_\d+)?\b", line.strip()) for line in plan.splitlines()
                )
            else:
                cursor.execute(f"EXPLAIN {statement}", params)
                plan = "\n".join(str(r[0]) for r in cursor.fetchall())
                bad = "Seq Scan on instances" in plan
            if bad:
                found.append(f"{statement}\n{plan}")
        raw.rollback()
    finally:
        raw.close()
    return found


def reads(queue: Queue) -> list[Callable[[], object]]:
    now = utcnow()
    return [
        queue.stats,
        queue.stats_by_destination,
        lambda: queue.stats(destination="default"),
        lambda: queue.activity_since(now - timedelta(hours=1)),
        lambda: queue.rows(status=Status.FAILED, limit=100),
        lambda: queue.done_spool_paths(now - timedelta(days=400), now - timedelta(days=300)),
        lambda: queue.unforwarded_done_spool_paths(0, now),
        lambda: queue.destination_names(),
    ]


def test_year_of_rows_reads_use_indexes_not_scans(queue: Queue) -> None:
    fill(queue)
    with captured(queue) as statements:
        for read in reads(queue):
            read()
        assert queue.rows(status=Status.FAILED, limit=100)[0].status == Status.FAILED
    assert statements
    assert full_scans(queue, statements) == []


def test_retention_batches_use_indexes_not_scans(queue: Queue) -> None:
    fill(queue)
    with captured(queue) as statements:
        cutoff = utcnow() - timedelta(days=7)
        batch = queue.retire_done("", cutoff, 100, forwarded=True)
        assert batch.deleted == 100
        queue.retire_done("", cutoff, 100, forwarded=True, after=batch.resume_after)
        queue.retire_done("", cutoff, 100, forwarded=False)
    assert full_scans(queue, statements) == []
