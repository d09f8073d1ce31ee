"""counts per destination and status kept by triggers; indexes for done rows and the
oldest pending row

``queue stats`` and every ``/metrics`` scrape counted the whole table, so they grew
slower with every done row kept. From here the triggers on ``instances`` keep
``queue_counts`` exact in the transaction of every change, whatever statement makes
it. SQLite updates the counter rows directly (one writer at a time anyway);
Postgres appends to ``queue_count_deltas``, so that concurrent receivers and
forwarders never queue on one counter row, and the service folds the deltas in.

The counts start from one full count of the table, in the migration's transaction:
on Postgres ``CREATE TRIGGER`` locks out writers until it commits, so no change
falls between the count and the triggers.

SQLite drops a table's triggers with the table: a later migration that rebuilds
``instances`` (``batch_alter_table``) must call :func:`create_triggers` again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SQLITE_ADD = """
    INSERT INTO queue_counts (destination, status, instances, bytes)
    VALUES (NEW.destination, NEW.status, 1, NEW.size_bytes)
    ON CONFLICT (destination, status) DO UPDATE
    SET instances = instances + 1, bytes = bytes + excluded.bytes;
"""
_SQLITE_REMOVE = """
    INSERT INTO queue_counts (destination, status, instances, bytes)
    VALUES (OLD.destination, OLD.status, -1, -OLD.size_bytes)
    ON CONFLICT (destination, status) DO UPDATE
    SET instances = instances - 1, bytes = bytes + excluded.bytes;
"""

SQLITE_TRIGGERS = (
    f"CREATE TRIGGER instances_count_insert AFTER INSERT ON instances BEGIN {_SQLITE_ADD} END",
    f"CREATE TRIGGER instances_count_delete AFTER DELETE ON instances BEGIN {_SQLITE_REMOVE} END",
    "CREATE TRIGGER instances_count_update AFTER UPDATE OF status, destination, size_bytes "
    "ON instances WHEN OLD.status IS NOT NEW.status OR OLD.destination IS NOT NEW.destination "
    f"OR OLD.size_bytes IS NOT NEW.size_bytes BEGIN {_SQLITE_REMOVE} {_SQLITE_ADD} END",
)

#: One statement-level trigger function for all three operations: a statement that
#: changes a thousand rows appends a delta row or two, not a thousand.
POSTGRES_FUNCTION = """
CREATE FUNCTION stowaway_count_instances() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO queue_count_deltas (destination, status, instances, bytes)
        SELECT destination, status, count(*), sum(size_bytes)
        FROM new_rows GROUP BY destination, status;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO queue_count_deltas (destination, status, instances, bytes)
        SELECT destination, status, -count(*), -sum(size_bytes)
        FROM old_rows GROUP BY destination, status;
    ELSE
        INSERT INTO queue_count_deltas (destination, status, instances, bytes)
        SELECT destination, status, sum(n), sum(b) FROM (
            SELECT destination, status, 1 AS n, size_bytes AS b FROM new_rows
            UNION ALL
            SELECT destination, status, -1, -size_bytes FROM old_rows
        ) AS changes
        GROUP BY destination, status
        HAVING sum(n) <> 0 OR sum(b) <> 0;
    END IF;
    RETURN NULL;
END
$$
"""

POSTGRES_TRIGGERS = (
    "CREATE TRIGGER instances_count_insert AFTER INSERT ON instances "
    "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
    "EXECUTE FUNCTION stowaway_count_instances()",
    "CREATE TRIGGER instances_count_update AFTER UPDATE ON instances "
    "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT "
    "EXECUTE FUNCTION stowaway_count_instances()",
    "CREATE TRIGGER instances_count_delete AFTER DELETE ON instances "
    "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT "
    "EXECUTE FUNCTION stowaway_count_instances()",
)

TRIGGER_NAMES = ("instances_count_insert", "instances_count_update", "instances_count_delete")


def create_triggers() -> None:
    """The counting triggers on ``instances`` (again, after a rebuild of the table)."""
    if op.get_bind().dialect.name == "sqlite":
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)
        return
    op.execute(POSTGRES_FUNCTION)
    for statement in POSTGRES_TRIGGERS:
        op.execute(statement)


def drop_triggers() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for name in TRIGGER_NAMES:
        op.execute(f"DROP TRIGGER IF EXISTS {name}" + ("" if sqlite else " ON instances"))
    if not sqlite:
        op.execute("DROP FUNCTION IF EXISTS stowaway_count_instances()")


def upgrade() -> None:
    op.create_table(
        "queue_counts",
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("instances", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("destination", "status"),
    )
    op.create_table(
        "queue_count_deltas",
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("instances", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
    )
    op.create_index(
        "ix_instances_done",
        "instances",
        ["forwarded_at", "node_id", "id"],
        sqlite_where=sa.text("status = 'done'"),
        postgresql_where=sa.text("status = 'done'"),
    )
    op.create_index(
        "ix_instances_pending_age",
        "instances",
        ["destination", "received_at"],
        sqlite_where=sa.text("status = 'pending'"),
        postgresql_where=sa.text("status = 'pending'"),
    )
    create_triggers()
    op.execute(
        "INSERT INTO queue_counts (destination, status, instances, bytes) "
        "SELECT destination, status, count(*), coalesce(sum(size_bytes), 0) "
        "FROM instances GROUP BY destination, status"
    )


def downgrade() -> None:
    drop_triggers()
    op.drop_index("ix_instances_pending_age", table_name="instances")
    op.drop_index("ix_instances_done", table_name="instances")
    op.drop_table("queue_count_deltas")
    op.drop_table("queue_counts")
