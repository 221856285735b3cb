"""contact_form: each contact's prepared form, stored with its match_key rows

Matching one contact against a big store prepared every candidate again (validation and
normalisation of a couple of hundred stored contacts per probe). The form is now written with
the match_key rows and read back, valid for the data digest it carries (sync/forms.py).
Existing stores get the table empty: candidates without a form are prepared as before, and a
`crmhub rebuild` (or the record's next change) writes theirs.

Revision ID: 0013_contact_form
Revises: 0012_key_frequency
Create Date: 2026-12-07 06:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_contact_form"
down_revision = "0012_key_frequency"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "contact_form",
        sa.Column(
            "record_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.ForeignKey("source_record.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("digest", sa.String(length=16), nullable=False),
        sa.Column("form", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("contact_form")
