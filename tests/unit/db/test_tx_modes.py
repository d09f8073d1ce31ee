"""How transactions begin and commit: durable writes, lazy writes, reads."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, event, text

from stowaway.db.engine import TxMode, make_engine, with_tx_mode
from stowaway.db.queue import Queue
from tests.unit.db.test_queue import new


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def commit_setting(engine: Engine, mode: TxMode) -> str:
    """What the database will do at this transaction's commit."""
    with with_tx_mode(engine, mode).begin() as conn:
        if engine.dialect.name == "sqlite":
            level = conn.exec_driver_sql("PRAGMA synchronous").scalar_one()
            return {1: "no fsync", 2: "fsync"}[level]
        setting = conn.exec_driver_sql("SHOW synchronous_commit").scalar_one()
        return {"off": "no fsync", "on": "fsync"}[setting]


def test_only_lazy_transactions_skip_the_fsync(engine: Engine) -> None:
    # Alternating on the same pooled connection: a lazy transaction never
    # leaves its setting behind for the next durable one.
    for _ in range(2):
        assert commit_setting(engine, TxMode.DURABLE) == "fsync"
        assert commit_setting(engine, TxMode.LAZY) == "no fsync"
    assert commit_setting(engine, TxMode.READ) == "fsync"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_reads_do_not_wait_for_a_writer(db_url: str, queue: Queue) -> None:
    path = db_url.removeprefix("sqlite:///")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # holds the write lock, as a slow commit would
    try:
        done = threading.Event()

        def read() -> None:
            queue.stats()
            done.set()

        threading.Thread(target=read, daemon=True).start()
        assert done.wait(5), "a read waited for the write lock"
    finally:
        writer.execute("ROLLBACK")
        writer.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_writes_still_queue_behind_a_writer(db_url: str, engine: Engine) -> None:
    path = db_url.removeprefix("sqlite:///")
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    released = 0.0

    def release_soon() -> None:
        nonlocal released
        time.sleep(0.3)
        released = time.monotonic()
        writer.execute("ROLLBACK")

    thread = threading.Thread(target=release_soon)
    thread.start()
    with with_tx_mode(engine, TxMode.LAZY).begin() as conn:
        began = time.monotonic()
        conn.execute(text("UPDATE destinations SET reason = NULL WHERE 1 = 0"))
    thread.join()
    writer.close()
    assert began >= released > 0


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_postgres_claim_is_one_statement_that_commits_lazily(queue: Queue) -> None:
    assert queue._claim_engine is not None
    for i in range(3):
        queue.enqueue(new(i))
    sent: list[str] = []
    event.listen(queue._claim_engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    claimed = queue.claim_batch("worker", 10, timedelta(minutes=5))
    assert len(claimed) == 3
    # No BEGIN, SET LOCAL, ping, second branch, superseded-copies SELECT or COMMIT:
    # one round trip to the database.
    assert len(sent) == 1 and sent[0].lstrip().upper().startswith("WITH")
    with queue._claim_engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "off"
