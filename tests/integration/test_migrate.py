"""`stowaway migrate`, and what happens when a shared database was not migrated."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from tests.support.databases import PG_URL, _admin_conninfo, postgres_database
from tests.support.processes import run_cli


def test_migrate_then_use_an_empty_postgres(tmp_path: Path) -> None:
    name = f"stowaway_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        common = ("--data-dir", str(tmp_path), "--db-url", url)
        refused = run_cli("queue", "stats", *common, check=False)
        assert refused.returncode == 1
        assert refused.stderr.strip().endswith("run `stowaway migrate`")
        assert len(refused.stderr.strip().splitlines()) == 1
        run_cli("migrate", *common)
        run_cli("migrate", *common)  # idempotent
        stats = json.loads(run_cli("queue", "stats", "--json", *common).stdout)
        assert stats["pending"] == 0
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_sqlite_default_migrates_itself(tmp_path: Path) -> None:
    stats = json.loads(run_cli("queue", "stats", "--json", "--data-dir", str(tmp_path)).stdout)
    assert stats == {**stats, "pending": 0, "failed": 0}
    assert (tmp_path / "queue.db").is_file()


def test_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    with postgres_database() as url:
        bad = url.replace("127.0.0.1:5432", "127.0.0.1:1")
    result = run_cli("queue", "ls", "--data-dir", str(tmp_path), "--db-url", bad, check=False)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("stowaway: queue database unreachable") and "--db-url" in line
