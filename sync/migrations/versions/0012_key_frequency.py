"""key_frequency: counts of common match_key values, kept across processes

Term-frequency weights and blocking caps need how many records hold a value; counting a
common one ("john", a shared switchboard number) walks thousands of index entries. A batch
(first load, rebuild) stores the count of every value held 1,000 times or more; single-record
matching reuses them while the store's size stays within 10% of the size they were taken at.

Revision ID: 0012_key_frequency
Revises: 0011_pending_match
Create Date: 2026-12-06 22:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_key_frequency"
down_revision = "0011_pending_match"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_frequency",
        sa.Column("key_kind", sa.String(length=20), primary_key=True),
        sa.Column("key_value", sa.String(length=300), primary_key=True),
        sa.Column("holders", sa.Integer(), nullable=False),
        sa.Column("contacts", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("key_frequency")
