"""A growing store decides its borderline merges and review items again (sync/borderline.py):
each `recheck_growth` it grows, the golden records a link near `auto_merge` made and the open
review items just below it are clustered again with the store's size and counts now."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, update

from bench.matching.generate import generate
from crmhub.records import Contact, RawRecord
from crmhub.settings import Settings
from dedupe import build_matcher
from dedupe.cluster import BORDERLINE
from sync import frequencies
from sync import rebuild as rebuild_module
from sync.borderline import borderline_contacts
from sync.engine import SyncEngine
from sync.rebuild import plan_rebuild
from sync.rebuild_apply import rebuild
from sync.store import (
    audit_log,
    golden_record,
    key_frequency,
    match_key,
    membership,
    review_item,
)
from tests.conftest import make_settings
from tests.sync.growing_store import csv_source, pushed

LOADED = 2_190  # contacts of the first load, clustered in one batch
DUE = 2_212  # 1% more: the first size a recheck is due at (2,190 * 1.01 = 2,211.9)


def _grown_settings(
    tmp_path: Path, store_url: str, recheck: float
) -> tuple[Settings, list[dict[str, str]]]:
    """A CSV source of LOADED generated contacts (pages of 500), and the next ones up to DUE
    to push; no batch of the store after the first load's (`recluster_growth = 0` keeps only
    2,000)."""
    rows = generate(DUE, seed=5)
    settings = csv_source(tmp_path, store_url, rows[:LOADED], page_size=500)
    settings.matching = settings.matching.model_copy(
        update={"recluster_growth": 0.0, "recheck_growth": recheck}
    )
    return settings, rows[LOADED:]


async def _loaded(tmp_path: Path, store_url: str, db: Engine, **matching: Any) -> Settings:
    """Settings as `_grown_settings` makes them (and these `[matching]` values), after the
    first load's run."""
    settings, _ = _grown_settings(tmp_path, store_url, 0.01)
    settings.matching = settings.matching.model_copy(update=matching)
    engine = SyncEngine(settings, db)
    try:
        await engine.run("contacts")
    finally:
        engine.close()
    return settings


def _golden_of(db: Engine) -> dict[int, int]:
    with db.connect() as conn:
        rows = conn.execute(select(membership.c.record_id, membership.c.golden_id))
        return {int(r): int(g) for r, g in rows}


def _sure_groups(db: Engine) -> list[list[int]]:
    """Members of golden records, singletons included, that no borderline link made and no
    open review item touches (the recheck leaves them alone), by golden id."""
    with db.connect() as conn:
        touched = {
            r
            for pair in conn.execute(
                select(review_item.c.record_a, review_item.c.record_b).where(
                    review_item.c.status == "open"
                )
            )
            for r in pair
        }
        groups: dict[int, list[int]] = {}
        weak: set[int] = set()
        for record, golden, p in conn.execute(
            select(membership.c.record_id, membership.c.golden_id, membership.c.probability)
        ):
            groups.setdefault(golden, []).append(record)
            if p is not None or record in touched:
                weak.add(golden)
    return [sorted(m) for g, m in sorted(groups.items()) if g not in weak]


def _singletons(db: Engine) -> list[int]:
    return [m[0] for m in _sure_groups(db) if len(m) == 1]


def _several(db: Engine) -> list[list[int]]:
    return [m for m in _sure_groups(db) if len(m) > 1]


def _move(db: Engine, record: int, golden: int | None, probability: float | None) -> int:
    """Put `record` in `golden` (None: a new golden record of its own) as an automatic merge
    with `probability` left on its membership: a stand-in for a decision taken when the store
    was smaller. Returns the golden id."""
    now = datetime.now(UTC)
    with db.begin() as conn:
        if golden is None:
            golden = conn.execute(
                insert(golden_record)
                .values(fields={}, lineage={}, created_at=now, updated_at=now)
                .returning(golden_record.c.id)
            ).scalar_one()
        conn.execute(
            update(membership)
            .where(membership.c.record_id == record)
            .values(golden_id=golden, method="auto", probability=probability)
        )
    return int(golden)


def _versions(db: Engine) -> dict[int, int]:
    with db.connect() as conn:
        rows = conn.execute(select(golden_record.c.id, golden_record.c.version))
        return {int(g): int(v) for g, v in rows}


def _rechecks(db: Engine) -> list[dict[str, Any]]:
    with db.connect() as conn:
        query = select(audit_log.c.details).where(audit_log.c.action == "rebuild.borderline")
        return list(conn.execute(query).scalars())


@pytest.mark.parametrize("recheck", [0.01, 0.0])
async def test_a_borderline_merge_that_no_longer_holds_is_split_when_the_store_grows_1pct(
    tmp_path: Path, db: Engine, store_url: str, recheck: float
) -> None:
    """Two people merged by a link of 0.951 (as a smaller store might have weighed it) are
    told apart by the recheck at 1% growth, not before it, and not at `recheck_growth = 0`;
    a merge as wrong but taken as sure (no probability kept) is not looked at."""
    settings, more = _grown_settings(tmp_path, store_url, recheck)
    engine = SyncEngine(settings, db)
    try:
        await engine.run("contacts")
        a, b, c, d = _singletons(db)[:4]
        golden_a = _golden_of(db)[a]
        _move(db, b, golden_a, settings.matching.auto_merge + 0.001)
        golden_c = _golden_of(db)[c]
        _move(db, d, golden_c, None)
        await engine.ingest("contacts", pushed(more[:-1]))  # DUE - 1 contacts: not yet
        assert _golden_of(db)[b] == golden_a
        assert _rechecks(db) == []
        versions = _versions(db)
        await engine.ingest("contacts", pushed(more[-1:]))  # DUE
    finally:
        engine.close()
    goldens = _golden_of(db)
    assert (goldens[b] != goldens[a]) == bool(recheck)
    assert goldens[a] == golden_a  # the golden record keeps its id
    assert goldens[d] == goldens[c] == golden_c
    if recheck:
        [done] = _rechecks(db)
        assert done["store_contacts"] == DUE
        assert done["records_moved"] == 1
        # Of the golden records it clustered again only the one that changed is updated
        # (the last page's own match may have touched one more).
        assert done["contacts"] > 100
        changed = {g for g, v in _versions(db).items() if versions.get(g, v) != v}
        assert golden_a in changed
        assert len(changed) <= 2


async def test_an_open_review_item_that_weighs_enough_now_is_merged_when_the_store_grows(
    tmp_path: Path, db: Engine, store_url: str
) -> None:
    """A member split off its golden record, with an open review item of 0.94 to one of the
    members (weighed when the store was smaller), is merged back by the recheck and the item
    closed; a member split off without one is not looked at."""
    settings, more = _grown_settings(tmp_path, store_url, 0.01)
    engine = SyncEngine(settings, db)
    try:
        await engine.run("contacts")
        (r1, *rest1), (r2, *_) = _several(db)[:2]
        golden_1 = _golden_of(db)[rest1[0]]
        alone_1 = _move(db, r1, None, None)
        alone_2 = _move(db, r2, None, None)
        near = settings.matching.auto_merge - 0.01
        with db.begin() as conn:
            item = conn.execute(
                insert(review_item)
                .values(
                    record_a=r1,
                    record_b=rest1[0],
                    probability=near,
                    explanation={},
                    status="open",
                    created_at=datetime.now(UTC),
                )
                .returning(review_item.c.id)
            ).scalar_one()
        await engine.ingest("contacts", pushed(more))
    finally:
        engine.close()
    goldens = _golden_of(db)
    assert goldens[r1] == golden_1
    assert goldens[r2] == alone_2 != alone_1
    with db.connect() as conn:
        status = conn.execute(select(review_item.c.status).where(review_item.c.id == item))
        assert status.scalar_one() == "merged"


async def test_a_batch_keeps_the_probability_of_its_borderline_links(
    tmp_path: Path, db: Engine, store_url: str
) -> None:
    """The first load's batch leaves each borderline link's probability on the memberships it
    made (and no other); a rebuild finds them the same, and puts back one that was changed.
    Past its first 1,000 contacts the load is staged without matching: the batch makes their
    memberships, as well as deciding those of the first pages again."""
    settings = await _loaded(tmp_path, store_url, db, batch_first_load=1_000)
    auto_merge = settings.matching.auto_merge
    kept = _kept(db)
    assert kept, "the generated store has borderline links"
    assert all(auto_merge <= p < auto_merge + BORDERLINE for p in kept.values())
    doctored = min(kept)
    with db.begin() as conn:
        conn.execute(
            update(membership).where(membership.c.record_id == doctored).values(probability=0.5)
        )
    plan = rebuild(db, settings, actor="test")
    assert plan.moved == []
    assert _kept(db) == kept


def _kept(db: Engine) -> dict[int, float]:
    with db.connect() as conn:
        rows = conn.execute(
            select(membership.c.record_id, membership.c.probability).where(
                membership.c.probability.is_not(None)
            )
        )
        return {int(r): float(p) for r, p in rows}


# Two records of one person (a nickname, the same address), weighed with the shipped prior (a
# store under 2,000 contacts).
ROBERT = {"first_name": "Robert", "last_name": "Smith", "email": "r.smith@acme.com"}
BOB = {"first_name": "Bob", "last_name": "Smith", "email": "r.smith@acme.com", "city": "Leeds"}


@pytest.mark.parametrize("margin", [0.01, 0.05])
async def test_a_page_keeps_the_probability_of_a_borderline_link(
    tmp_path: Path, db: Engine, store_url: str, margin: float
) -> None:
    """A record that joins a golden record by a link within BORDERLINE of `auto_merge` keeps
    its probability on its membership; one that joins by a sure link keeps none."""
    settings = make_settings(tmp_path, store_url, {"leads": {"type": "csv", "path": "x.csv"}})
    p = (
        build_matcher()
        .compare(
            Contact(first_name="Robert", last_name="Smith", emails=[ROBERT["email"]]),
            Contact(first_name="Bob", last_name="Smith", emails=[BOB["email"]], city="Leeds"),
        )
        .probability
    )
    settings.matching = settings.matching.model_copy(update={"auto_merge": p - margin})
    engine = SyncEngine(settings, db)
    try:
        for external, fields in (("R", ROBERT), ("B", BOB)):
            await engine.ingest("leads", [RawRecord("", "contact", {"id": external, **fields})])
    finally:
        engine.close()
    kept = _kept(db)
    goldens = _golden_of(db)
    assert len(set(goldens.values())) == 1
    assert list(kept.values()) == ([round(p, 4)] if margin < BORDERLINE else [])


async def test_a_local_batch_weighs_as_the_batch_of_the_store(
    tmp_path: Path, db: Engine, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after a batch of the store, a local batch of its borderline golden records (with
    the store's size and exact counts, not the kept counts of common values, here made 20%
    stale) decides nothing else; its blocks leave out the keys whose blocks the store's batch
    skips, however few of their holders it has (below)."""
    monkeypatch.setattr(frequencies, "COMMON", 20)  # values held 20 times or more are kept
    settings = await _loaded(tmp_path, store_url, db)
    with db.begin() as conn:
        stale = update(key_frequency).values(holders=key_frequency.c.holders * 4 / 5)
        assert conn.execute(stale).rowcount > 20
    with db.connect() as conn:
        ids = borderline_contacts(conn, settings.matching.auto_merge)
        plan = plan_rebuild(conn, settings, remap=False, only=ids)
    assert len(ids) > 100
    assert plan.contacts == len(ids)
    assert plan.moved == []
    assert plan.aliases == {}


async def test_a_local_batch_blocks_only_on_keys_the_stores_batch_would(
    tmp_path: Path, db: Engine, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local batch leaves out the keys the store holds more than MAX_BLOCK times (a probe
    key: more than the probe blocks' budget), even when it has few of their holders, judged
    by a kept count when there is one (counting walks every holder), and the keys only one of
    its contacts holds (no pair comes of them)."""
    await _loaded(tmp_path, store_url, db)
    with db.begin() as conn:
        common, count = conn.execute(
            select(match_key.c.key_value, func.count())
            .where(match_key.c.key_kind == "phone")
            .group_by(match_key.c.key_value)
            .order_by(func.count().desc())
            .limit(1)
        ).one()
        # held by one contact, but counted 5,000 times when the store was bigger
        conn.execute(
            insert(key_frequency).values(
                key_kind="email", key_value="kept@example.com", holders=5_000, contacts=2_190
            )
        )
    monkeypatch.setattr(rebuild_module, "MAX_BLOCK", count - 1)
    keys = [
        ("phone", common),
        ("email", "kept@example.com"),
        ("email", "someone@example.com"),
        ("surname", "SM0"),
    ]
    alone = [("email", "no.one.else@example.com")]
    with db.connect() as conn:
        index = rebuild_module._store_blocked(
            conn, [(keys, bytes([0, 0, 0, 1])), (keys + alone, bytes([0, 0, 0, 1, 0]))]
        )
    assert list(index.hashes) == [hash(keys[2]), hash(keys[3])] * 2
