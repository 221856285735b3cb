"""Counts of common values kept across processes (sync/frequencies.py, key_frequency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, select

import sync.frequencies as frequencies
from sync.frequencies import StoreFrequencies
from sync.migrate import upgrade
from sync.rebuild import KeyRows
from sync.rebuild_apply import write_keys
from sync.store import bulk_insert, key_frequency, make_engine, match_key, write_transaction
from tests.sync.test_key_lookup import _records


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """COMMON lowered to 3, and every pair the store is asked to count, recorded."""
    monkeypatch.setattr(frequencies, "COMMON", 3)
    asked: list[tuple[str, str]] = []
    real = frequencies.key_counts

    def recording(conn: Connection, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        asked.extend(pairs)
        return real(conn, pairs)

    monkeypatch.setattr(frequencies, "key_counts", recording)
    return asked


def _kept(db: Engine) -> dict[tuple[str, str], tuple[int, int]]:
    with db.connect() as conn:
        rows = conn.execute(select(key_frequency)).all()
    return {(r.key_kind, r.key_value): (r.holders, r.contacts) for r in rows}


def test_a_batch_keeps_common_counts_for_later_processes(
    db: Engine, counted: list[tuple[str, str]]
) -> None:
    keys = KeyRows()
    for rid in range(1, 11):
        own = [("tf:first", "john" if rid <= 6 else f"name{rid}"), ("email", f"p{rid}@x.com")]
        keys.add(rid, own + ([("phone", "+15550100")] if rid <= 3 else []))
    with write_transaction(db) as conn:
        _records(conn, list(range(1, 11)))
        write_keys(conn, keys)
    # Held 3 times or more: kept, with the contacts they are counts among.
    assert _kept(db) == {("tf:first", "john"): (6, 10), ("phone", "+15550100"): (3, 10)}

    fresh = StoreFrequencies()  # another process: nothing counted yet
    with write_transaction(db) as conn:
        fresh.prefetch(conn, [("first", "john"), ("first", "name7"), ("phone", "+15550100")])
    assert fresh.count("first", "john") == 6
    assert fresh.stored("phone", "+15550100") == 3
    assert fresh.count("first", "name7") == 1
    assert counted == [("tf:first", "name7")]  # the kept ones were not counted again


def _smiths(db: Engine, holders: int, kept: int) -> None:
    """Ten contacts, `holders` of them named Smith, and a kept count of `kept` Smiths taken
    at 10 contacts."""
    with write_transaction(db) as conn:
        _records(conn, list(range(1, 11)))
        bulk_insert(
            conn,
            match_key,
            [
                {"record_id": rid, "key_kind": "tf:last", "key_value": "smith"}
                for rid in range(1, holders + 1)
            ],
        )
        conn.execute(
            key_frequency.insert().values(
                key_kind="tf:last", key_value="smith", holders=kept, contacts=10
            )
        )


def test_kept_counts_expire_when_the_store_has_grown(
    db: Engine, counted: list[tuple[str, str]]
) -> None:
    _smiths(db, 4, kept=4)
    within = StoreFrequencies()
    with db.connect() as conn:  # 10 contacts: the count taken at 10 holds
        within.prefetch(conn, [("last", "smith")])
    assert within.count("last", "smith") == 4
    assert counted == []

    with write_transaction(db) as conn:
        _records(conn, [11, 12])  # 12 contacts: more than 10% past the count's 10
        bulk_insert(
            conn, match_key, [{"record_id": 11, "key_kind": "tf:last", "key_value": "smith"}]
        )
    with db.connect() as conn:  # read-only: counted afresh, not stored
        StoreFrequencies().prefetch(conn, [("last", "smith")])
    assert counted == [("tf:last", "smith")]
    assert _kept(db) == {("tf:last", "smith"): (4, 10)}

    grown = StoreFrequencies()
    with write_transaction(db) as conn:  # a page's write transaction: stored for the next
        grown.prefetch(conn, [("last", "smith")])
    assert grown.count("last", "smith") == 5
    assert _kept(db) == {("tf:last", "smith"): (5, 12)}


def test_exact_counts_take_no_kept_count_and_keep_theirs(
    db: Engine, counted: list[tuple[str, str]]
) -> None:
    """A borderline recheck weighs with exact counts (`counted_for(exact=True)`): a kept
    count still within KEPT_WITHIN of the store's size, but stale, is counted afresh, and
    the fresh count kept for the pages after it."""
    _smiths(db, 5, kept=4)
    kept = StoreFrequencies()
    with db.connect() as conn:
        kept.prefetch(conn, [("last", "smith")])
    assert kept.count("last", "smith") == 4  # the kept count, not counted again
    assert counted == []
    exact = StoreFrequencies(exact=True)
    with write_transaction(db) as conn:
        exact.prefetch(conn, [("last", "smith")])
    assert exact.count("last", "smith") == 5
    assert counted == [("tf:last", "smith")]
    assert _kept(db) == {("tf:last", "smith"): (5, 10)}


def test_the_store_wide_count_reads_the_live_contact_index(tmp_path: Path) -> None:
    """Every process counts the store's live contacts every 10 minutes, inside a page's write
    transaction: the count reads the partial index of their ids, not every row (SQLite's plan;
    PostgreSQL's planner picks by table statistics)."""
    db = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade(db)
    ran: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "count(" in statement.lower() and "source_record" in statement:
            ran.append((statement, parameters))

    event.listen(db, "before_cursor_execute", record)
    with db.connect() as conn:
        StoreFrequencies().prefetch(conn, [])
        assert len(ran) == 1
        statement, parameters = ran[0]
        plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
    db.dispose()
    assert any("ix_source_record_live_contact" in str(row) for row in plan), plan
