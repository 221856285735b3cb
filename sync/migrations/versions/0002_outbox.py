"""write-back outbox and ledger

Revision ID: 0002_outbox
Revises: 0001
Create Date: 2026-11-24 23:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_outbox"
down_revision = "0002_steward"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("connector", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("golden_id", _ID, nullable=True),
        sa.Column("dedupe_key", sa.String(length=300), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_due", ["status", "next_attempt_at"], unique=False)
        batch_op.create_index("ix_outbox_dedupe", ["dedupe_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_outbox_golden_id"), ["golden_id"], unique=False)
    op.create_table(
        "writeback_ledger",
        sa.Column("connector", sa.String(length=200), nullable=False),
        sa.Column("golden_id", _ID, nullable=False),
        sa.Column("field", sa.String(length=100), nullable=False),
        sa.Column("value_hash", sa.String(length=64), nullable=False),
        sa.Column("pushed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("connector", "golden_id", "field"),
    )


def downgrade() -> None:
    op.drop_table("writeback_ledger")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbox_golden_id"))
        batch_op.drop_index("ix_outbox_dedupe")
        batch_op.drop_index("ix_outbox_due")
    op.drop_table("outbox")
