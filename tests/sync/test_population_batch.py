"""A store that grows past MIN_POPULATION contacts is clustered once in a batch: the contacts
matched before under the shipped prior, without term frequencies, are weighed again with them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select, update

from bench.matching.generate import generate
from crmhub.records import RawRecord
from crmhub.settings import Settings
from dedupe.scoring import MIN_POPULATION
from sync import first_load, frequencies
from sync.engine import SyncEngine
from sync.rebuild_apply import preview
from sync.store import audit_log, golden_record, membership, pending_match, sync_run
from tests.sync.growing_store import csv_source, pushed


def _all_but_the_last(tmp_path: Path, store_url: str, contacts: int) -> tuple[Settings, RawRecord]:
    """Settings of a CSV source holding all but the last of `contacts` generated contacts, and
    that last one as a pushed record."""
    rows = generate(contacts, seed=5)
    return csv_source(tmp_path, store_url, rows[:-1]), pushed(rows[-1:])[0]


async def test_the_contact_that_reaches_min_population_has_the_store_clustered_in_a_batch(
    tmp_path: Path, db: Engine, store_url: str
) -> None:
    settings, last = _all_but_the_last(tmp_path, store_url, MIN_POPULATION)
    engine = SyncEngine(settings, db)
    try:
        # One page of MIN_POPULATION - 1 contacts: matched page by page, no batch due.
        first = await engine.run("contacts")
        assert first.counts.contacts == MIN_POPULATION - 1
        assert not first_load.is_pending(db)
        await engine.ingest("contacts", [last])
    finally:
        engine.close()
    assert not first_load.is_pending(db)
    # The store is as a batch of its contacts clusters them: a rebuild would move nothing.
    plan = preview(db, settings)
    assert plan.contacts == MIN_POPULATION
    assert plan.moved == []
    assert plan.clusters.get("merged", 0) == plan.clusters.get("new", 0) == 0


def _split_off_a_member(db: Engine) -> int:
    """Move one member of a golden record with several into a golden record of its own, as
    no batch would (a stand-in for a decision made with a smaller store's counts)."""
    with db.begin() as conn:
        golden, record = conn.execute(
            select(membership.c.golden_id, func.max(membership.c.record_id))
            .group_by(membership.c.golden_id)
            .having(func.count() > 1)
            .order_by(membership.c.golden_id)
            .limit(1)
        ).one()
        now = datetime.now(UTC)
        fields = conn.execute(
            select(golden_record.c.fields).where(golden_record.c.id == golden)
        ).scalar_one()
        alone = conn.execute(
            insert(golden_record)
            .values(fields=fields, lineage={}, created_at=now, updated_at=now)
            .returning(golden_record.c.id)
        ).scalar_one()
        conn.execute(
            update(membership).where(membership.c.record_id == record).values(golden_id=alone)
        )
    return int(record)


@pytest.mark.parametrize("growth", [0.1, 0.0])
async def test_the_contact_that_grows_the_store_by_recluster_growth_has_it_clustered_again(
    tmp_path: Path, db: Engine, store_url: str, growth: float
) -> None:
    """Past MIN_POPULATION the store is clustered again each `recluster_growth` it grows
    (2,200 contacts at 0.1): what was decided since, here a doctored split, is as a batch of
    today's store has it. At 0 it is not."""
    settings, last = _all_but_the_last(tmp_path, store_url, round(MIN_POPULATION * 1.1))
    settings.matching = settings.matching.model_copy(update={"recluster_growth": growth})
    engine = SyncEngine(settings, db)
    try:
        await engine.run("contacts")  # 2,199 contacts: clustered in a batch at 2,000
        assert preview(db, settings).moved == []
        split = _split_off_a_member(db)
        assert preview(db, settings).moved == [split]
        await engine.ingest("contacts", [last])
    finally:
        engine.close()
    assert not first_load.is_pending(db)
    assert preview(db, settings).moved == ([] if growth else [split])


async def test_a_size_other_writers_passed_is_batched_once(
    tmp_path: Path, db: Engine, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes feeding one store each count only their own pages between recounts, so the
    page that takes the store to 2,200 contacts may be one whose writer believes it holds
    fewer. The next process to find the store at that size with no batch of it in the audit
    log batches it, here a `crmhub sync` started afterwards; the writer that passed the size
    unawares, once it recounts, finds it batched and does not batch it again."""
    rows = generate(2_202, seed=5)
    settings = csv_source(tmp_path, store_url, rows[:2_190])
    first, second = SyncEngine(settings, db), SyncEngine(settings, db)
    try:
        await first.run("contacts")  # 2,190 contacts, clustered in a batch (past 2,000)
        await second.ingest("contacts", pushed(rows[2_190:2_191]))  # counts 2,191
        await first.ingest("contacts", pushed(rows[2_191:2_192]))  # 2,192
        for record in pushed(rows[2_192:2_200]):  # the 2,200th is `second`'s: it counts 2,199
            await second.ingest("contacts", [record])
        assert not first_load.is_pending(db)
        split = _split_off_a_member(db)  # a decision no batch of these 2,200 would take
        assert preview(db, settings).moved == [split]
    finally:
        first.close()
    later = SyncEngine(settings, db)  # a process started since: it counts 2,201
    try:
        await later.ingest("contacts", pushed(rows[2_200:2_201]))
    finally:
        later.close()
    assert not first_load.is_pending(db)
    assert preview(db, settings).moved == []
    split = _split_off_a_member(db)
    monkeypatch.setattr(frequencies, "RECOUNT_SECONDS", 0.0)  # `second` recounts: 2,202
    try:
        await second.ingest("contacts", pushed(rows[2_201:]))
    finally:
        second.close()
    assert not first_load.is_pending(db)
    assert preview(db, settings).moved == [split]  # batched once: the split stays


async def test_a_size_reached_while_a_first_load_runs_is_left_to_its_batch(
    tmp_path: Path, db: Engine, store_url: str
) -> None:
    """While another source's first load is staging contacts (pending, its run running), the
    store grows past sizes no batch covered; a delivery then must not cluster the half-loaded
    store (and again at each size it passes): the load's own batch, at its end, covers them."""
    rows = generate(2_200, seed=5)
    settings = csv_source(tmp_path, store_url, rows[:2_190])
    engine = SyncEngine(settings, db)
    try:
        await engine.run("contacts")  # 2,190 contacts, clustered in a batch (past 2,000)
        now = datetime.now(UTC)
        with db.begin() as conn:  # a first load of "crm" under way elsewhere
            conn.execute(insert(sync_run).values(connector="crm", state="running", started_at=now))
            first_load.mark_pending(conn, "crm", now)
        batches = _batches(db)
        for record in pushed(rows[2_190:]):  # to 2,200 contacts
            await engine.ingest("contacts", [record])
    finally:
        engine.close()
    assert _batches(db) == batches
    with db.connect() as conn:
        assert conn.execute(select(pending_match.c.source)).scalars().all() == ["crm"]


def _batches(db: Engine) -> int:
    with db.connect() as conn:
        query = select(func.count()).where(audit_log.c.action == "rebuild.apply")
        return int(conn.execute(query).scalar_one())


@pytest.mark.parametrize(
    ("contacts", "growth", "size"),
    [
        (1_999, 0.1, None),
        (2_000, 0.1, 2_000),  # MIN_POPULATION, at any growth
        (2_199, 0.1, 2_000),
        (2_200, 0.1, 2_200),
        (2_500, 0.1, 2_420),  # past 2,200 and 2,420: the largest
        (2_661, 0.1, 2_420),
        (2_662, 0.1, 2_662),
        (1_000_000, 0.1, 981_112),
        (1_999, 0.0, None),
        (1_000_000, 0.0, 2_000),
    ],
)
def test_the_sizes_at_which_the_store_is_clustered_again(
    contacts: int, growth: float, size: int | None
) -> None:
    assert first_load.size_reached(contacts, growth) == size
