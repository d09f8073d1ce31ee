"""instances.applied: what each delivery was sent (redaction, compression), recorded when
the destination took it

Existing rows get NULL: they were sent as received.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("applied", sa.Text(), nullable=True))


def downgrade() -> None:
    # SQLite 3.35+ drops a column in place (batch mode would rebuild the table and its
    # partial unique index).
    op.drop_column("instances", "applied")
