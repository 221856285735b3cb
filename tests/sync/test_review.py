"""Steward decisions on both stores: approve, reject, skip, unmerge, undo, and the audit log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from sync import review
from sync.engine import SyncEngine
from sync.queries import golden_detail, resolve_golden_id
from sync.store import audit_log, membership, merge_constraint, review_item
from tests.steward_data import seed_reviews, write_families


def _open(db) -> list[dict]:
    with db.connect() as conn:
        items, _ = review.list_reviews(conn)
    return items


async def test_queue_is_best_first_with_counts_filters_and_evidence(tmp_path, db, store_url):
    await seed_reviews(tmp_path, store_url, db, count=3)
    with db.connect() as conn:
        items, total = review.list_reviews(conn, limit=2)
        assert total == 3
        assert len(items) == 2
        page2, _ = review.list_reviews(conn, limit=2, offset=2)
        probs = [i["probability"] for i in items + page2]
        assert probs == sorted(probs, reverse=True)
        assert review.list_reviews(conn, min_score=0.99)[1] == 0
        assert review.list_reviews(conn, source="crm")[1] == 3
        assert review.list_reviews(conn, source="elsewhere")[1] == 0
        assert review.review_counts(conn)["open"] == 3
        with pytest.raises(review.ReviewError, match="unknown status"):
            review.list_reviews(conn, status="bogus")
        with pytest.raises(review.ReviewError, match="unknown sort"):
            review.list_reviews(conn, sort="random")
        with pytest.raises(review.ReviewError, match="out of range"):
            review.list_reviews(conn, min_age_days=-1)
        ids = sorted(i["id"] for i in items + page2)
        assert [i["id"] for i in review.list_reviews(conn, sort="oldest")[0]] == ids
        assert [i["id"] for i in review.list_reviews(conn, sort="newest")[0]] == ids[::-1]
        low_first = [i["probability"] for i in review.list_reviews(conn, sort="borderline")[0]]
        assert low_first == sorted(low_first)
        shown = review.show_review(conn, items[0]["id"])
    # Age: one pair has waited ten days.
    with db.begin() as conn:
        conn.execute(
            review_item.update()
            .where(review_item.c.id == ids[0])
            .values(created_at=datetime.now(UTC) - timedelta(days=10))
        )
    with db.connect() as conn:
        waited, total = review.list_reviews(conn, min_age_days=5)
        assert ([i["id"] for i in waited], total) == ([ids[0]], 1)
        assert review.list_reviews(conn, max_age_days=5)[1] == 2
        assert review.list_reviews(conn, min_age_days=5, max_age_days=20)[1] == 1
    by_field = {f["field"]: f for f in shown["fields"]}
    assert by_field["first_name"]["differs"] is True
    assert by_field["first_name"]["evidence"]["level"] == "nickname"
    assert by_field["last_name"]["differs"] is False
    assert by_field["emails"]["differs"] is True
    assert shown["a"]["golden_id"] != shown["b"]["golden_id"]
    assert {shown["a"]["data"]["first_name"], shown["b"]["data"]["first_name"]} == {"Anna", "Ann"}


async def test_approve_merges_with_a_field_choice_and_undo_splits_again(tmp_path, db, store_url):
    await seed_reviews(tmp_path, store_url, db, count=2)
    item = _open(db)[0]
    with db.connect() as conn:
        shown = review.show_review(conn, item["id"])
    # Survivorship alone keeps "Ann" (the newer record); the steward picks "Anna".
    anna = next(s for s in (shown["a"], shown["b"]) if s["data"]["first_name"] == "Anna")
    result = review.approve(
        db, item["id"], "sam", choices={"first_name": anna["record_id"]}, seen=shown["seen"]
    )
    with db.connect() as conn:
        merged = golden_detail(conn, result["golden_id"])
        assert merged is not None
        assert len(merged["members"]) == 2
        assert merged["fields"]["first_name"] == "Anna"  # the steward's pick, not the newest
        assert merged["fields"]["full_name"] == "Ann Keller"  # unpicked: survivorship
        assert merged["lineage"]["first_name"]["record_id"] == anna["record_id"]
        assert resolve_golden_id(conn, result["merged"]) == result["golden_id"]
        assert {m["method"] for m in merged["members"]} == {"steward"}
        entry = conn.execute(select(audit_log).where(audit_log.c.id == result["audit_id"])).one()
        assert (entry.actor, entry.action) == ("sam", "review.approve")
        assert entry.details["review_id"] == item["id"]
        assert "Ann" not in str(entry.details)  # ids and states only, no personal data
        assert "Keller" not in str(entry.details)
    assert item["id"] not in [i["id"] for i in _open(db)]

    with pytest.raises(review.AlreadyDecidedError, match="approved by sam"):
        review.approve(db, item["id"], "kim")

    undone = review.undo_last(db, "sam")
    assert undone["action"] == "review.approve"
    with db.connect() as conn:
        assert (
            golden_detail(conn, shown["a"]["golden_id"])["members"][0]["record_id"]
            == (shown["a"]["record_id"])
        )
        assert len(golden_detail(conn, shown["b"]["golden_id"])["members"]) == 1
        assert resolve_golden_id(conn, result["merged"]) == result["merged"]
    assert item["id"] in [i["id"] for i in _open(db)]
    with pytest.raises(review.ReviewError, match="nothing to undo"):
        review.undo_last(db, "sam")


async def test_bad_choices_and_stale_views_change_nothing(tmp_path, db, store_url):
    await seed_reviews(tmp_path, store_url, db, count=1)
    item = _open(db)[0]
    with pytest.raises(review.ReviewError, match="cannot choose field 'password'"):
        review.approve(db, item["id"], "sam", choices={"password": item["a"]["record_id"]})
    with pytest.raises(review.ReviewError, match="not one of the pair"):
        review.approve(db, item["id"], "sam", choices={"company": 999999})
    with pytest.raises(review.StaleDecisionError, match="changed since it was shown"):
        review.approve(db, item["id"], "sam", seen="0000000000000000")
    with pytest.raises(review.NotFoundError):
        review.reject(db, 424242, "sam")
    assert _open(db)[0]["id"] == item["id"]
    with db.connect() as conn:
        assert conn.execute(select(audit_log)).first() is None


async def test_reject_sticks_across_a_later_sync(tmp_path, db, store_url):
    settings = await seed_reviews(tmp_path, store_url, db, count=1)
    item = _open(db)[0]
    review.reject(db, item["id"], "sam")
    with db.connect() as conn:
        kinds = conn.execute(select(merge_constraint.c.kind)).scalars().all()
        assert kinds == ["do_not_merge"]
    # The source changes both records: the pipeline re-matches them and must not re-queue.
    csv_path = tmp_path / "crm.csv"
    write_families(csv_path, 1)
    csv_path.write_text(csv_path.read_text().replace("Berlin", "Potsdam"), encoding="utf-8")
    engine = SyncEngine(settings, db)
    try:
        result = await engine.run("crm")
    finally:
        engine.close()
    assert result.as_dict()["counts"]["changed"] == 1
    with db.connect() as conn:
        statuses = conn.execute(select(review_item.c.status)).scalars().all()
    assert statuses == ["rejected"]
    review.undo_last(db, "sam")
    with db.connect() as conn:
        assert conn.execute(select(merge_constraint)).first() is None
    assert [i["id"] for i in _open(db)] == [item["id"]]


async def test_unmerge_splits_a_member_and_refuses_the_last_one(tmp_path, db, store_url):
    await seed_reviews(tmp_path, store_url, db, count=1)
    item = _open(db)[0]
    merged = review.approve(db, item["id"], "sam")
    split = review.unmerge(db, item["b"]["record_id"], "sam")
    assert split["golden_id"] == merged["golden_id"]
    with db.connect() as conn:
        left = golden_detail(conn, split["golden_id"])
        right = golden_detail(conn, split["new_golden_id"])
        assert [m["record_id"] for m in left["members"]] == [item["a"]["record_id"]]
        assert [m["record_id"] for m in right["members"]] == [item["b"]["record_id"]]
        assert right["fields"]["emails"]
        assert right["fields"]["emails"] != left["fields"]["emails"]
        assert conn.execute(select(merge_constraint.c.kind)).scalars().all() == ["do_not_merge"]
    with pytest.raises(review.ReviewError, match="only member"):
        review.unmerge(db, item["b"]["record_id"], "sam")
    review.undo_last(db, "sam")  # undoes the unmerge
    with db.connect() as conn:
        together = golden_detail(conn, split["new_golden_id"])
        assert together["id"] == merged["golden_id"]
        assert len(together["members"]) == 2
        assert conn.execute(select(merge_constraint.c.kind)).scalars().all() == ["must_merge"]
    with db.connect() as conn:
        actions = [e["action"] for e in review.audit_entries(conn)]
    assert actions == ["undo", "golden.unmerge", "review.approve"]


async def test_skip_leaves_the_open_queue_until_undone(tmp_path, db, store_url):
    await seed_reviews(tmp_path, store_url, db, count=2)
    first = _open(db)[0]
    review.skip(db, first["id"], "sam")
    assert first["id"] not in [i["id"] for i in _open(db)]
    with db.connect() as conn:
        assert review.list_reviews(conn, status="skipped")[1] == 1
    review.undo_last(db, "sam")
    assert first["id"] in [i["id"] for i in _open(db)]


async def test_logs_carry_ids_not_personal_data(tmp_path, db, store_url, caplog):
    await seed_reviews(tmp_path, store_url, db, count=1)
    item = _open(db)[0]
    caplog.set_level("DEBUG")
    caplog.clear()
    review.approve(db, item["id"], "sam", choices={"first_name": item["b"]["record_id"]})
    review.unmerge(db, item["b"]["record_id"], "sam")
    review.undo_last(db, "sam")
    text = caplog.text
    assert f"review {item['id']} approved by sam" in text
    for personal in ("Anna", "Keller", item["a"]["email"], item["b"]["email"]):
        assert personal not in text


async def test_bucket_preview_then_approve_all_with_a_count_guard(tmp_path, db, store_url):
    await seed_reviews(tmp_path, store_url, db, count=3)
    with db.connect() as conn:
        counts = {b["bucket"]: b["count"] for b in review.bucket_counts(conn)}
        assert counts == {"same-email": 0, "same-phone": 0, "same-name-company": 3}
        preview = review.bucket_preview(conn, "same-name-company", sample=2, seed=1)
        assert preview["count"] == 3
        assert len(preview["sample"]) == 2
        with pytest.raises(review.NotFoundError, match="no bucket 'nope'"):
            review.bucket_preview(conn, "nope")
    with pytest.raises(review.StaleDecisionError, match="holds 3 pairs now, not the 4"):
        review.approve_bucket(db, "same-name-company", "sam", expected=4)
    result = review.approve_bucket(db, "same-name-company", "sam", expected=3)
    assert result["approved"] == 3
    with db.connect() as conn:
        assert review.review_counts(conn)["approved"] == 3
        actions = [e["action"] for e in review.audit_entries(conn)]
    assert actions == ["review.approve"] * 3


async def test_merge_and_unmerge_stick_across_later_syncs(tmp_path, db, store_url):
    settings = await seed_reviews(tmp_path, store_url, db, count=2)
    first, second = _open(db)
    merged = review.approve(db, first["id"], "sam")
    review.approve(db, second["id"], "sam")
    split = review.unmerge(db, second["b"]["record_id"], "sam")
    csv_path = tmp_path / "crm.csv"
    csv_path.write_text(csv_path.read_text().replace(",Berlin", ",Hamburg"), encoding="utf-8")
    csv_path.write_text(csv_path.read_text().replace("GmbH,\n", "GmbH,Hamburg\n"), "utf-8")
    engine = SyncEngine(settings, db)
    try:
        counts = (await engine.run("crm")).as_dict()["counts"]
    finally:
        engine.close()
    assert counts["changed"] == 4  # every record re-matched
    with db.connect() as conn:
        together = golden_detail(conn, merged["golden_id"])
        assert {m["record_id"] for m in together["members"]} == {
            first["a"]["record_id"],
            first["b"]["record_id"],
        }
        assert together["fields"]["city"] == "Hamburg"
        alone = golden_detail(conn, split["new_golden_id"])
        assert [m["record_id"] for m in alone["members"]] == [second["b"]["record_id"]]
        statuses = conn.execute(select(review_item.c.status)).scalars().all()
    assert sorted(statuses) == ["approved", "approved"]  # nothing re-queued


async def test_a_stewards_field_choice_survives_later_syncs(tmp_path, db, store_url):
    settings = await seed_reviews(tmp_path, store_url, db, count=1)
    [item] = _open(db)
    with db.connect() as conn:
        shown = review.show_review(conn, item["id"])
    anna = next(s for s in (shown["a"], shown["b"]) if s["data"]["first_name"] == "Anna")
    result = review.approve(db, item["id"], "sam", choices={"first_name": anna["record_id"]})
    # The source changes the other record (a new city): its golden record is recomputed.
    csv_path = tmp_path / "crm.csv"
    csv_path.write_text(
        csv_path.read_text(encoding="utf-8").replace("Keller GmbH,\n", "Keller GmbH,Hamburg\n"),
        encoding="utf-8",
    )
    outcome = await SyncEngine(settings, db).run("crm")
    assert outcome.counts.changed == 1
    with db.connect() as conn:
        merged = golden_detail(conn, result["golden_id"])
    assert merged is not None
    assert merged["fields"]["city"] == "Hamburg"  # the new value arrived ...
    assert merged["fields"]["first_name"] == "Anna"  # ... and the steward's pick held


async def test_a_pair_whose_records_changed_since_shown_is_not_decided(tmp_path, db, store_url):
    """A steward looks at a pair; meanwhile a sync changes one record (a city: not enough to
    re-queue it). Deciding on what was shown is refused; after a fresh look it goes through."""
    settings = await seed_reviews(tmp_path, store_url, db, count=1)
    [item] = _open(db)
    with db.connect() as conn:
        seen = review.show_review(conn, item["id"])["seen"]
    csv_path = tmp_path / "crm.csv"
    csv_path.write_text(
        csv_path.read_text(encoding="utf-8").replace("Keller GmbH,\n", "Keller GmbH,Hamburg\n"),
        encoding="utf-8",
    )
    engine = SyncEngine(settings, db)
    try:
        assert (await engine.run("crm")).counts.changed == 1
    finally:
        engine.close()
    assert [i["id"] for i in _open(db)] == [item["id"]]  # still open, the same pair
    for decide in (review.approve, review.reject):
        with pytest.raises(review.StaleDecisionError, match="changed since it was shown"):
            decide(db, item["id"], "sam", seen=seen)
    with db.connect() as conn:
        assert conn.execute(select(audit_log)).first() is None
        fresh = review.show_review(conn, item["id"])
    assert fresh["seen"] != seen
    assert "Hamburg" in {fresh["a"]["data"].get("city"), fresh["b"]["data"].get("city")}
    assert review.approve(db, item["id"], "sam", seen=fresh["seen"])["status"] == "approved"


async def test_a_golden_records_history_lists_joins_and_steward_actions(tmp_path, db, store_url):
    from sync.history import golden_history

    await seed_reviews(tmp_path, store_url, db, count=3)
    first, second, untouched = _open(db)
    a, b = first["a"]["record_id"], first["b"]["record_id"]
    merged = review.approve(db, first["id"], "sam", choices={"first_name": a})
    survivor, alias = merged["golden_id"], merged["merged"]
    review.approve(db, second["id"], "kim")  # another golden record: not in this history
    split = review.unmerge(db, b, "sam")
    review.undo_last(db, "sam")  # the split is undone: b is back

    with db.connect() as conn:
        history = golden_history(conn, survivor)
        split_off = golden_history(conn, split["new_golden_id"])
        fresh_id = conn.execute(
            select(membership.c.golden_id).where(
                membership.c.record_id == untouched["a"]["record_id"]
            )
        ).scalar_one()
        fresh = golden_history(conn, fresh_id)
    assert [h["action"] for h in history] == ["undo", "golden.unmerge", "review.approve", "created"]
    undo, unmerge, approve, _created = history
    assert undo["details"]["undid"] == unmerge["audit_id"]
    assert (unmerge["details"]["record_id"], unmerge["details"]["golden_id"]) == (b, survivor)
    assert (approve["actor"], approve["details"]["alias"]) == ("sam", alias)
    assert approve["details"]["choices"] == {"first_name": a}
    assert [h["action"] for h in split_off] == ["undo", "golden.unmerge", "created"]
    # A record nobody decided on: created by the sync, its first record joined as new.
    assert [h["action"] for h in fresh] == ["joined.new", "created"]
    joined = fresh[0]
    assert joined["actor"] == "sync"
    assert joined["details"]["record_id"] == untouched["a"]["record_id"]
    assert "keller" not in str(history).lower()  # ids and states, no personal data


def test_migration_0008_indexes_existing_audit_entries_by_golden_record(tmp_path):
    """Audit entries written before 0008 get their golden records too (undo: those of the
    entry it undid), so older decisions appear in the history."""
    from datetime import UTC, datetime

    from sync.history import golden_history
    from sync.migrate import upgrade
    from sync.store import audit_golden, golden_record, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(engine, "0007_login_failure")
    now = datetime(2026, 12, 1, tzinfo=UTC)
    entries = [
        ("review.approve", {"review_id": 1, "survivor": 10, "alias": 11}),
        ("review.reject", {"review_id": 2, "record_a": 1, "record_b": 2}),
        ("golden.unmerge", {"record_id": 3, "golden_id": 10, "new_golden_id": 12}),
        ("undo", {"undid": 3, "action": "golden.unmerge"}),
        ("review.approve", {"review_id": 4, "survivor": 13, "alias": None}),
    ]
    with engine.begin() as conn:
        for action, details in entries:
            conn.execute(
                audit_log.insert().values(at=now, actor="sam", action=action, details=details)
            )
        conn.execute(
            golden_record.insert(),
            [
                {
                    "id": g,
                    "fields": {},
                    "lineage": {},
                    "version": 1,
                    "created_at": now,
                    "updated_at": now,
                }
                for g in (10, 11, 12, 13)
            ],
        )
    upgrade(engine)
    with engine.connect() as conn:
        links = sorted(
            conn.execute(select(audit_golden.c.golden_id, audit_golden.c.audit_id)).all()
        )
        history = golden_history(conn, 10)
    engine.dispose()
    assert links == [(10, 1), (10, 3), (10, 4), (11, 1), (12, 3), (12, 4), (13, 5)]
    assert [h["action"] for h in history] == ["undo", "golden.unmerge", "review.approve", "created"]
