"""Engine construction with the settings each database needs to be a safe queue."""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import psycopg
from psycopg.errors import _WaitTimeout
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


#: The one server encoding the queue is kept in (``server_encoding`` as Postgres reports it).
SERVER_ENCODING = "UTF8"


class DatabaseEncodingError(RuntimeError):
    """The Postgres database is not UTF8: ``detail`` says so, ``fix`` how to make one that is."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(f"{detail}: {fix}")
        self.detail = detail
        self.fix = fix


#: How long past ``statement_timeout`` the client waits for any answer before it
#: gives the connection up: the server reports its own timeout first.
ANSWER_MARGIN = 2.0


@dataclass(frozen=True)
class PostgresTimeouts:
    """How long a Postgres connection may keep a caller waiting (seconds).

    Without them a half-open connection (a database host that vanished, a
    network that drops packets) holds the receiver's group-commit lock while
    TCP retransmits for about 15 minutes, and every C-STORE waits with it.

    ``connect`` bounds opening a connection (libpq ``connect_timeout``, the
    whole start-up included). ``statement`` is the server's
    ``statement_timeout`` (0: none, for migrations); the client also stops
    waiting for an answer ``ANSWER_MARGIN`` seconds after it, closing the
    connection, since a server that cannot be reached cannot report its
    timeout. The keepalives find a dead peer under an idle pooled connection,
    and ``tcp_user_timeout`` (their interval times their count) one that stops
    acknowledging data sent to it.
    """

    connect: float = 10.0
    statement: float = 30.0
    keepalives_idle: float = 30.0
    keepalives_interval: float = 10.0
    keepalives_count: int = 3

    @property
    def answer_deadline(self) -> float | None:
        """Seconds the client waits for any one answer, or None (no statement timeout)."""
        return self.statement + ANSWER_MARGIN if self.statement > 0 else None

    def connect_args(self, options: str = "") -> dict[str, Any]:
        """libpq connection parameters; ``options`` are further ``-c name=value`` settings."""
        statement_ms = round(self.statement * 1000)
        return {
            # libpq takes whole seconds, and treats 1 as 2.
            "connect_timeout": max(2, math.ceil(self.connect)),
            "keepalives": 1,
            "keepalives_idle": max(1, math.ceil(self.keepalives_idle)),
            "keepalives_interval": max(1, math.ceil(self.keepalives_interval)),
            "keepalives_count": self.keepalives_count,
            "tcp_user_timeout": round(self.keepalives_interval * self.keepalives_count * 1000),
            "options": f"-c statement_timeout={statement_ms} {options}".strip(),
        }


class _AnswerDeadlineConnection(psycopg.Connection[Any]):
    """A psycopg connection that stops waiting for the server after a deadline.

    libpq has no read timeout: a query sent on a connection whose peer went
    silent waits as long as the kernel keeps the connection, and a local
    proxy or NAT that still acknowledges the bytes keeps it for ever. Every
    blocking wait (a statement, a COMMIT) is bounded instead; on expiry the
    connection is closed, so SQLAlchemy's pool discards it, and the caller
    gets an ``OperationalError``.
    """

    answer_deadline: float | None = None

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        deadline = timeout if timeout is not None else self.answer_deadline
        try:
            return super().wait(gen, interval, deadline)
        except _WaitTimeout:
            self.pgconn.finish()
            raise psycopg.OperationalError(
                f"no answer from the database within {deadline:g} s; connection closed"
            ) from None


#: The timeouts each Postgres engine was made with, for its claim engine.
_TIMEOUTS: weakref.WeakKeyDictionary[Engine, PostgresTimeouts] = weakref.WeakKeyDictionary()


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


def make_engine(url: str, timeouts: PostgresTimeouts | None = None) -> Engine:
    """Return an engine for ``url``.

    SQLite gets WAL (readers never block the writer), ``synchronous=FULL`` (a
    committed row survives power loss), a long busy timeout, and ``BEGIN
    IMMEDIATE`` so that concurrent writers queue up instead of failing with
    "database is locked" when a read transaction tries to upgrade.

    Postgres connections get ``timeouts`` (default :class:`PostgresTimeouts`);
    a parameter given in the URL's query (``?connect_timeout=2``) wins.
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
    timeouts = timeouts or PostgresTimeouts()
    engine = create_engine(
        url,
        connect_args=_unless_in_url(parsed.query, timeouts.connect_args()),
        pool_pre_ping=True,
        pool_size=8,
        max_overflow=8,
    )
    _configure_postgres(engine, timeouts)
    _TIMEOUTS[engine] = timeouts
    return engine


def make_claim_engine(engine: Engine) -> Engine | None:
    """Postgres: a small second pool for the forwarder's claims, or None on SQLite.

    A claim is one statement (:func:`db.statements.claim_statement_single`). On
    these connections it runs in autocommit, so no BEGIN and COMMIT round trips,
    with ``synchronous_commit=off`` set once per connection, so no ``SET LOCAL``
    round trip, and without the pool's ping, so no ``SELECT 1`` either: a dead
    connection fails the claim, the pool drops it, and the forwarder's next
    cycle connects again. A power loss can only undo a claim (see TxMode.LAZY).
    The connections have the main engine's timeouts.
    """
    if is_sqlite(engine):
        return None
    timeouts = _TIMEOUTS.get(engine, PostgresTimeouts())
    claim_engine = create_engine(
        engine.url,
        isolation_level="AUTOCOMMIT",
        connect_args=_unless_in_url(
            engine.url.query, timeouts.connect_args("-c synchronous_commit=off")
        ),
        pool_size=4,
        max_overflow=8,
    )
    _bound_answers(claim_engine, timeouts)
    return claim_engine


def _unless_in_url(query: Any, connect_args: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in connect_args.items() if key not in query}


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


def _bound_answers(engine: Engine, timeouts: PostgresTimeouts) -> None:
    """Open ``engine``'s connections as :class:`_AnswerDeadlineConnection`."""

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
        conn = _AnswerDeadlineConnection.connect(*cargs, **cparams)
        try:
            _require_utf8(conn)
        except DatabaseEncodingError:
            conn.close()
            raise
        conn.answer_deadline = timeouts.answer_deadline
        return conn


def _require_utf8(conn: psycopg.Connection[Any]) -> None:
    """Refuse a database whose encoding is not UTF8.

    On SQL_ASCII, psycopg hands every text value back as bytes (the server has no
    encoding to decode them with), so nothing works: SQLAlchemy's first query fails
    with a TypeError. Forcing ``client_encoding=UTF8`` would only hide it: the server
    then stores whatever bytes any client sends, unchecked, and a row another client
    wrote in Latin-1 stops the forwarder that reads it. The encoding is fixed when the
    database is created, so the operator is told how to create one that fits.
    """
    raw = conn.pgconn.parameter_status(b"server_encoding")
    encoding = raw.decode("ascii", "replace") if raw else "unknown"
    if encoding.upper() == SERVER_ENCODING:
        return
    name = conn.info.dbname
    raise DatabaseEncodingError(
        f"the database {name} has encoding {encoding}, stowaway needs UTF8",
        f"create it with CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0 "
        "(Cloud SQL's default), then run stowaway migrate",
    )


def _configure_postgres(engine: Engine, timeouts: PostgresTimeouts) -> None:
    _bound_answers(engine, timeouts)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(TX_MODE) == TxMode.LAZY:
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
