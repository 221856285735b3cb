"""A first load into an empty store past `[matching] batch_first_load` is clustered in one batch."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from bench.matching.__main__ import write_data
from bench.matching.generate import generate
from crmhub.records import RawRecord
from crmhub.settings import Settings
from dedupe import matcher as matcher_module
from dedupe.comparators import Columns
from dedupe.matcher import FellegiSunterMatcher
from dedupe.normalize import Prepared
from sync import first_load, rebuild_apply
from sync import rebuild as planning
from sync.engine import SyncEngine
from sync.migrate import upgrade
from sync.rebuild_apply import rebuild
from sync.store import (
    golden_record,
    make_engine,
    membership,
    pending_match,
    review_item,
    source_record,
    sync_run,
)

PEOPLE = 600  # records of the realistic generator; pages of 100


def _contacts_csv(tmp_path: Path) -> Path:
    path = tmp_path / "contacts.csv"
    write_data(generate(PEOPLE, seed=11), path)
    return path


def _settings(
    folder: Path,
    url: str,
    csv: Path,
    batch: int,
    method: str = "probabilistic",
    page_size: int = 100,
) -> Settings:
    settings = Settings(
        store={"url": url},
        matching={"batch_first_load": batch, "method": method},
        connectors={"crm": {"type": "csv", "path": str(csv), "page_size": page_size}},
    )
    settings.source_path = folder / "crmhub.toml"
    return settings


def _partition(db: Engine) -> set[frozenset[str]]:
    return set(_goldens(db))


def _goldens(db: Engine) -> dict[frozenset[str], dict]:
    """Each golden record's fields, by its members' external ids."""
    with db.connect() as conn:
        rows = conn.execute(select(source_record.c.id, source_record.c.external_id)).all()
        external: dict[int, str] = {row.id: row.external_id for row in rows}
        groups: dict[int, set[str]] = {}
        for rid, gid in conn.execute(select(membership.c.record_id, membership.c.golden_id)):
            groups.setdefault(gid, set()).add(external[rid])
        fields = dict(conn.execute(select(golden_record.c.id, golden_record.c.fields)).all())
    return {frozenset(members): fields[gid] for gid, members in groups.items()}


def _unmatched(db: Engine) -> int:
    with db.connect() as conn:
        live = conn.execute(
            select(func.count())
            .select_from(source_record)
            .where(source_record.c.kind == "contact", source_record.c.deleted == 0)
        ).scalar_one()
        members = conn.execute(select(func.count()).select_from(membership)).scalar_one()
        pending = conn.execute(select(func.count()).select_from(pending_match)).scalar_one()
    return int(live) - int(members) + int(pending)


async def test_a_big_first_load_ends_as_a_rebuild_would(tmp_path, db, store_url):
    csv = _contacts_csv(tmp_path)
    engine = SyncEngine(_settings(tmp_path, store_url, csv, batch=150), db)
    notes: list[str] = []
    try:
        result = await engine.run("crm", progress=lambda page: notes.append(page.note))
    finally:
        engine.close()
    assert result.state == "succeeded"
    # Pages report as they commit; the batch says what the run is doing meanwhile.
    assert notes[-1] == f"matching {result.counts.contacts:,} contacts in one batch"
    assert notes.count("") >= 2
    assert _unmatched(db) == 0  # every contact has its golden record; nothing pending
    with db.connect() as conn:
        reviews = conn.execute(select(func.count()).select_from(review_item)).scalar_one()
        still_open = conn.execute(
            select(func.count()).select_from(review_item).where(review_item.c.status == "open")
        ).scalar_one()
    # Every item the run queued is counted; those the batch closed (their records merged)
    # are counted as settled, so the two add up to what stays open.
    assert result.counts.reviews_queued == reviews > 0
    assert result.counts.reviews_queued - result.counts.reviews_settled == still_open
    # What page-by-page matching and then `crmhub rebuild` give, on a store of its own.
    folder = tmp_path / "reference"
    folder.mkdir()
    url = f"sqlite:///{folder / 'crmhub.db'}"
    reference = make_engine(url, folder)
    upgrade(reference)
    settings = _settings(folder, url, csv, batch=0)
    engine = SyncEngine(settings, reference)
    try:
        await engine.run("crm")
    finally:
        engine.close()
    page_by_page = _partition(reference)
    rebuild(reference, settings, actor="test", confirm=True)
    assert _partition(db) == _partition(reference) != page_by_page
    # Pages staged without matching were mapped without lone golden fields (`solo`): the
    # batch's survivorship gives every golden record the fields a rebuild gives it.
    assert _goldens(db) == _goldens(reference)
    reference.dispose()


@pytest.mark.parametrize("batch", [2, 0], ids=["batch", "page by page"])
async def test_a_review_a_later_record_merges_is_counted_as_settled(tmp_path, db, store_url, batch):
    """Closed by the first load's batch or, page by page, by the page that links them."""
    csv = tmp_path / "contacts.csv"
    csv.write_text(
        "id,first_name,last_name,email,phone,company\n"
        "A,Robert,Smith,rsmith@acme.com,,Acme Inc\n"
        "B,Rob,Smyth,,+14155550101,Acme\n"  # with A: uncertain, queued by the first page
        "C,Rob,Smyth,rsmith@acme.com,+14155550101,Acme\n"  # A's address, B's phone
        "D,Jane,Doe,jane@globex.com,,Globex\n"
    )
    engine = SyncEngine(_settings(tmp_path, store_url, csv, batch=batch, page_size=2), db)
    try:
        result = await engine.run("crm")
    finally:
        engine.close()
    assert (result.counts.reviews_queued, result.counts.reviews_settled) == (1, 1)
    with db.connect() as conn:
        assert conn.execute(select(review_item.c.status)).scalars().all() == ["merged"]
    assert frozenset({"A", "B", "C"}) in _partition(db)


@pytest.mark.parametrize(("method", "batch"), [("exact", 150), ("probabilistic", 0)])
async def test_no_batch_for_the_exact_matcher_or_when_switched_off(
    tmp_path, db, store_url, method, batch, monkeypatch
):
    def never(*args: object) -> None:
        raise AssertionError("staged without matching")

    monkeypatch.setattr(first_load, "mark_pending", never)
    csv = _contacts_csv(tmp_path)
    engine = SyncEngine(_settings(tmp_path, store_url, csv, batch=batch, method=method), db)
    try:
        await engine.run("crm")
    finally:
        engine.close()
    assert _unmatched(db) == 0


async def _interrupted_first_load(
    tmp_path: Path, db: Engine, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """A first load whose process died between its last page and its batch."""
    settings = _settings(tmp_path, store_url, _contacts_csv(tmp_path), batch=150)
    cluster = first_load.cluster_pending

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(first_load, "cluster_pending", killed)
    engine = SyncEngine(settings, db)
    with pytest.raises(KeyboardInterrupt):
        await engine.run("crm")
    engine.close()
    monkeypatch.setattr(first_load, "cluster_pending", cluster)
    assert _unmatched(db) > 0  # staged and committed, waiting for their batch
    return settings


PUSHED = RawRecord("P-1", "contact", {"id": "P-1", "email": "new.person@example.com"})


async def test_an_interrupted_first_load_is_clustered_before_anything_else(
    tmp_path, db, store_url, monkeypatch
):
    settings = await _interrupted_first_load(tmp_path, db, store_url, monkeypatch)
    # A pushed delivery is the next thing to touch the store: the batch goes first.
    engine = SyncEngine(settings, db)
    try:
        await engine.ingest("crm", [PUSHED])
    finally:
        engine.close()
    assert _unmatched(db) == 0


async def test_a_first_load_still_running_elsewhere_is_left_to_its_own_run(
    tmp_path, db, store_url, monkeypatch
):
    settings = await _interrupted_first_load(tmp_path, db, store_url, monkeypatch)
    with db.begin() as conn:  # as if another process were still loading "crm"
        conn.execute(sync_run.update().values(state="running", finished_at=None))
    engine = SyncEngine(settings, db)
    try:
        await engine.ingest("crm", [PUSHED])
        # Pushed deliveries do not recluster the store under a load in progress ...
        assert _unmatched(db) > 0
        # ... which its own next run (here: the takeover) clusters at once.
        result = await engine.run("crm")
    finally:
        engine.close()
    assert result.state == "succeeded"
    assert _unmatched(db) == 0


@pytest.mark.parametrize("phase", ["collect", "cluster", "apply"])
async def test_a_cancelled_run_stops_its_batch_which_writes_nothing_and_runs_again(
    tmp_path, db, store_url, monkeypatch, phase
):
    """Ctrl-C (or a cancelled job) during the batch: its thread cannot be cancelled and its
    transaction holds the store, so it is asked to stop at its next step; it rolls back, the
    run is marked interrupted, and the next run clusters everything."""
    settings = _settings(tmp_path, store_url, _contacts_csv(tmp_path), batch=150)
    reached, go_on = threading.Event(), threading.Event()
    target = {"collect": planning, "cluster": planning, "apply": rebuild_apply}[phase]
    name = {"collect": "_remap", "cluster": "_cluster", "apply": "survived_rows"}[phase]
    original = getattr(target, name)

    def held(*args: object, **kwargs: object) -> object:
        reached.set()  # in the batch's thread: hold it here until the run is cancelled
        assert go_on.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, held)
    await _cancel_the_held_batch(settings, db, reached, go_on)
    monkeypatch.setattr(target, name, original)
    await _runs_again(settings, db)


async def test_a_cancelled_run_stops_its_batch_between_two_chunks_of_scoring(
    tmp_path, db, store_url, monkeypatch
):
    """The clustering itself stops at its next step too (at 1M contacts it runs for over a
    minute): here the batch is held in its first chunk of pairs scored, and none of the
    many chunks after it is scored."""
    settings = _settings(tmp_path, store_url, _contacts_csv(tmp_path), batch=150)
    monkeypatch.setattr(matcher_module, "PAIR_CHUNK", 64)  # many chunks
    reached, go_on = threading.Event(), threading.Event()
    chunks: list[int] = []
    cluster = planning.cluster_prepared

    def holding(records: list[Prepared], matcher: FellegiSunterMatcher, **kw: Any) -> object:
        score = matcher.probabilities_from_levels

        def held(cols: Columns, ia: Any, *args: Any) -> object:
            chunks.append(len(ia))
            reached.set()
            assert go_on.wait(30)
            return score(cols, ia, *args)

        matcher.probabilities_from_levels = held  # type: ignore[method-assign]
        return cluster(records, matcher, **kw)

    monkeypatch.setattr(planning, "cluster_prepared", holding)
    await _cancel_the_held_batch(settings, db, reached, go_on)
    assert chunks == [64]  # the first chunk only, of many
    monkeypatch.setattr(planning, "cluster_prepared", cluster)
    await _runs_again(settings, db)


async def _cancel_the_held_batch(
    settings: Settings, db: Engine, reached: threading.Event, go_on: threading.Event
) -> None:
    """Run a sync, cancel it once its batch is `reached`, then let the batch `go_on`: the
    run ends cancelled and marked interrupted, and the batch wrote nothing."""
    engine = SyncEngine(settings, db)
    try:
        run = asyncio.ensure_future(engine.run("crm"))
        assert await asyncio.to_thread(reached.wait, 30), "the batch never started"
        run.cancel()
        await asyncio.sleep(0.2)  # the engine asks the batch to stop ...
        go_on.set()  # ... and it does at its next step
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, 60)
    finally:
        engine.close()
    with db.connect() as conn:
        assert conn.execute(select(sync_run.c.state)).scalars().all() == ["interrupted"]
        assert conn.execute(select(func.count()).select_from(pending_match)).scalar_one() == 1
    assert _unmatched(db) > 0  # the batch wrote nothing


async def _runs_again(settings: Settings, db: Engine) -> None:
    engine = SyncEngine(settings, db)
    try:
        assert (await engine.run("crm")).state == "succeeded"
    finally:
        engine.close()
    assert _unmatched(db) == 0
