"""review_item (status, created_at) index: the queue's age filter and count

The steward queue filters open pairs by how long they have waited. Without an index on the
queueing time, that filter read every open pair (0.5 s at 100,000 on SQLite).

Revision ID: 0009_review_item_age
Revises: 0008_audit_golden
Create Date: 2026-12-06 04:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0009_review_item_age"
down_revision = "0008_audit_golden"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_review_item_age", "review_item", ["status", "created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_review_item_age", table_name="review_item")
