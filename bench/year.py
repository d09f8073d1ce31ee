"""Case "year": a queue that has run for a year, against an empty one, in one run.

Two queues per database, side by side: "empty" (only the rows the measurements
need: 2,000 pending) and "year" (``rows`` rows: 99 % done, forwarded over the
past 365 days, 1 % pending received in the last hour, 1,000 failed), filled in
bulk (``executemany`` in large transactions on SQLite, ``INSERT ... SELECT
generate_series`` on Postgres, as ``bench/claim.py`` does; the counting triggers
fire as for any insert). The operations are timed alternately on the two queues,
so a busy moment of the (shared) machine hits both alike:

* claim: ``Queue.claim_batch`` (10 rows);
* enqueue: ``Queue.enqueue`` of one instance with a random UID (a committed row);
* ``queue stats``: what the command reads (``queue_summary``), without the
  process start-up;
* ``queue ls --status failed``: ``Queue.rows(status=failed, limit=100)``;
* a ``/metrics`` scrape: the registry rendered with the queue collector uncached,
  for two destinations;

then one retention pass on the year queue (``QueueUpkeep.run_pass``, with the
service's batch size and pauses, ``--retain-done 7d``), with claims timed on the
same queue while it runs, bounded by ``timeout`` seconds.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from sqlalchemy import text

from bench.claim import _postgres_database
from bench.results import Target
from stowaway.db.engine import PostgresTimeouts, make_engine
from stowaway.db.migrate import upgrade_to_head
from stowaway.db.models import Status, utcnow
from stowaway.db.queue import NewInstance, Queue
from stowaway.db.spool import Spool
from stowaway.metrics import Metrics
from stowaway.queue_operations import queue_summary
from stowaway.retention import QueueUpkeep

CLAIM_LIMIT = 10
EMPTY_PENDING = 2_000
FAILED_ROWS = 1_000
RETAIN = timedelta(days=7)
#: timed calls of each operation on each queue
SAMPLES = 40

_COLUMNS = (
    "sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, "
    "transfer_syntax_uid, calling_aet, peer_address, node_id, destination, spool_path, "
    "size_bytes, sha256, status, attempts, next_attempt_at, received_at, forwarded_at"
)
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"
_SQLITE_CHUNK = 500_000


@dataclass
class YearResult:
    database: str
    rows: int
    fill_seconds: float = 0.0
    #: per operation: latencies in ms on the empty queue and on the year queue
    empty_ms: dict[str, list[float]] = field(default_factory=dict)
    year_ms: dict[str, list[float]] = field(default_factory=dict)
    retention_deleted: int = 0
    retention_seconds: float = 0.0
    retention_finished: bool = False
    claims_during_retention_ms: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "database": self.database,
            "rows": self.rows,
            "fill_seconds": self.fill_seconds,
            "retention_deleted": self.retention_deleted,
            "retention_seconds": self.retention_seconds,
            "retention_rows_per_second": self.retention_rate,
            "retention_finished": self.retention_finished,
            "claims_during_retention_ms": summary(self.claims_during_retention_ms),
            "operations": {
                op: {"empty_ms": summary(self.empty_ms[op]), "year_ms": summary(self.year_ms[op])}
                for op in self.year_ms
            },
        }
        return out

    @property
    def retention_rate(self) -> float:
        return self.retention_deleted / self.retention_seconds if self.retention_seconds else 0.0


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "n": len(values),
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        "max": ordered[-1],
    }


# -- filling -------------------------------------------------------------------


def _sqlite_rows(rows: int, pending: int, failed: int) -> Iterator[tuple[Any, ...]]:
    """Done rows forwarded evenly over the past year, then failed, then pending ones."""
    now = utcnow().replace(tzinfo=None)
    done = rows - pending - failed
    year_start = now - timedelta(days=365)
    step = timedelta(days=365) / max(1, done)
    for i in range(rows):
        if i < done:
            received = year_start + step * i
            forwarded: str | None = (received + timedelta(seconds=1)).strftime(_SQLITE_TIME)
            status = "done"
        else:
            received = now - timedelta(minutes=30) + timedelta(microseconds=i - done)
            forwarded = None
            status = "failed" if i < done + failed else "pending"
        at = received.strftime(_SQLITE_TIME)
        yield (
            f"2.25.{i}",
            f"2.25.1{i // 300}",
            f"2.25.2{i // 300}",
            f"{received:%Y/%m/%d/%H}/{i:032x}.dcm",
            f"{i:064x}",
            status,
            at,
            at,
            forwarded,
        )


@contextmanager
def _without_indexes_and_triggers(queue: Queue) -> Iterator[Any]:
    """Fill a bare table, then build its indexes once and count it once.

    Inserting ten million rows into a table with nine indexes and counting
    triggers costs an hour on a busy 2-core machine; the same rows, indexed and
    counted afterwards, minutes. The schema is read back from the database and
    restored as it was; the counts are computed as migration 0005 does.
    """
    sqlite = queue.engine.dialect.name == "sqlite"
    raw = queue.engine.raw_connection()
    try:
        cursor = raw.cursor()
        if sqlite:
            cursor.execute(
                "SELECT name, sql, type FROM sqlite_master WHERE tbl_name = 'instances' "
                "AND type IN ('index', 'trigger') AND sql IS NOT NULL"
            )
            schema = cursor.fetchall()
            for name, _sql, kind in schema:
                cursor.execute(f"DROP {kind.upper()} {name}")
        else:
            # Building indexes on millions of rows takes longer than a statement may.
            cursor.execute("SET statement_timeout = 0")
            cursor.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'instances' "
                "AND indexname <> 'instances_pkey'"
            )
            schema = cursor.fetchall()
            for name, _sql in schema:
                cursor.execute(f"DROP INDEX {name}")
            cursor.execute("ALTER TABLE instances DISABLE TRIGGER USER")
        if not sqlite:
            raw.commit()
        yield raw
        if sqlite:
            cursor.execute("BEGIN")
        for row in schema:
            cursor.execute(row[1])
        if not sqlite:
            cursor.execute("ALTER TABLE instances ENABLE TRIGGER USER")
        cursor.execute("DELETE FROM queue_counts")
        cursor.execute("DELETE FROM queue_count_deltas")
        cursor.execute(
            "INSERT INTO queue_counts (destination, status, instances, bytes) "
            "SELECT destination, status, count(*), coalesce(sum(size_bytes), 0) "
            "FROM instances GROUP BY destination, status"
        )
        if sqlite:
            cursor.execute("COMMIT")
            cursor.execute("ANALYZE")
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        else:
            cursor.execute("RESET statement_timeout")
            raw.commit()
    finally:
        raw.close()


def fill_sqlite(queue: Queue, rows: int, pending: int, failed: int) -> None:
    with _without_indexes_and_triggers(queue) as raw:
        cursor = raw.cursor()
        cursor.execute("PRAGMA cache_size=-1000000")  # this connection only
        source = _sqlite_rows(rows, pending, failed)
        while True:
            chunk = [row for _, row in zip(range(_SQLITE_CHUNK), source, strict=False)]
            if not chunk:
                break
            cursor.execute("BEGIN")  # the engine's connections are in autocommit mode
            cursor.executemany(
                f"INSERT INTO instances ({_COLUMNS}) VALUES "
                "(?, '1.2.840.10008.5.1.4.1.1.2', ?, ?, '1.2.840.10008.1.2.1', 'BENCH', "
                "'127.0.0.1:104', '', 'default', ?, 525000, ?, ?, 0, ?, ?, ?)",
                chunk,
            )
            cursor.execute("COMMIT")


def fill_postgres(queue: Queue, rows: int, pending: int, failed: int) -> None:
    done = rows - pending - failed
    chunk = 1_000_000
    with _without_indexes_and_triggers(queue) as raw:
        cursor = raw.cursor()
        for start in range(0, rows, chunk):
            cursor.execute(
                f"INSERT INTO instances ({_COLUMNS}) SELECT "
                "'2.25.' || i, '1.2.840.10008.5.1.4.1.1.2', '2.25.1' || (i / 300), "
                "'2.25.2' || (i / 300), '1.2.840.10008.1.2.1', 'BENCH', "
                "'127.0.0.1:104', '', 'default', "
                "to_char(t, 'YYYY/MM/DD/HH24/') || lpad(to_hex(i), 32, '0') || '.dcm', "
                "525000, lpad(to_hex(i), 64, '0'), "
                "CASE WHEN i < %(done)s THEN 'done' WHEN i < %(done)s + %(failed)s "
                "THEN 'failed' ELSE 'pending' END, 0, t, t, "
                "CASE WHEN i < %(done)s THEN t + interval '1 second' END "
                "FROM (SELECT i, CASE WHEN i < %(done)s THEN "
                "(now() at time zone 'utc') - interval '365 days' "
                "+ i * (interval '365 days' / greatest(%(done)s, 1)) "
                "ELSE (now() at time zone 'utc') - interval '30 minutes' "
                "+ (i - %(done)s) * interval '1 microsecond' END AS t "
                "FROM generate_series(%(start)s::bigint, %(stop)s::bigint - 1) AS i) AS g",
                {"done": done, "failed": failed, "start": start, "stop": min(rows, start + chunk)},
            )
            raw.commit()
    # A table a year old has been vacuumed (autovacuum): visibility map and statistics.
    with queue.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("SET statement_timeout = 0"))
        conn.execute(text("VACUUM ANALYZE instances"))
        conn.execute(text("RESET statement_timeout"))


# -- measuring -----------------------------------------------------------------


def _new(n: int) -> NewInstance:
    uid = f"2.25.{uuid.uuid4().int}"
    return NewInstance(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=f"2.25.{uuid.uuid4().int}",
        series_instance_uid=f"2.25.{uuid.uuid4().int}",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_aet="BENCH",
        peer_address="127.0.0.1:104",
        spool_path=f"{utcnow():%Y/%m/%d/%H}/{uuid.uuid4().hex}.dcm",
        size_bytes=525000,
        sha256="0" * 64,
    )


def _operations(queue: Queue) -> dict[str, Callable[[int], object]]:
    metrics = Metrics(process_collectors=False)
    metrics.watch_queue(queue, ("default", "archive"), max_age=0)
    lease = timedelta(minutes=5)
    return {
        "claim": lambda i: queue.claim_batch(f"bench-{i}", CLAIM_LIMIT, lease),
        "enqueue": lambda i: queue.enqueue(_new(i)),
        "queue stats": lambda _i: queue_summary(queue),
        "queue ls --status failed": lambda _i: queue.rows(status=Status.FAILED, limit=100),
        "/metrics scrape": lambda _i: generate_latest(metrics.registry),
    }


def _time_alternately(result: YearResult, empty: Queue, year: Queue, samples: int) -> None:
    ops = {"empty": _operations(empty), "year": _operations(year)}
    for name in ops["year"]:
        result.empty_ms[name], result.year_ms[name] = [], []
        for side in ("empty", "year"):  # warm the pools and statement caches
            ops[side][name](-1)
        for i in range(samples):
            for side, into in (("empty", result.empty_ms), ("year", result.year_ms)):
                t = time.perf_counter()
                ops[side][name](i)
                into[name].append((time.perf_counter() - t) * 1000)


def _retention(result: YearResult, year: Queue, spool: Spool, timeout: float) -> None:
    upkeep = QueueUpkeep(year, spool, retain_done=RETAIN)
    done = threading.Event()

    def run() -> None:
        t = time.perf_counter()
        report = upkeep.run_pass()
        result.retention_seconds = time.perf_counter() - t
        result.retention_deleted = report.deleted
        result.retention_finished = not report.interrupted
        done.set()

    thread = threading.Thread(target=run)
    stopper = threading.Timer(timeout, upkeep._stop.set)
    thread.start()
    stopper.start()
    lease = timedelta(minutes=5)
    i = 0
    while not done.wait(0.02):
        t = time.perf_counter()
        year.claim_batch(f"during-{i}", CLAIM_LIMIT, lease)
        result.claims_during_retention_ms.append((time.perf_counter() - t) * 1000)
        i += 1
    stopper.cancel()
    thread.join()


@contextmanager
def _queue(url: str) -> Iterator[Queue]:
    # No statement timeout: building indexes on millions of rows takes longer.
    engine = make_engine(url, PostgresTimeouts(statement=0))
    queue = Queue(engine)
    try:
        upgrade_to_head(engine)
        yield queue
    finally:
        queue.close()
        engine.dispose()


def measure(
    name: str,
    empty_url: str,
    year_url: str,
    rows: int,
    fill: Callable[[Queue, int, int, int], None],
    spool: Spool,
    timeout: float,
    log: Callable[[str], None],
) -> YearResult:
    result = YearResult(name, rows)
    pending = max(EMPTY_PENDING, rows // 100)
    with _queue(empty_url) as empty, _queue(year_url) as year:
        fill(empty, EMPTY_PENDING, EMPTY_PENDING, 0)
        log(f"year, {name}: filling {rows:,} rows")
        t = time.perf_counter()
        fill(year, rows, pending, min(FAILED_ROWS, rows // 100))
        result.fill_seconds = time.perf_counter() - t
        log(f"year, {name}: filled in {result.fill_seconds:.0f} s; timing the operations")
        _time_alternately(result, empty, year, SAMPLES)
        log(f"year, {name}: retention pass (at most {timeout:.0f} s)")
        _retention(result, year, spool, timeout)
    return result


def sqlite_year(workdir: Path, rows: int, timeout: float, log: Callable[[str], None]) -> YearResult:
    paths = [workdir / "year-empty.db", workdir / "year-full.db"]
    spool = Spool(workdir / "year-spool")
    spool.prepare()
    try:
        return measure(
            "SQLite",
            f"sqlite:///{paths[0]}",
            f"sqlite:///{paths[1]}",
            rows,
            fill_sqlite,
            spool,
            timeout,
            log,
        )
    finally:
        for path in paths:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)


def postgres_year(
    workdir: Path, url: str, rows: int, timeout: float, log: Callable[[str], None]
) -> YearResult:
    spool = Spool(workdir / "year-spool")
    spool.prepare()
    with _postgres_database(url) as empty_url, _postgres_database(url) as year_url:
        return measure("Postgres", empty_url, year_url, rows, fill_postgres, spool, timeout, log)


def run_year(
    workdir: Path, pg_url: str, rows: int, timeout: float, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    out = []
    for run in (
        lambda: sqlite_year(workdir, rows, timeout, log),
        lambda: postgres_year(workdir, pg_url, rows, timeout, log),
    ):
        out.append(run().to_json())
        log(year_table(out[-1:]))  # as soon as each database is done
    return out


# -- reporting -----------------------------------------------------------------


def year_table(years: list[dict[str, Any]]) -> str:
    lines = [
        "| database | rows | operation | empty queue, median ms (min-max) "
        "| year queue, median ms (min-max) | p95 ms | ratio |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for y in years:
        for op, m in y["operations"].items():
            e, f = m["empty_ms"], m["year_ms"]
            lines.append(
                f"| {y['database']} | {y['rows']:,} | {op} "
                f"| {e['median']:.2f} ({e['min']:.2f}-{e['max']:.2f}) "
                f"| {f['median']:.2f} ({f['min']:.2f}-{f['max']:.2f}) | {f['p95']:.2f} "
                f"| {f['median'] / e['median']:.2f}x |"
            )
        during = y["claims_during_retention_ms"]
        lines.append(
            f"| {y['database']} | {y['rows']:,} | retention pass "
            f"| - | {y['retention_deleted']:,} rows in {y['retention_seconds']:.1f} s "
            f"({y['retention_rows_per_second']:,.0f} rows/s"
            f"{'' if y['retention_finished'] else ', stopped at the time limit'}) | - | - |"
        )
        if during:
            claim = y["operations"]["claim"]["empty_ms"]["median"]
            lines.append(
                f"| {y['database']} | {y['rows']:,} | claim during retention "
                f"| {claim:.2f} | {during['median']:.2f} ({during['min']:.2f}-"
                f"{during['max']:.2f}) | {during['p95']:.2f} "
                f"| {during['median'] / claim:.2f}x |"
            )
    return "\n".join(lines)


def year_targets(years: list[dict[str, Any]]) -> list[Target]:
    out: list[Target] = []
    for y in years:
        where = f"{y['database']}, {y['rows']:,} rows"
        ops = y["operations"]
        for op in ("claim", "enqueue"):
            e, f = ops[op]["empty_ms"], ops[op]["year_ms"]
            ratio = f["median"] / e["median"]
            out.append(
                Target(
                    f"{op} latency, {where}, vs empty queue",
                    ratio,
                    "<= 1.2x",
                    ratio <= 1.2,
                    f"median {f['median']:.2f} vs {e['median']:.2f} ms",
                )
            )
        for op in ("queue stats", "/metrics scrape"):
            f = ops[op]["year_ms"]
            out.append(
                Target(
                    f"{op}, {where}",
                    f["median"],
                    "< 50 ms",
                    f["max"] < 50,
                    f"median ms; max {f['max']:.1f}",
                )
            )
        rate = y["retention_rows_per_second"]
        out.append(
            Target(f"retention, {where}", rate, ">= 50,000 rows/s", rate >= 50_000, "rows/s")
        )
        during = y["claims_during_retention_ms"]
        if during:
            ratio = during["median"] / ops["claim"]["empty_ms"]["median"]
            out.append(
                Target(
                    f"claim latency during retention, {where}, vs empty queue",
                    ratio,
                    "<= 2x",
                    ratio <= 2,
                    f"median {during['median']:.2f} ms, p95 {during['p95']:.2f}",
                )
            )
    return out
