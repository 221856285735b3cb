from __future__ import annotations

from datetime import UTC, datetime

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


def _open_and_upgrade(url: str) -> None:
    from sync.store import make_engine

    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()


def test_processes_opening_a_fresh_store_together_migrate_it_once(tmp_path):
    """A worker and a CLI command starting on a new SQLite store both upgrade it: one waits
    for the other instead of failing on the table the other just created."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'fresh{attempt}.db'}"
        procs = [context.Process(target=_open_and_upgrade, args=(url,)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]


def test_match_key_moves_to_a_without_rowid_table_with_its_rows_and_cascade(tmp_path):
    """0006 rebuilds SQLite's match_key in place: every key survives, deleting a source record
    still removes its keys, and a downgrade gives the rowid table back."""
    from sqlalchemy import delete, func, select

    from sync.store import make_engine, match_key, source_record

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(engine, "0005_constraint_evidence")
    now = datetime(2026, 11, 25, tzinfo=UTC)
    with engine.begin() as conn:
        for rid in (1, 2):
            conn.execute(
                source_record.insert().values(
                    id=rid,
                    source="s",
                    kind="contact",
                    external_id=str(rid),
                    content_hash="h",
                    payload={},
                    data={},
                    staged_at=now,
                )
            )
        conn.execute(
            match_key.insert(),
            [
                {"record_id": 1, "key_kind": "email", "key_value": "a@x.com"},
                {"record_id": 2, "key_kind": "email", "key_value": "a@x.com"},
                {"record_id": 2, "key_kind": "phone", "key_value": "+14155550100"},
            ],
        )
    upgrade(engine)

    def table_sql() -> str:
        with engine.connect() as conn:
            return conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name = 'match_key'"
            ).scalar_one()

    assert "WITHOUT ROWID" in table_sql()
    with engine.begin() as conn:
        assert conn.execute(select(func.count()).select_from(match_key)).scalar() == 3
        conn.execute(delete(source_record).where(source_record.c.id == 2))
        assert conn.execute(select(match_key.c.record_id)).scalars().all() == [1]
    from alembic import command

    from sync.migrate import _config

    config = _config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0005_constraint_evidence")
    assert "WITHOUT ROWID" not in table_sql()
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(match_key)).scalar() == 1
    engine.dispose()
