"""audit_golden: which golden records each steward action touched

A golden record's history lists the merges, splits and undos that touched it. Finding them by
the ids inside `audit_log.details` (JSON) meant reading the whole audit log for every golden
record page; this index table answers it with one lookup. Existing entries are indexed here
(the same rule as sync/history.py, frozen as of this migration).

Revision ID: 0008_audit_golden
Revises: 0007_login_failure
Create Date: 2026-12-06 03:00:00
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008_audit_golden"
down_revision = "0007_login_failure"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_KEYS = {"review.approve": ("survivor", "alias"), "golden.unmerge": ("golden_id", "new_golden_id")}


def _goldens(action: str, details: dict[str, Any]) -> set[int]:
    return {int(details[k]) for k in _KEYS.get(action, ()) if details.get(k) is not None}


def upgrade() -> None:
    op.create_table(
        "audit_golden",
        sa.Column("golden_id", _ID, nullable=False),
        sa.Column("audit_id", _ID, nullable=False),
        sa.ForeignKeyConstraint(["audit_id"], ["audit_log.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("golden_id", "audit_id"),
    )
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT id, action, details FROM audit_log "
            "WHERE action IN ('review.approve', 'golden.unmerge', 'undo') ORDER BY id"
        )
    )
    touched: dict[int, set[int]] = {}
    links = []
    for audit_id, action, details in rows:
        details = json.loads(details) if isinstance(details, str) else details
        goldens = (
            touched.get(int(details.get("undid", 0)), set())
            if action == "undo"
            else _goldens(action, details)
        )
        touched[int(audit_id)] = goldens
        links += [{"golden_id": g, "audit_id": int(audit_id)} for g in goldens]
    if links:
        table = sa.table("audit_golden", sa.column("golden_id"), sa.column("audit_id"))
        op.bulk_insert(table, links)


def downgrade() -> None:
    op.drop_table("audit_golden")
