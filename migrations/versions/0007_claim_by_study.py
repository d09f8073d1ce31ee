"""ix_instances_study leads an index of the claim's columns, for claiming by study

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ["study_instance_uid", "status", "node_id", "destination", "next_attempt_at", "id"]


def upgrade() -> None:
    op.create_index("ix_instances_study_due", "instances", COLUMNS, unique=False)
    op.drop_index("ix_instances_study", table_name="instances")


def downgrade() -> None:
    op.create_index("ix_instances_study", "instances", ["study_instance_uid"], unique=False)
    op.drop_index("ix_instances_study_due", table_name="instances")
