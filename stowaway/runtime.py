"""Opening the durable state the way every subcommand needs it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from stowaway.db.engine import is_sqlite, make_engine
from stowaway.db.migrate import current_revision, head_revision, upgrade_to_head
from stowaway.db.queue import Queue
from stowaway.db.spool import Spool
from stowaway.settings import Settings
from stowaway.text import first_line

log = logging.getLogger("stowaway")


class StartupError(RuntimeError):
    """Something the operator must fix before stowaway can run; one line."""


@dataclass
class State:
    engine: Engine
    queue: Queue
    spool: Spool

    def close(self) -> None:
        self.queue.close()
        self.engine.dispose()


def open_state(
    settings: Settings, *, migrate_embedded: bool = True, writable_spool: bool = True
) -> State:
    """Connect to the queue database and the spool, checking both.

    The embedded SQLite default migrates itself; a shared Postgres queue must
    be migrated explicitly (``stowaway migrate``, the init container), so two
    pods never race to change its schema. Read-only commands pass
    ``writable_spool=False`` so an operator can inspect a gateway whose disk failed.
    """
    spool = Spool(settings.spool_dir)
    try:
        if writable_spool:
            spool.prepare()
    except OSError as exc:
        raise StartupError(
            f"spool directory {settings.spool_dir} is not writable: {exc.strerror} "
            "(check --spool-dir / --data-dir and the volume's permissions)"
        ) from None
    try:
        engine = make_engine(settings.db_url, settings.postgres_timeouts)
        if is_sqlite(engine) and migrate_embedded:
            upgrade_to_head(engine)
        revision = current_revision(engine)
    except SQLAlchemyError as exc:
        raise StartupError(
            f"queue database unreachable ({type(exc).__name__}): {first_line(exc)} (check --db-url)"
        ) from None
    head = head_revision()
    if revision != head:
        engine.dispose()
        raise StartupError(
            f"queue database is at schema revision {revision or 'none'}, this stowaway "
            f"needs {head}: run `stowaway migrate`"
        )
    return State(engine, Queue(engine), spool)
