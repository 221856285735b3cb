"""login_failure: failed sign-ins, shared by every web process of a store

Sign-in throttling counts failures here rather than in one process's memory, so several
`crmhub serve` processes (or hosts on one PostgreSQL store) enforce one limit. Rows carry a
SHA-256 of the throttled key (a user name or a client address), never the key itself, and are
deleted once they are older than the throttle window.

Revision ID: 0007_login_failure
Revises: 0006_match_key_without_rowid
Create Date: 2026-12-06 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_login_failure"
down_revision = "0006_match_key_without_rowid"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "login_failure",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_login_failure_key", "login_failure", ["key_hash", "at"], unique=False)
    op.create_index("ix_login_failure_at", "login_failure", ["at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_login_failure_at", table_name="login_failure")
    op.drop_index("ix_login_failure_key", table_name="login_failure")
    op.drop_table("login_failure")
