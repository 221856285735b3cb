"""Learning end to end on both stores: steward decisions become labels, `crmhub dedupe train`
stores new parameters, the next sync scores with them, and a rejected pair stays apart."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from crmhub.settings import Settings
from dedupe.scoring import MODEL_VERSION, default_params
from sync import review
from sync.engine import SyncEngine
from sync.jobs import JOB_TRAIN, train_matcher, worker_settings
from sync.labels import label_counts, load_labels
from sync.model_params import active_params, history, scheduled_training
from sync.store import (
    audit_log,
    membership,
    model_params,
    review_item,
    source_record,
    write_transaction,
)
from tests.steward_data import SURNAMES, seed_reviews, write_families
from tests.test_cli import run

TRAINED = f"{MODEL_VERSION}+t1"


def _config(tmp_path: Path, store_url: str) -> str:
    path = tmp_path / "crmhub.toml"
    path.write_text(
        f"""
[store]
url = "{store_url}"

[matching]
train_min_labels = 5

[connectors.crm]
type = "csv"
path = "{tmp_path / "crm.csv"}"
""",
        encoding="utf-8",
    )
    return str(path)


def _cli(tmp_path: Path, config: str, *args: str) -> dict:
    done = run("--config", config, *args, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _pairs(db) -> list[dict]:
    with db.connect() as conn:
        items, _ = review.list_reviews(conn, limit=100)
        return [review.show_review(conn, i["id"]) for i in items]


def _golden(db, source: str, external_id: str) -> int:
    with db.connect() as conn:
        return int(
            conn.execute(
                select(membership.c.golden_id)
                .join(source_record, source_record.c.id == membership.c.record_id)
                .where(source_record.c.source == source, source_record.c.external_id == external_id)
            ).scalar_one()
        )


async def test_decisions_train_the_matcher_and_the_next_sync_uses_the_new_version(
    tmp_path, db, store_url
):
    settings = await seed_reviews(tmp_path, store_url, db, count=8)
    config = _config(tmp_path, store_url)

    # Nothing decided yet: training says so and changes nothing.
    text = run("--config", config, "dedupe", "train", cwd=tmp_path)
    assert text.returncode == 0
    assert "too few steward decisions" in text.stdout
    assert "[matching] train_min_labels = 5" in text.stdout
    said = _cli(tmp_path, config, "dedupe", "train")
    assert said["status"] == "too_few_labels"
    assert said["labels"] == {"match": 0, "non_match": 0}
    assert _cli(tmp_path, config, "dedupe", "params")["active"] == MODEL_VERSION

    # Steward decisions through the same functions the UI, API and CLI use.
    pairs = _pairs(db)
    for item in pairs[:5]:
        review.approve(db, item["id"], "sam")
    split = pairs[0]["b"]  # then split one of them off again: a non-match
    review.unmerge(db, split["record_id"], "sam")
    rejected = pairs[5]
    review.reject(db, rejected["id"], "sam")
    review.reject(db, pairs[6]["id"], "sam")
    review.undo_last(db, "sam")  # undo removes that label again
    with db.connect() as conn:
        assert label_counts(conn) == {"match": 4, "non_match": 2}
        labels = {(x.record_a, x.record_b): x.match for x in load_labels(conn)}
    a0, b0 = pairs[0]["a"]["record_id"], pairs[0]["b"]["record_id"]
    assert labels[(min(a0, b0), max(a0, b0))] is False  # the unmerge overrode the approval
    ra, rb = rejected["a"]["record_id"], rejected["b"]["record_id"]
    assert labels[(min(ra, rb), max(ra, rb))] is False

    # Dry run: the would-be version and its changes, nothing stored.
    dry = _cli(tmp_path, config, "dedupe", "train", "--dry-run")
    assert dry["status"] == "dry_run"
    assert dry["version"] == TRAINED
    assert dry["changes"]
    with db.connect() as conn:
        assert history(conn) == []

    trained = _cli(tmp_path, config, "dedupe", "train", "--as", "kim")
    assert trained["status"] == "trained"
    assert trained["version"] == TRAINED
    assert trained["previous_version"] == MODEL_VERSION
    assert trained["labels"] == {"match": 4, "non_match": 2}
    # The approved pairs differ in first name (nickname): that level's weight moved.
    moved = {(c["comparison"], c["level"]) for c in trained["changes"][:5]}
    assert ("first_name", "nickname") in moved
    shown = _cli(tmp_path, config, "dedupe", "params")
    assert shown["active"] == TRAINED
    assert shown["provenance"]["labels"] == {"match": 4, "non_match": 2}
    assert shown["provenance"]["trained_by"] == "kim"
    assert _cli(tmp_path, config, "dedupe", "train")["status"] == "unchanged"
    with db.connect() as conn:
        entry = conn.execute(select(audit_log).where(audit_log.c.action == "model.train")).one()
    assert entry.actor == "kim"
    assert entry.details["version"] == TRAINED
    assert not any(name in json.dumps(entry.details) for name in SURNAMES)  # no PII

    # The next sync: a new family, and the rejected pair made identical at the source.
    with db.connect() as conn:
        ext = dict(conn.execute(select(source_record.c.id, source_record.c.external_id)).all())
    csv_path = tmp_path / "crm.csv"
    write_families(csv_path, 9)
    lines = csv_path.read_text(encoding="utf-8").splitlines()
    twin_a = next(line for line in lines if line.startswith(f"{ext[ra]},"))
    lines = [
        f"{ext[rb]},{twin_a.split(',', 1)[1]}" if line.startswith(f"{ext[rb]},") else line
        for line in lines
    ]
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    engine = SyncEngine(settings, db)
    try:
        assert engine.matcher.version == TRAINED
        result = await engine.run("crm")
    finally:
        engine.close()
    assert result.counts.changed == 1
    assert result.counts.new == 2
    # Identical now, and still two golden records: the steward said so.
    assert _golden(db, "crm", ext[ra]) != _golden(db, "crm", ext[rb])
    assert _golden(db, "crm", ext[split["record_id"]]) != _golden(
        db, "crm", ext[pairs[0]["a"]["record_id"]]
    )
    with db.connect() as conn:
        assert label_counts(conn) == {"match": 4, "non_match": 2}  # labels survive syncs
        new_items = conn.execute(
            select(review_item.c.explanation).where(review_item.c.status == "open")
        ).scalars()
        assert {e["model"] for e in new_items} <= {MODEL_VERSION, TRAINED}
    explained = _cli(tmp_path, config, "explain", "crm:8-a", "crm:8-b")
    assert explained["explanation"]["model"] == TRAINED
    text = run("--config", config, "explain", "crm:8-a", "crm:8-b", cwd=tmp_path)
    assert f"model {TRAINED}" in text.stdout

    # Roll back: the shipped parameters again, from the next run on.
    back = _cli(tmp_path, config, "dedupe", "rollback")
    assert back == {"retired": TRAINED, "active": MODEL_VERSION}
    engine = SyncEngine(settings, db)
    try:
        assert engine.matcher.version == MODEL_VERSION
    finally:
        engine.close()


async def test_the_worker_retrains_on_its_schedule_only(tmp_path, db, store_url):
    settings = await seed_reviews(tmp_path, store_url, db, count=6)
    for item in _pairs(db):
        review.approve(db, item["id"], "sam")
    settings.matching.train_min_labels = 5
    settings.matching.train_schedule = "0 3 * * *"
    assert JOB_TRAIN in {c.name for c in worker_settings(settings)["cron_jobs"]}

    assert scheduled_training(settings, db, datetime(2026, 11, 25, 3, 1, tzinfo=UTC)) == {}
    ctx = {"settings": settings, "db": db, "score": datetime(2026, 11, 25, 3, 0, 45, tzinfo=UTC)}
    ctx["score"] = ctx["score"].timestamp() * 1000  # type: ignore[union-attr]
    done = await train_matcher(ctx)
    assert done["status"] == "trained"
    assert done["labels"] == {"match": 6, "non_match": 0}
    # The next tick that fires finds nothing new and leaves the parameters alone.
    again = await train_matcher(ctx)
    assert again["status"] == "unchanged"
    with db.connect() as conn:
        rows = history(conn)
    assert [r["version"] for r in rows] == [TRAINED]
    assert rows[0]["created_by"] == "scheduler"


def test_parameters_trained_for_other_comparisons_are_not_used(db):
    old = default_params()
    old.version = "crmhub-fs-1+t1"
    with write_transaction(db) as conn:
        conn.execute(
            model_params.insert().values(
                version=old.version,
                base_version="crmhub-fs-1",
                params=old.to_json(),
                labels_match=30,
                labels_non_match=5,
                label_fingerprint="x" * 64,
                created_by="sam",
                created_at=datetime.now(UTC),
            )
        )
    with db.connect() as conn:
        assert active_params(conn).version == MODEL_VERSION
        [row] = history(conn)
    assert row["usable"] is False
    assert row["active"] is False


def test_a_bad_training_schedule_names_the_key():
    with pytest.raises(ValidationError, match=r"matching.train_schedule[\s\S]*cron"):
        Settings(matching={"train_schedule": "every night"})
