"""trained matcher parameters (learning from steward labels)

Revision ID: 0003_model_params
Revises: 0002_outbox
Create Date: 2026-11-25 01:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_model_params"
down_revision = "0002_outbox"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "model_params",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("version", sa.String(length=100), nullable=False),
        sa.Column("base_version", sa.String(length=50), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("labels_match", sa.Integer(), nullable=False),
        sa.Column("labels_non_match", sa.Integer(), nullable=False),
        sa.Column("label_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("version", name="uq_model_params_version"),
    )


def downgrade() -> None:
    op.drop_table("model_params")
