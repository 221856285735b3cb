"""source_record.alias_of: a contact the source merged into another one (an alias)

A source-side merge (HubSpot's contact merge, Klaviyo's profile merge) retires one external
id in favour of another. The retired record stays, flagged deleted and naming its survivor's
external id in `alias_of`, so the old id keeps resolving (xref, `golden show`) instead of
looking like a deletion. The partial index serves the re-pointing of earlier aliases when a
survivor is merged again; it holds only the aliased rows.

Revision ID: 0010_source_alias
Revises: 0009_review_item_age
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_source_alias"
down_revision = "0009_review_item_age"
branch_labels = None
depends_on = None

_ALIASED = sa.text("alias_of IS NOT NULL")


def upgrade() -> None:
    op.add_column("source_record", sa.Column("alias_of", sa.String(length=500), nullable=True))
    op.create_index(
        "ix_source_record_alias_of",
        "source_record",
        ["source", "alias_of"],
        unique=False,
        sqlite_where=_ALIASED,
        postgresql_where=_ALIASED,
    )


def downgrade() -> None:
    op.drop_index("ix_source_record_alias_of", table_name="source_record")
    # In place (SQLite >= 3.35 and PostgreSQL): a batch rebuild of source_record would drop
    # the table, and the foreign keys' ON DELETE CASCADE would empty every table that
    # references it.
    op.execute("ALTER TABLE source_record DROP COLUMN alias_of")
