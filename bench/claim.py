"""Case 5: claim latency with many pending rows, on SQLite and on Postgres.

The rows are inserted in bulk (``executemany`` on SQLite, ``INSERT ... SELECT
generate_series`` on Postgres), never through ``enqueue`` one by one. Then
``Queue.claim_batch`` (10 rows, the forwarder's default batch) is timed many
times, and the claim's query plans are shown: each branch must be a range
scan of its index, with no sort.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from stowaway.db.engine import make_engine
from stowaway.db.migrate import upgrade_to_head
from stowaway.db.models import DEFAULT_DESTINATION, utcnow
from stowaway.db.queue import Queue
from stowaway.db.statements import (
    CLAIM_BRANCHES,
    claim_candidates,
    claim_params,
    claim_statement,
    claim_statement_single,
    claim_study,
    claim_study_statement,
)

#: the forwarder's default claim size (--batch-max-instances)
CLAIM_LIMIT = 10


@dataclass
class ClaimResult:
    database: str
    rows: int
    insert_seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    #: the claim's statements alone, rolled back instead of committed
    statement_ms: list[float] = field(default_factory=list)
    #: a 4 KiB write + fsync on the database's disk, timed next to the claims
    fsync_ms: list[float] = field(default_factory=list)
    plans: dict[str, str] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies_ms)

    @property
    def p95_ms(self) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]

    def to_json(self) -> dict[str, object]:
        return {
            "database": self.database,
            "rows": self.rows,
            "insert_seconds": self.insert_seconds,
            "claims": len(self.latencies_ms),
            "median_ms": self.median_ms,
            "p95_ms": self.p95_ms,
            "max_ms": max(self.latencies_ms),
            "statement_median_ms": statistics.median(self.statement_ms),
            "fsync_median_ms": statistics.median(self.fsync_ms),
            "plans": self.plans,
        }


_COLUMNS = (
    "sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, "
    "transfer_syntax_uid, calling_aet, peer_address, node_id, spool_path, size_bytes, "
    "sha256, status, attempts, next_attempt_at, received_at"
)


#: how SQLAlchemy stores a DateTime in SQLite
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"


def _fill_sqlite(queue: Queue, rows: int) -> None:
    base = utcnow().replace(tzinfo=None) - timedelta(days=1)
    raw = queue.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("BEGIN")
        cursor.executemany(
            f"INSERT INTO instances ({_COLUMNS}) VALUES "
            "(?, '1.2.840.10008.5.1.4.1.1.2', ?, ?, '1.2.840.10008.1.2.1', 'BENCH', "
            "'127.0.0.1:104', '', ?, 525000, ?, 'pending', 0, ?, ?)",
            (
                (
                    f"2.25.{i}",
                    f"2.25.1{i // 300}",
                    f"2.25.2{i // 300}",
                    f"2024/01/01/00/{i:032x}.dcm",
                    f"{i:064x}",
                    (base + timedelta(milliseconds=i)).strftime(_SQLITE_TIME),
                    (base + timedelta(milliseconds=i)).strftime(_SQLITE_TIME),
                )
                for i in range(rows)
            ),
        )
        cursor.execute("COMMIT")
        cursor.execute("ANALYZE")
    finally:
        raw.close()


def _fill_postgres(queue: Queue, rows: int) -> None:
    with queue.engine.begin() as conn:
        conn.execute(
            text(
                f"INSERT INTO instances ({_COLUMNS}) SELECT "
                "'2.25.' || i, '1.2.840.10008.5.1.4.1.1.2', '2.25.1' || (i / 300), "
                "'2.25.2' || (i / 300), '1.2.840.10008.1.2.1', 'BENCH', '127.0.0.1:104', '', "
                "'2024/01/01/00/' || lpad(to_hex(i), 32, '0') || '.dcm', 525000, "
                "lpad(to_hex(i), 64, '0'), 'pending', 0, "
                "(now() at time zone 'utc') - interval '1 day' + i * interval '1 millisecond', "
                "(now() at time zone 'utc') - interval '1 day' + i * interval '1 millisecond' "
                "FROM generate_series(0, :n - 1) AS i"
            ),
            {"n": rows},
        )
        conn.execute(text("ANALYZE instances"))


def plans(queue: Queue) -> dict[str, str]:
    """The claim's query plans, as the claim runs it.

    SQLite: EXPLAIN QUERY PLAN of each branch's candidate query. Postgres:
    EXPLAIN ANALYZE of the whole single-statement claim, rolled back.
    """
    if queue.engine.dialect.name != "sqlite":
        return {"single statement": queue.claim_plan(analyze=True)}
    out: dict[str, str] = {}
    queries: dict[str, Any] = {"study": claim_study(utcnow())}
    for branch in CLAIM_BRANCHES:
        queries[branch] = claim_candidates(branch, utcnow(), "", CLAIM_LIMIT, study="2.25.10")
    for branch, query in queries.items():
        with queue.engine.connect() as conn:
            compiled = query.compile(conn, compile_kwargs={"literal_binds": True})
            if conn.dialect.name == "sqlite":
                result = conn.execute(text(f"EXPLAIN QUERY PLAN {compiled}")).all()
                out[branch] = "\n".join(str(r[-1]) for r in result)
            else:
                result = conn.execute(text(f"EXPLAIN ANALYZE {compiled}")).all()
                out[branch] = "\n".join(r[0] for r in result)
    return out


def measure(
    queue: Queue,
    name: str,
    rows: int,
    claims: int,
    fill: Callable[[Queue, int], None],
    probe_dir: Path,
) -> ClaimResult:
    started = time.perf_counter()
    fill(queue, rows)
    result = ClaimResult(name, rows, time.perf_counter() - started)
    result.plans = plans(queue)
    lease = timedelta(minutes=5)
    for _ in range(3):  # warm the connection pool and the statement cache
        queue.claim_batch("bench-warmup", CLAIM_LIMIT, lease)
    for i in range(claims):
        t = time.perf_counter()
        claimed = queue.claim_batch(f"bench-{i}", CLAIM_LIMIT, lease)
        result.latencies_ms.append((time.perf_counter() - t) * 1000)
        if len(claimed) != CLAIM_LIMIT:
            raise RuntimeError(f"claim returned {len(claimed)} rows, wanted {CLAIM_LIMIT}")
        result.statement_ms.append(_uncommitted_claim_ms(queue, lease))
        result.fsync_ms.append(_fsync_ms(probe_dir))
    return result


def _uncommitted_claim_ms(queue: Queue, lease: timedelta) -> float:
    """The claim's statements as ``claim_batch`` runs them, rolled back: no commit, no fsync."""
    now = utcnow()
    params = claim_params(now, "", CLAIM_LIMIT, "bench", now + lease, DEFAULT_DESTINATION)
    single = queue.engine.dialect.name != "sqlite"
    with queue.engine.connect() as conn:
        t = time.perf_counter()
        with conn.begin() as tx:
            if single:
                conn.execute(claim_statement_single(), params).all()
            else:
                study = conn.execute(claim_study_statement(), params).scalar()
                for branch in CLAIM_BRANCHES:
                    conn.execute(claim_statement(branch), {**params, "claim_study": study}).all()
            tx.rollback()
        return (time.perf_counter() - t) * 1000


def _fsync_ms(directory: Path) -> float:
    path = directory / ".bench-fsync-probe"
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"x" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    return (time.perf_counter() - t) * 1000


def sqlite_claim(workdir: Path, rows: int, claims: int) -> ClaimResult:
    path = workdir / "claim-queue.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    engine = make_engine(f"sqlite:///{path}")
    queue = Queue(engine)
    try:
        upgrade_to_head(engine)
        return measure(queue, "SQLite", rows, claims, _fill_sqlite, workdir)
    finally:
        queue.close()
        engine.dispose()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


@contextmanager
def _postgres_database(url: str) -> Iterator[str]:
    admin = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"stowaway_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pg_data_dir(engine: Any) -> Path:
    """Postgres's data directory when it is on this machine (for the fsync probe), else /tmp."""
    with engine.connect() as conn:
        directory = Path(str(conn.execute(text("SHOW data_directory")).scalar_one()))
    return directory if directory.is_dir() else Path("/tmp")


def postgres_claim(url: str, rows: int, claims: int) -> ClaimResult:
    with _postgres_database(url) as db_url:
        engine = make_engine(db_url)
        queue = Queue(engine)
        try:
            upgrade_to_head(engine)
            return measure(queue, "Postgres", rows, claims, _fill_postgres, _pg_data_dir(engine))
        finally:
            queue.close()
            engine.dispose()
