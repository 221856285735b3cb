"""steward constraints keep the evidence they rest on, and say when it went stale

Revision ID: 0005_constraint_evidence
Revises: 0004_blank_overwrite
Create Date: 2026-11-27 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_constraint_evidence"
down_revision = "0004_blank_overwrite"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite cannot add several columns and an index to a table in one ALTER.
    with op.batch_alter_table("merge_constraint") as batch:
        batch.add_column(sa.Column("evidence", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("stale_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("stale_key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("stale_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_merge_constraint_stale_at", "merge_constraint", ["stale_at"], unique=False
    )
    # Constraints on a changed record are looked up by either side of the pair; record_a is
    # the primary key's first column, record_b needs its own index.
    op.create_index(
        "ix_merge_constraint_record_b", "merge_constraint", ["record_b"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_merge_constraint_record_b", table_name="merge_constraint")
    op.drop_index("ix_merge_constraint_stale_at", table_name="merge_constraint")
    with op.batch_alter_table("merge_constraint") as batch:
        batch.drop_column("stale_at")
        batch.drop_column("stale_key")
        batch.drop_column("stale_reason")
        batch.drop_column("evidence")
