"""blank-overwrite incidents: a re-staged record lost a field's value

Revision ID: 0004_blank_overwrite
Revises: 0003_model_params
Create Date: 2026-11-26 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_blank_overwrite"
down_revision = "0003_model_params"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "blank_overwrite",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("record_id", _ID, nullable=False),
        sa.Column("external_id", sa.String(length=500), nullable=False),
        sa.Column("field", sa.String(length=100), nullable=False),
        sa.Column("run_id", _ID, nullable=True),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["record_id"], ["source_record.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["sync_run.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_blank_overwrite_source", "blank_overwrite", ["source", "detected_at"], unique=False
    )
    op.create_index("ix_blank_overwrite_record_id", "blank_overwrite", ["record_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_blank_overwrite_record_id", table_name="blank_overwrite")
    op.drop_index("ix_blank_overwrite_source", table_name="blank_overwrite")
    op.drop_table("blank_overwrite")
