"""Real queue databases for tests: a SQLite file, or a fresh Postgres database.

Postgres databases are cloned from a template migrated once per test worker,
so every test starts from an empty, migrated schema in milliseconds.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from stowaway.db.engine import make_engine
from stowaway.db.migrate import upgrade_to_head

PG_URL = os.environ.get("STOWAWAY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _admin_conninfo() -> str:
    url = make_url(PG_URL)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _pg_url(database: str) -> str:
    return make_url(PG_URL).set(database=database).render_as_string(hide_password=False)


_templates: set[str] = set()


def _template_name() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"stowaway_tmpl_{worker}_{os.getpid()}"


def _ensure_template() -> str:
    name = _template_name()
    if name in _templates:
        return name
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(_pg_url(name))
    upgrade_to_head(engine)
    engine.dispose()
    _templates.add(name)
    return name


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh migrated Postgres database; yields its SQLAlchemy URL."""
    template = _ensure_template()
    name = f"stowaway_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield _pg_url(name)
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_templates() -> None:
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        for name in _templates:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _templates.clear()


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'queue.db'}"
