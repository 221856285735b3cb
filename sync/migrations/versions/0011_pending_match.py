"""pending_match: sources whose staged contacts wait for the first-load batch clustering

A first load of many contacts into an empty store stages later pages without matching them
and clusters the whole store in one batch when its contacts stream ends (sync/first_load.py).
A source is listed here, in the transaction of its first deferred page, until that batch
commits; a run or delivery that finds a row clusters first (an interrupted first load).

Revision ID: 0011_pending_match
Revises: 0010_source_alias
Create Date: 2026-12-06 04:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_pending_match"
down_revision = "0010_source_alias"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pending_match",
        sa.Column("source", sa.String(length=200), primary_key=True),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pending_match")
