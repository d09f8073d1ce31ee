"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('destinations',
    sa.Column('url', sa.String(length=1024), nullable=False),
    sa.Column('state', sa.Enum('ok', 'blocked', name='destination_state', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('since', sa.DateTime(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('next_probe_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('url')
    )
    op.create_table('instance_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('instance_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instance_events_instance_id'), ['instance_id'], unique=False)

    op.create_table('instances',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('calling_aet', sa.String(length=16), nullable=False),
    sa.Column('peer_address', sa.String(length=64), nullable=False),
    sa.Column('node_id', sa.String(length=128), server_default='', nullable=False),
    sa.Column('spool_path', sa.String(length=512), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('status', sa.Enum('pending', 'in_flight', 'done', 'failed', name='instance_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=False),
    sa.Column('lease_owner', sa.String(length=128), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.Column('forwarded_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index('ix_instances_due', ['status', 'node_id', 'next_attempt_at', 'id'], unique=False)
        batch_op.create_index('ix_instances_lease', ['status', 'node_id', 'lease_expires_at'], unique=False)
        batch_op.create_index('ix_instances_sop', ['sop_instance_uid'], unique=False)
        batch_op.create_index('ix_instances_study', ['study_instance_uid'], unique=False)
        batch_op.create_index('uq_instances_pending_sop', ['sop_instance_uid'], unique=True, sqlite_where=sa.text("status = 'pending'"), postgresql_where=sa.text("status = 'pending'"))



def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('uq_instances_pending_sop', sqlite_where=sa.text("status = 'pending'"), postgresql_where=sa.text("status = 'pending'"))
        batch_op.drop_index('ix_instances_study')
        batch_op.drop_index('ix_instances_sop')
        batch_op.drop_index('ix_instances_lease')
        batch_op.drop_index('ix_instances_due')

    op.drop_table('instances')
    with op.batch_alter_table('instance_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instance_events_instance_id'))

    op.drop_table('instance_events')
    op.drop_table('destinations')
