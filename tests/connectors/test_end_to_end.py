"""Fake vendor server -> SyncEngine -> SQLite store, full then incremental."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine

from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.migrate import upgrade
from sync.queries import store_totals
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
    vendor.state.add_events(1, start=vendor.state.clock + timedelta(seconds=2))
    engine, db = engine_for(tmp_path, vendor)
    first = await engine.run("src")
    assert first.state == "succeeded"
    with db.connect() as conn:
        totals = store_totals(conn)
    assert totals["contacts"] == 180
    assert first.counts.dead_letters == 0
    vendor.state.touch([5, 6, 7], status="unsubscribed")
    second = await engine.run("src")
    assert second.counts.contacts == 3
    assert second.counts.changed == 3
    third = await engine.run("src")
    assert third.counts.contacts == 0


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
