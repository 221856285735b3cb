from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from sync.migrate import current_revision, head_revision, is_up_to_date, upgrade
from sync.store import metadata


def test_migrations_build_exactly_the_schema_the_code_uses(db):
    assert is_up_to_date(db)
    with db.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_upgrade_is_idempotent_and_sqlite_has_its_pragmas(db):
    upgrade(db)
    assert current_revision(db) == head_revision()
    assert set(metadata.tables) <= set(inspect(db).get_table_names())
    if db.dialect.name == "sqlite":
        with db.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
