"""Fake vendor server -> SyncEngine -> SQLite store, full then incremental."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine

from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.migrate import upgrade
from sync.queries import dead_letters, iter_golden, iter_xref, store_totals
from sync.store import make_engine
from tests.connectors.vendors import TOKEN, Running, running


def engine_for(tmp_path: Path, vendor: Running) -> tuple[SyncEngine, Engine]:
    table = {**vendor.vendor.config(vendor.url, TOKEN), "rate_limit": 10_000, "page_size": 50}
    settings = Settings(
        store={"url": f"sqlite:///{tmp_path / 'crm.db'}"},  # type: ignore[arg-type]
        connectors={"src": table},
    )
    db = make_engine(settings.store.url, tmp_path)
    upgrade(db)
    return SyncEngine(settings, db), db


async def test_sync_then_incremental_fetches_only_changes(tmp_path: Path, vendor: Running) -> None:
    vendor.state.add_people(180, status_every=9)
    vendor.state.add_events(2, start=vendor.state.clock + timedelta(seconds=2))
    engine, db = engine_for(tmp_path, vendor)
    first = await engine.run("src")
    assert first.state == "succeeded"
    with db.connect() as conn:
        totals = store_totals(conn)
    assert totals["contacts"] == 180
    assert first.counts.dead_letters == 0
    # Activities land linked to the golden record of the contact they name.
    expected = vendor.vendor.activity_count(vendor.state) if vendor.vendor.activity_count else 0
    assert first.counts.activities == expected
    assert first.counts.activities_linked == expected
    vendor.state.touch([5, 6, 7], status="unsubscribed")
    second = await engine.run("src")
    assert second.counts.contacts == 3
    assert second.counts.changed == 3
    # The unsubscribe reaches the golden records of exactly those three.
    with db.connect() as conn:
        golden = {g["golden_id"]: g.get("consent") for g in iter_golden(conn)}
        xref = {external: gid for _, external, gid in iter_xref(conn)}
    people = {5, 6, 7} | set(range(9, 181, 9))  # and those unsubscribed from the start
    unsubscribed = {xref[vendor.vendor.external_id(n)] for n in people}
    assert {gid for gid, consent in golden.items() if consent == "unsubscribed"} == unsubscribed
    third = await engine.run("src")
    assert third.counts.contacts == 0


async def test_a_record_with_missing_fields_is_dead_lettered(
    tmp_path: Path, vendor: Running
) -> None:
    """A record the source sends without its change timestamp: one dead letter naming the
    missing field, every other record staged, the run succeeds."""
    vendor.state.add_people(60)
    vendor.state.people[7].broken = True
    engine, db = engine_for(tmp_path, vendor)
    result = await engine.run("src")
    assert result.state == "succeeded"
    assert result.counts.contacts == 59
    assert result.counts.dead_letters == 1
    with db.connect() as conn:
        (letter,) = dead_letters(conn, source="src", include_fields=False)
        assert store_totals(conn)["contacts"] == 59
    assert letter["reason"].startswith("KeyError")
    assert "person7@example.com" in letter["raw"]
    assert (await engine.run("src")).counts.dead_letters == 0  # not re-read when nothing moved


async def test_hubspot_archive_becomes_a_deletion(tmp_path: Path) -> None:
    with running("hubspot") as vendor:
        vendor.state.add_people(30)
        engine, db = engine_for(tmp_path, vendor)
        await engine.run("src")
        for pid in (4, 9):
            vendor.state.people[pid].deleted_at = datetime(2026, 2, 1, tzinfo=UTC)
        result = await engine.run("src")
        assert result.counts.deleted == 2
        with db.connect() as conn:
            assert store_totals(conn)["contacts"] == 28
        assert (await engine.run("src")).counts.deleted == 0
