"""A Postgres database that is not UTF8 is refused in one line, by migrate, start-up and check.

On SQL_ASCII psycopg returns text as bytes, so without the refusal the first query
fails with a TypeError naming nothing the operator can act on.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from stowaway.db.engine import DatabaseEncodingError, make_engine
from stowaway.db.queue import NewInstance, Queue
from tests.support.databases import _admin_conninfo, _pg_url, postgres_database
from tests.support.processes import run_cli

pytestmark = [pytest.mark.timeout(120), pytest.mark.postgres]

HTTP_ERROR = "HTTP 403: Accès refusé à l'entrepôt DICOM — 拒否"


@pytest.fixture
def sql_ascii_database() -> Iterator[tuple[str, str]]:
    """(name, SQLAlchemy URL) of a fresh, empty SQL_ASCII database, dropped afterwards."""
    name = f"stowaway_ascii_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(
            f"CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    try:
        yield name, _pg_url(name)
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_psycopg_returns_bytes_on_sql_ascii(sql_ascii_database: tuple[str, str]) -> None:
    """Why stowaway cannot work on SQL_ASCII at all (not only for non-ASCII text)."""
    name, _ = sql_ascii_database
    with psycopg.connect(_admin_conninfo(), dbname=name) as conn:
        assert conn.execute("SELECT 'IMPORTADAPTER'").fetchone() == (b"IMPORTADAPTER",)


def test_connecting_to_sql_ascii_is_refused_naming_the_fix(
    sql_ascii_database: tuple[str, str],
) -> None:
    name, url = sql_ascii_database
    engine = make_engine(url)
    try:
        with pytest.raises(DatabaseEncodingError) as caught:
            engine.connect()
    finally:
        engine.dispose()
    assert caught.value.detail == f"the database {name} has encoding SQL_ASCII, stowaway needs UTF8"
    assert f"CREATE DATABASE {name} ENCODING 'UTF8'" in caught.value.fix


def test_migrate_and_check_say_so_in_one_line(
    sql_ascii_database: tuple[str, str], tmp_path: Path
) -> None:
    name, url = sql_ascii_database
    env = {"STOWAWAY_DB_URL": url, "STOWAWAY_DATA_DIR": str(tmp_path)}
    for command in (["migrate"], ["forward", "--dicomweb-url", "http://127.0.0.1:9/dicomweb"]):
        result = run_cli(*command, check=False, env=env)
        assert result.returncode == 1, command
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith(f"stowaway: the database {name} has encoding SQL_ASCII"), lines
        assert "ENCODING 'UTF8'" in lines[-1]
        assert "Traceback" not in result.stderr and "TypeError" not in result.stderr
    check = run_cli("check", "--dicomweb-url", "http://127.0.0.1:9/dicomweb", check=False, env=env)
    assert check.returncode != 0
    (database,) = [line for line in check.stdout.splitlines() if " database:" in line]
    assert database.startswith("FAIL database:") and "SQL_ASCII" in database, database
    assert "ENCODING 'UTF8'" in database


def test_a_non_ascii_error_round_trips_on_utf8() -> None:
    """What the refusal protects: a destination's error text, stored and read back as is."""
    with postgres_database() as url:
        engine = make_engine(url)
        queue = Queue(engine)
        try:
            queue.enqueue(
                NewInstance(
                    sop_instance_uid="1.2.3.4",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                    study_instance_uid="1.2.3",
                    series_instance_uid="1.2.3.1",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    calling_aet="MODALITY",
                    peer_address="127.0.0.1",
                    spool_path="ab/1.2.3.4.dcm",
                    size_bytes=10,
                    sha256="0" * 64,
                )
            )
            (row,) = queue.claim_batch("w", 10, timedelta(minutes=5))
            queue.fail(row.id, "w", HTTP_ERROR)
            stored = queue.get(row.id)
            assert stored is not None and stored.last_error == HTTP_ERROR
        finally:
            queue.close()
            engine.dispose()
