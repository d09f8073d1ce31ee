"""storage commitment: the commitments and commitment_items tables

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _state(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "commitments",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_aet", sa.String(length=16), nullable=False),
        sa.Column("called_aet", sa.String(length=16), nullable=False),
        sa.Column("peer_address", sa.String(length=64), nullable=False),
        sa.Column("received_by", sa.String(length=128), nullable=False),
        sa.Column(
            "status", _state("commitment_status", "open", "reported", "abandoned"), nullable=False
        ),
        sa.Column("event_type", sa.Integer(), nullable=True),
        sa.Column("requested_at", sa.DateTime(), nullable=False),
        sa.Column("settled_at", sa.DateTime(), nullable=True),
        sa.Column("reported_at", sa.DateTime(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("report_attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "uq_commitments_transaction",
        "commitments",
        ["calling_aet", "transaction_uid"],
        unique=True,
    )
    op.create_index("ix_commitments_due", "commitments", ["status", "next_attempt_at", "id"])
    op.create_table(
        "commitment_items",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("commitment_id", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("result", _state("item_result", "committed", "failed"), nullable=True),
        sa.Column("failure_reason", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_commitment_items_commitment_id", "commitment_items", ["commitment_id"])


def downgrade() -> None:
    op.drop_index("ix_commitment_items_commitment_id", table_name="commitment_items")
    op.drop_table("commitment_items")
    op.drop_index("ix_commitments_due", table_name="commitments")
    op.drop_index("uq_commitments_transaction", table_name="commitments")
    op.drop_table("commitments")
