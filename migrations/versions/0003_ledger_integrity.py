"""ledger integrity: keyed chains, keyed tombstones, intents, dead letters, erasure requests

Revision ID: 0003_ledger_integrity
Revises: 0002_key_events
Create Date: 2026-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003_ledger_integrity'
down_revision = '0002_key_events'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ledger') as batch:
        batch.add_column(sa.Column('hash_key_id', sa.String(length=16), nullable=True))
    with op.batch_alter_table('ledger_tombstones') as batch:
        batch.add_column(sa.Column('reason', sa.String(length=20), nullable=True))
        batch.add_column(sa.Column('retain_until', sa.Date(), nullable=True))
        batch.add_column(sa.Column('hash_key_id', sa.String(length=16), nullable=True))
        batch.add_column(sa.Column('mac', sa.String(length=64), nullable=True))
    with op.batch_alter_table('ledger_chains') as batch:
        batch.add_column(sa.Column('hash_key_id', sa.String(length=16), nullable=True))
        batch.add_column(sa.Column('head_mac', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('erasure_seen', sa.BigInteger(), server_default='0',
                                   nullable=False))
        batch.add_column(sa.Column('stopped_at', sa.DateTime(), nullable=True))
    op.create_table('ledger_intents',
    sa.Column('request_id', sa.String(length=40), nullable=False),
    sa.Column('writer_id', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('facts', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('request_id', name=op.f('pk_ledger_intents'))
    )
    op.create_index(op.f('ix_ledger_intents_writer_id'), 'ledger_intents', ['writer_id'],
                    unique=False)
    op.create_table('ledger_dead_letters',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True,
              nullable=False),
    sa.Column('request_id', sa.String(length=40), nullable=True),
    sa.Column('writer_id', sa.String(length=32), nullable=False),
    sa.Column('failed_at', sa.DateTime(), nullable=False),
    sa.Column('error', sa.String(length=500), nullable=False),
    sa.Column('record', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_dead_letters'))
    )
    op.create_table('ledger_erasures',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True,
              nullable=False),
    sa.Column('end_user', sa.String(length=64), nullable=False),
    sa.Column('requested_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_erasures'))
    )


def downgrade() -> None:
    op.drop_table('ledger_erasures')
    op.drop_table('ledger_dead_letters')
    op.drop_index(op.f('ix_ledger_intents_writer_id'), table_name='ledger_intents')
    op.drop_table('ledger_intents')
    with op.batch_alter_table('ledger_chains') as batch:
        batch.drop_column('stopped_at')
        batch.drop_column('erasure_seen')
        batch.drop_column('head_mac')
        batch.drop_column('hash_key_id')
    with op.batch_alter_table('ledger_tombstones') as batch:
        batch.drop_column('mac')
        batch.drop_column('hash_key_id')
        batch.drop_column('retain_until')
        batch.drop_column('reason')
    with op.batch_alter_table('ledger') as batch:
        batch.drop_column('hash_key_id')
