"""Steward decisions that age well, on both stores: a constraint's evidence is kept, and a
material change of it sends the pair back to the queue with the reason, once."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from crmhub.settings import Settings
from sync import review
from sync.constraints import changes, evidence_of
from sync.engine import SyncEngine
from sync.store import audit_log, membership, merge_constraint, review_item
from tests.steward_data import seed_reviews

HEADER = "id,first_name,last_name,email,company,city"
ANNA = "0-a,Anna,Keller,anna@keller.example,Keller GmbH,Berlin"
ANN = "0-b,Ann,Keller,a.keller@web.example,Keller GmbH,"


async def _sync(settings: Settings, db, tmp_path: Path, a: str = ANNA, b: str = ANN) -> dict:
    """Re-sync the one family with rows `a` and `b` as the source now has them."""
    (tmp_path / "crm.csv").write_text(f"{HEADER}\n{a}\n{b}\n", encoding="utf-8")
    engine = SyncEngine(settings, db)
    try:
        result = await engine.run("crm")
    finally:
        engine.close()
    counts: dict = result.as_dict()["counts"]
    return counts


def _item(db) -> dict:
    with db.connect() as conn:
        item_id = conn.execute(select(review_item.c.id)).scalar_one()
        return review.show_review(conn, item_id)


def _constraint(db):
    with db.connect() as conn:
        return conn.execute(select(merge_constraint)).one()


def _goldens(db) -> set[int]:
    with db.connect() as conn:
        return set(conn.execute(select(membership.c.golden_id)).scalars())


@pytest.fixture
async def rejected(tmp_path, db, store_url) -> Settings:
    """One pair (Anna / Ann Keller) a steward said are not the same person."""
    settings = await seed_reviews(tmp_path, store_url, db, count=1)
    review.reject(db, _item(db)["id"], "sam")
    return settings


async def test_the_decision_keeps_its_evidence(rejected, db):
    row = _constraint(db)
    assert row.stale_at is None
    assert sorted(row.evidence) == sorted([str(row.record_a), str(row.record_b)])
    anna = row.evidence[str(row.record_a)]
    assert anna["emails"] == {"anna@keller.example": "anna@keller.example"}
    assert anna["name"] == ["anna keller", "Anna Keller"]
    assert anna["company"][0] == "keller"


async def test_material_change_requeues_with_reason_and_do_not_merge_still_blocks(
    rejected, db, tmp_path
):
    # Ann now has Anna's address: the matcher alone would merge them at once.
    counts = await _sync(rejected, db, tmp_path, b=ANN.replace("a.keller@web", "anna@keller"))
    assert counts["changed"] == 1
    assert counts["reviews_queued"] == 1
    item = _item(db)
    assert item["status"] == "open"
    reason = item["recheck"]["reason"]
    assert reason.startswith("since sam decided on ")
    assert "(not the same person)" in reason
    assert "record B (crm) gained email anna@keller.example" in reason
    assert "record B (crm) lost email a.keller@web.example" in reason
    assert "record A" not in reason
    assert item["recheck"]["decision"] == "do_not_merge"
    # The decision holds while the steward looks again: still two golden records.
    assert len(_goldens(db)) == 2
    assert item["a"]["golden_id"] != item["b"]["golden_id"]
    assert _constraint(db).kind == "do_not_merge"
    # The queue, the API and the CLI read the same reason.
    with db.connect() as conn:
        listed, total = review.list_reviews(conn)
    assert total == 1
    assert listed[0]["recheck"]["reason"] == reason


async def test_cosmetic_change_does_not_requeue(rejected, db, tmp_path):
    cosmetic = "0-b,  ANN , keller ,A.Keller@Web.Example ,KELLER GmbH.,Hamburg"
    counts = await _sync(rejected, db, tmp_path, b=cosmetic)
    assert counts["changed"] == 1
    assert counts["reviews_queued"] == 0
    assert _item(db)["status"] == "rejected"
    assert _constraint(db).stale_at is None


async def test_the_same_change_requeues_once(rejected, db, tmp_path):
    gained = ANN.replace("a.keller@web", "ann.k@mail")
    assert (await _sync(rejected, db, tmp_path, b=gained))["reviews_queued"] == 1
    review.skip(db, _item(db)["id"], "sam")
    # Another sync brings only a cosmetic edit and a city: the same change, not a new one.
    again = gained.replace("ann.k@mail", "Ann.K@Mail").rstrip(",") + ",Bonn"
    assert (await _sync(rejected, db, tmp_path, b=again))["reviews_queued"] == 0
    assert _item(db)["status"] == "skipped"
    # A further material change (a new company) re-queues, with both changes in the reason.
    moved = again.replace("Keller GmbH", "Acme AG")
    assert (await _sync(rejected, db, tmp_path, b=moved))["reviews_queued"] == 1
    item = _item(db)
    assert item["status"] == "open"
    assert "gained email ann.k@mail.example" in item["recheck"]["reason"]
    assert "company changed from 'Keller GmbH' to 'Acme AG'" in item["recheck"]["reason"]


async def test_redeciding_replaces_the_constraint_and_clears_the_reason(rejected, db, tmp_path):
    gained = ANN.replace("a.keller@web", "ann.k@mail")
    await _sync(rejected, db, tmp_path, b=gained)
    item = _item(db)
    review.reject(db, item["id"], "kim", seen=item["seen"])
    row = _constraint(db)
    assert (row.kind, row.created_by, row.stale_reason, row.stale_at) == (
        "do_not_merge",
        "kim",
        None,
        None,
    )
    assert "ann.k@mail.example" in row.evidence[str(row.record_b)]["emails"]
    assert _item(db)["recheck"] is None
    with db.connect() as conn:
        details = conn.execute(
            select(audit_log.c.details).order_by(audit_log.c.id.desc()).limit(1)
        ).scalar_one()
    assert details["recheck"] is True
    assert "ann.k" not in str(details)  # ids and states only
    # The evidence now matches the new decision: a re-sync of it re-queues nothing.
    counts = await _sync(rejected, db, tmp_path, b=gained.rstrip(",") + ",Bonn")
    assert counts["reviews_queued"] == 0
    assert _item(db)["status"] == "rejected"


async def test_a_change_undone_restores_the_decision(rejected, db, tmp_path):
    await _sync(rejected, db, tmp_path, b=ANN.replace("Keller GmbH", "Acme AG"))
    assert _item(db)["status"] == "open"
    counts = await _sync(rejected, db, tmp_path, b=ANN.rstrip(",") + ",Bonn")
    assert counts["reviews_queued"] == 0
    item = _item(db)
    assert (item["status"], item["decided_by"], item["recheck"]) == ("rejected", "sam", None)


async def test_a_confirmed_merge_holds_and_comes_back_for_a_recheck(tmp_path, db, store_url):
    settings = await seed_reviews(tmp_path, store_url, db, count=1)
    item = _item(db)
    review.approve(db, item["id"], "sam")
    assert len(_goldens(db)) == 1
    counts = await _sync(settings, db, tmp_path, b=ANN.replace("Ann,Keller", "Ann,Brandt"))
    assert counts["reviews_queued"] == 1
    item = _item(db)
    # Reopened although both records share a golden record (the pipeline settles such pairs).
    assert item["status"] == "open"
    assert item["same_golden"] is True
    assert "(the same person)" in item["recheck"]["reason"]
    assert "name changed from 'Ann Keller' to 'Ann Brandt'" in item["recheck"]["reason"]
    assert len(_goldens(db)) == 1  # the merge holds meanwhile
    # A later page touching the golden record does not settle the re-check away.
    await _sync(
        settings,
        db,
        tmp_path,
        a=ANNA.replace("Berlin", "Bonn"),
        b=ANN.replace("Ann,Keller", "Ann,Brandt"),
    )
    assert _item(db)["status"] == "open"
    # "Not the same person" on merged records needs a split; confirming again clears it.
    with pytest.raises(review.ConflictError, match="split one off"):
        review.reject(db, item["id"], "sam")
    review.approve(db, item["id"], "sam")
    assert (_item(db)["status"], _item(db)["recheck"]) == ("approved", None)
    assert _constraint(db).kind == "must_merge"


def test_material_and_cosmetic_changes_in_words():
    before = evidence_of(
        {
            "first_name": "Bob",
            "last_name": "Smith",
            "emails": ["Bob.Smith@gmail.com"],
            "phones": ["+15550101234"],
            "company": "Acme, Inc.",
        }
    )
    cosmetic = evidence_of(
        {
            "full_name": " bob  SMITH ",
            "emails": ["bobsmith+crm@GMAIL.com "],
            "phones": ["+1 555-010-1234"],
            "company": "ACME Inc",
        }
    )
    assert changes(before, cosmetic) == []
    material = evidence_of({"full_name": "Rob Smith", "emails": [], "phones": ["+15550109999"]})
    assert changes(before, material) == [
        "lost email Bob.Smith@gmail.com",
        "gained phone +15550109999",
        "lost phone +15550101234",
        "name changed from 'Bob Smith' to 'Rob Smith'",
        "lost company 'Acme, Inc.'",
    ]
