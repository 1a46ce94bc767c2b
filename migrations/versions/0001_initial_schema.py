"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('app', sa.String(length=100), nullable=False),
    sa.Column('role', sa.String(length=10), nullable=False),
    sa.Column('policy', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('last_used_at', sa.DateTime(), nullable=True),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash'))
    )
    op.create_table('ledger',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('request_id', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('writer_id', sa.String(length=32), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('app', sa.String(length=100), nullable=False),
    sa.Column('key_id', sa.String(length=40), nullable=True),
    sa.Column('end_user', sa.String(length=64), nullable=True),
    sa.Column('end_user_salt', sa.String(length=32), nullable=True),
    sa.Column('end_user_commitment', sa.String(length=64), nullable=True),
    sa.Column('endpoint', sa.String(length=40), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('route', sa.String(length=100), nullable=True),
    sa.Column('provider', sa.String(length=100), nullable=True),
    sa.Column('upstream_model', sa.String(length=200), nullable=True),
    sa.Column('inference_location', sa.String(length=2), nullable=True),
    sa.Column('storage_location', sa.String(length=2), nullable=True),
    sa.Column('transfer_mechanism', sa.String(length=20), nullable=True),
    sa.Column('zdr_reference', sa.String(length=200), nullable=True),
    sa.Column('dpa_reference', sa.String(length=200), nullable=True),
    sa.Column('policy', sa.String(length=100), nullable=False),
    sa.Column('policy_version', sa.String(length=64), nullable=False),
    sa.Column('enforcement', sa.String(length=10), nullable=False),
    sa.Column('decision_id', sa.String(length=40), nullable=False),
    sa.Column('decision', sa.Text(), nullable=False),
    sa.Column('failed_requirements', sa.String(length=400), nullable=True),
    sa.Column('outcome', sa.String(length=30), nullable=False),
    sa.Column('status', sa.Integer(), nullable=False),
    sa.Column('latency_us', sa.BigInteger(), nullable=False),
    sa.Column('ttfb_us', sa.BigInteger(), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('usage_missing', sa.Boolean(), nullable=False),
    sa.Column('cost_nanos', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=True),
    sa.Column('provider_retention_days', sa.Integer(), nullable=True),
    sa.Column('provider_copy_gone_on', sa.Date(), nullable=True),
    sa.Column('retain_until', sa.Date(), nullable=False),
    sa.Column('content_stored', sa.Boolean(), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('row_hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger')),
    sa.UniqueConstraint('decision_id', name=op.f('uq_ledger_decision_id')),
    sa.UniqueConstraint('request_id', name=op.f('uq_ledger_request_id')),
    sa.UniqueConstraint('writer_id', 'seq', name=op.f('uq_ledger_writer_id_seq'))
    )
    op.create_index(op.f('ix_ledger_app_created_at'), 'ledger', ['app', 'created_at'])
    op.create_index(op.f('ix_ledger_created_at'), 'ledger', ['created_at'])
    op.create_index(op.f('ix_ledger_end_user'), 'ledger', ['end_user'])
    op.create_index(op.f('ix_ledger_outcome_created_at'), 'ledger', ['outcome', 'created_at'])
    op.create_index(op.f('ix_ledger_retain_until'), 'ledger', ['retain_until'])

    op.create_table('ledger_chains',
    sa.Column('writer_id', sa.String(length=32), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('last_seq', sa.BigInteger(), nullable=False),
    sa.Column('last_hash', sa.String(length=64), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('writer_id', name=op.f('pk_ledger_chains'))
    )
    op.create_table('ledger_tombstones',
    sa.Column('writer_id', sa.String(length=32), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('row_hash', sa.String(length=64), nullable=False),
    sa.Column('purged_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('writer_id', 'seq', name=op.f('pk_ledger_tombstones'))
    )


def downgrade() -> None:
    op.drop_table('ledger_tombstones')
    op.drop_table('ledger_chains')
    op.drop_table('ledger')
    op.drop_table('api_keys')
