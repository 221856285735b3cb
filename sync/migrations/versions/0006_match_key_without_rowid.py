"""match_key without a rowid on SQLite: its primary key is the table

A bulk load writes two or three key rows per contact; as a rowid table each row went into
three b-trees (rowid, primary key, lookup index), as a WITHOUT ROWID table into two. PostgreSQL
has no rowid: nothing to do there.

Revision ID: 0006_match_key_without_rowid
Revises: 0005_constraint_evidence
Create Date: 2026-11-25 05:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0006_match_key_without_rowid"
down_revision = "0005_constraint_evidence"
branch_labels = None
depends_on = None


def _rebuild(without_rowid: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    suffix = " WITHOUT ROWID" if without_rowid else ""
    op.execute(
        "CREATE TABLE match_key_new ("
        "record_id INTEGER NOT NULL, key_kind VARCHAR(20) NOT NULL, "
        "key_value VARCHAR(300) NOT NULL, "
        "PRIMARY KEY (record_id, key_kind, key_value), "
        f"FOREIGN KEY(record_id) REFERENCES source_record (id) ON DELETE CASCADE){suffix}"
    )
    op.execute(
        "INSERT INTO match_key_new (record_id, key_kind, key_value) "
        "SELECT record_id, key_kind, key_value FROM match_key ORDER BY record_id"
    )
    op.execute("DROP TABLE match_key")
    op.execute("ALTER TABLE match_key_new RENAME TO match_key")
    op.execute("CREATE INDEX ix_match_key_lookup ON match_key (key_kind, key_value)")


def upgrade() -> None:
    _rebuild(without_rowid=True)


def downgrade() -> None:
    _rebuild(without_rowid=False)
