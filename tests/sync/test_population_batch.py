"""A store that grows past MIN_POPULATION contacts is clustered once in a batch: the contacts
matched before under the shipped prior, without term frequencies, are weighed again with them."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from bench.incremental import CSV_COLUMNS, _write_csv
from bench.matching.generate import generate
from crmhub.records import RawRecord
from dedupe.scoring import MIN_POPULATION
from sync import first_load
from sync.engine import SyncEngine
from sync.rebuild_apply import preview
from tests.conftest import make_settings


async def test_the_contact_that_reaches_min_population_has_the_store_clustered_in_a_batch(
    tmp_path: Path, db: Engine, store_url: str
) -> None:
    rows = generate(MIN_POPULATION, seed=5)
    export = tmp_path / "contacts.csv"
    _write_csv(rows[:-1], export)
    settings = make_settings(
        tmp_path, store_url, {"contacts": {"type": "csv", "path": str(export)}}
    )
    engine = SyncEngine(settings, db)
    try:
        # One page of MIN_POPULATION - 1 contacts: matched page by page, no batch due.
        first = await engine.run("contacts")
        assert first.counts.contacts == MIN_POPULATION - 1
        assert not first_load.is_pending(db)
        last = rows[-1]
        payload = {"id": f"C-{last['unique_id']}", **{c: last[c] for c in CSV_COLUMNS[1:]}}
        await engine.ingest("contacts", [RawRecord("", "contact", payload)])
    finally:
        engine.close()
    assert not first_load.is_pending(db)
    # The store is as a batch of its contacts clusters them: a rebuild would move nothing.
    plan = preview(db, settings)
    assert plan.contacts == MIN_POPULATION
    assert plan.moved == []
    assert plan.clusters.get("merged", 0) == plan.clusters.get("new", 0) == 0
