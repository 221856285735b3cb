"""Source-side merges (sync/aliases.py) in odd orders, through the pushed-records path, on
SQLite and PostgreSQL. The end-to-end cases (fake vendors over HTTP) are in
tests/connectors/test_merges.py."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, select

from connectors.base import merged
from crmhub.records import RawRecord
from sync.engine import SyncEngine
from sync.queries import iter_xref, store_totals
from sync.store import source_record
from tests.conftest import make_settings
from tests.fakes.hubspot import contact
from tests.fakes.server import Person


def _hubspot_contact(n: int, **props: str) -> RawRecord:
    at = datetime(2026, 3, 1, tzinfo=UTC)
    person = Person(n, f"First{n}", f"Last{n}", f"person{n}@example.com", None, None, at, at)
    payload = contact(person)
    payload["properties"].update(props)
    return RawRecord(str(n), "contact", payload, at)


def _aliases(db: Engine) -> dict[str, tuple[int, str | None]]:
    with db.connect() as conn:
        rows = conn.execute(
            select(source_record.c.external_id, source_record.c.deleted, source_record.c.alias_of)
        )
        return {ext: (deleted, alias_of) for ext, deleted, alias_of in rows}


async def test_merges_survive_odd_orders_and_a_retired_id_listed_again(tmp_path, db, store_url):
    """Self-merges and cycles change nothing; a survivor the store does not hold still
    retires the record; a retired id the source lists again is a live record again."""
    settings = make_settings(tmp_path, store_url, {"hs": {"type": "hubspot", "token": "t"}})
    engine = SyncEngine(settings, db)
    await engine.ingest("hs", [_hubspot_contact(n) for n in (1, 2, 3)])
    counts = await engine.ingest("hs", [merged("1", "1"), merged("1", "2"), merged("2", "1")])
    assert counts.aliased == 0
    assert counts.deleted == 0
    assert _aliases(db) == {"1": (0, None), "2": (0, None), "3": (0, None)}

    before = {ext: gid for _, ext, gid in _xref(db)}
    counts = await engine.ingest("hs", [merged("3", "99")])  # 99 was never staged
    assert counts.aliased == 1
    assert _aliases(db)["3"] == (1, "99")
    assert {ext: gid for _, ext, gid in _xref(db)} == before  # still resolves to its golden

    await engine.ingest("hs", [merged("2", "1")])
    assert _aliases(db)["2"] == (1, "1")
    counts = await engine.ingest("hs", [_hubspot_contact(2, firstname="Again")])
    assert counts.changed == 1
    assert _aliases(db)["2"] == (0, None)  # listed again: live, no longer an alias
    with db.connect() as conn:
        assert store_totals(conn)["contacts"] == 2


def _xref(db: Engine) -> list[tuple[str, str, int]]:
    with db.connect() as conn:
        return list(iter_xref(conn))
