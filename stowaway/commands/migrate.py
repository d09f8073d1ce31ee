"""``stowaway migrate``: bring the queue database schema to the latest revision."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from stowaway.commands import add_command
from stowaway.settings import COMMON, Settings, add_options

log = logging.getLogger("stowaway")


def register(sub: Any) -> None:
    """``stowaway migrate``."""
    parser = add_command(
        sub, "migrate", migrate, "bring the queue database schema to the latest revision"
    )
    add_options(parser, {COMMON})


def migrate(settings: Settings, _args: argparse.Namespace) -> int:
    # Imported here: alembic is only needed by this command (and SQLite's start-up).
    from stowaway.db.engine import make_engine
    from stowaway.db.migrate import current_revision, upgrade_to_head

    # A migration may rewrite a large table: no statement timeout.
    timeouts = dataclasses.replace(settings.postgres_timeouts, statement=0)
    engine = make_engine(settings.db_url, timeouts)
    try:
        upgrade_to_head(engine)
        log.info("migrated", extra={"revision": current_revision(engine)})
    finally:
        engine.dispose()
    return 0
