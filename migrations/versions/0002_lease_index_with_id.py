"""ix_instances_lease ends with id, as the claim orders by it

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_instances_lease", table_name="instances")
    op.create_index(
        "ix_instances_lease",
        "instances",
        ["status", "node_id", "lease_expires_at", "id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_instances_lease", table_name="instances")
    op.create_index(
        "ix_instances_lease", "instances", ["status", "node_id", "lease_expires_at"], unique=False
    )
