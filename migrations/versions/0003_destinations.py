"""a row per delivery: instances.destination and .called_aet, the unrouted status,
destinations by name

Every existing row is kept and goes to the destination named ``default``, which is what
``--dicomweb-url`` alone is called. The destinations table is rebuilt keyed by name: its
rows only remember whether a destination was blocked, which the forwarder finds out again
at its next attempt.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = ("pending", "in_flight", "done", "failed")
NEW_STATUSES = (*OLD_STATUSES, "unrouted")


def _status(values: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(
        *values, name="instance_status", native_enum=False, create_constraint=True, length=16
    )


def _statuses(old: tuple[str, ...], new: tuple[str, ...]) -> None:
    """The CHECK constraint of the status column, from ``old``'s list to ``new``'s."""
    if op.get_bind().dialect.name == "sqlite":
        # SQLite cannot alter a constraint: batch mode copies the table with the new one.
        with op.batch_alter_table("instances") as batch:
            batch.alter_column("status", existing_type=_status(old), type_=_status(new))
        return
    listed = ", ".join(f"'{value}'" for value in new)
    op.drop_constraint("instance_status", "instances", type_="check")
    op.create_check_constraint("instance_status", "instances", f"status IN ({listed})")


def _indexes(with_destination: bool) -> None:
    extra = ["destination"] if with_destination else []
    op.create_index(
        "ix_instances_due", "instances", ["status", "node_id", *extra, "next_attempt_at", "id"]
    )
    op.create_index(
        "ix_instances_lease", "instances", ["status", "node_id", *extra, "lease_expires_at", "id"]
    )
    op.create_index(
        "uq_instances_pending_sop",
        "instances",
        ["sop_instance_uid", *extra],
        unique=True,
        sqlite_where=sa.text("status = 'pending'"),
        postgresql_where=sa.text("status = 'pending'"),
    )


def _drop_indexes() -> None:
    for name in ("ix_instances_due", "ix_instances_lease", "uq_instances_pending_sop"):
        op.drop_index(name, table_name="instances")


def _destinations_table(key: str) -> None:
    columns = [sa.Column(key, sa.String(length=64 if key == "name" else 1024), nullable=False)]
    if key == "name":
        columns.append(sa.Column("url", sa.String(length=1024), server_default="", nullable=False))
    op.create_table(
        "destinations",
        *columns,
        sa.Column(
            "state",
            sa.Enum(
                "ok",
                "blocked",
                name="destination_state",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("since", sa.DateTime(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("next_probe_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint(key),
    )


def upgrade() -> None:
    _drop_indexes()
    with op.batch_alter_table("instances") as batch:
        batch.add_column(
            sa.Column("destination", sa.String(length=64), server_default="default", nullable=False)
        )
        batch.add_column(
            sa.Column("called_aet", sa.String(length=16), server_default="", nullable=False)
        )
    _statuses(OLD_STATUSES, NEW_STATUSES)
    _indexes(with_destination=True)
    op.create_index("ix_instances_spool_path", "instances", ["spool_path"])
    op.drop_table("destinations")
    _destinations_table("name")


def downgrade() -> None:
    routed_elsewhere = op.get_bind().execute(
        sa.text("SELECT count(*) FROM instances WHERE destination <> 'default' OR status = 'unrouted'")
    ).scalar_one()
    if routed_elsewhere:
        # The old schema has one destination: these rows would be lost or collide.
        raise RuntimeError(
            f"{routed_elsewhere} rows are unrouted or for a destination other than 'default': "
            "purge them (stowaway queue purge) before downgrading"
        )
    op.drop_index("ix_instances_spool_path", table_name="instances")
    _drop_indexes()
    _statuses(NEW_STATUSES, OLD_STATUSES)
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("called_aet")
        batch.drop_column("destination")
    _indexes(with_destination=False)
    op.drop_table("destinations")
    _destinations_table("url")
