"""Engine construction with the settings each database needs to be a safe queue."""

from __future__ import annotations

import contextlib
import os
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

#: The execution option that says how a transaction on an engine begins and commits.
TX_MODE = "stowaway_tx"


class TxMode(StrEnum):
    """How much a transaction needs from the database (see :func:`with_tx_mode`)."""

    #: Writes whose commit must be on disk before anyone acts on it (the default).
    DURABLE = "durable"
    #: Writes that a power loss may undo, because undoing them is safe: a claim,
    #: a lease extension, a row given back. The commit does not wait for the disk.
    LAZY = "lazy"
    #: Reads only. On SQLite they no longer take the write lock.
    READ = "read"


def with_tx_mode(engine: Engine, mode: TxMode) -> Engine:
    """``engine`` (same pool) whose transactions begin and commit as ``mode`` says."""
    return engine.execution_options(**{TX_MODE: mode.value})


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str) -> Engine:
    """Return an engine for ``url``.

    SQLite gets WAL (readers never block the writer), ``synchronous=FULL`` (a
    committed row survives power loss), a long busy timeout, and ``BEGIN
    IMMEDIATE`` so that concurrent writers queue up instead of failing with
    "database is locked" when a read transaction tries to upgrade.
    """
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _create_private(Path(parsed.database))
        engine = create_engine(
            url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=8
        )
        _configure_sqlite(engine)
        return engine
    engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
    _configure_postgres(engine)
    return engine


def make_claim_engine(engine: Engine) -> Engine | None:
    """Postgres: a small second pool for the forwarder's claims, or None on SQLite.

    A claim is one statement (:func:`db.statements.claim_statement_single`). On
    these connections it runs in autocommit, so no BEGIN and COMMIT round trips,
    with ``synchronous_commit=off`` set once per connection, so no ``SET LOCAL``
    round trip, and without the pool's ping, so no ``SELECT 1`` either: a dead
    connection fails the claim, the pool drops it, and the forwarder's next
    cycle connects again. A power loss can only undo a claim (see TxMode.LAZY).
    """
    if is_sqlite(engine):
        return None
    return create_engine(
        engine.url,
        isolation_level="AUTOCOMMIT",
        connect_args={"options": "-c synchronous_commit=off"},
        pool_size=4,
        max_overflow=8,
    )


def _create_private(database: Path) -> None:
    """Create a new SQLite file owner-only (0600) before SQLite opens it.

    SQLite gives its -wal and -shm files the database file's permissions, so the
    queue (UIDs, spool paths) is never readable by other local users.
    """
    database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN instead of pysqlite.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        record.info["synchronous"] = "FULL"
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(TX_MODE, TxMode.DURABLE)
        # In WAL mode, NORMAL commits without an fsync; the next FULL commit's
        # fsync of the WAL covers it. It can only be changed between transactions.
        synchronous = "NORMAL" if mode == TxMode.LAZY else "FULL"
        info = conn.connection.info
        if info.get("synchronous") != synchronous:
            conn.exec_driver_sql(f"PRAGMA synchronous={synchronous}")
            info["synchronous"] = synchronous
        # Writers take the lock up front (no failed upgrade from read to write);
        # readers never need it in WAL mode.
        conn.exec_driver_sql("BEGIN" if mode == TxMode.READ else "BEGIN IMMEDIATE")


def _configure_postgres(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(TX_MODE) == TxMode.LAZY:
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
