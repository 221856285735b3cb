"""A record arriving alone joins a golden record under the batch clusterer's chain guard."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, select

from crmhub.records import Contact, RawRecord
from dedupe.cluster import cluster
from sync.engine import SyncEngine
from sync.store import membership, review_item, source_record
from tests.conftest import make_settings

# A and B share an address (one person); C shares A's phone but, against B, a different
# address at the same domain and another city: the model is sure C and B are two people.
PEOPLE = {
    "A": {"first_name": "Robert", "last_name": "Smith", "email": "r.smith@acme.com",
          "phone": "+12124611931"},
    "B": {"first_name": "Robert", "last_name": "Smith", "email": "r.smith@acme.com",
          "city": "Leeds"},
    "C": {"first_name": "Robert", "last_name": "Smith", "email": "bob.s@acme.com",
          "phone": "+12124611931", "city": "York"},
}  # fmt: skip


def _groups(db: Engine) -> list[list[str]]:
    with db.connect() as conn:
        rows = conn.execute(
            select(source_record.c.external_id, membership.c.golden_id).join(
                membership, membership.c.record_id == source_record.c.id
            )
        ).all()
    groups: dict[int, list[str]] = {}
    for external, golden in rows:
        groups.setdefault(golden, []).append(external)
    return sorted(sorted(g) for g in groups.values())


async def test_one_record_joins_a_golden_record_only_if_its_members_agree(
    tmp_path: Path, db: Engine, store_url: str
) -> None:
    settings = make_settings(tmp_path, store_url, {"leads": {"type": "csv", "path": "x.csv"}})
    engine = SyncEngine(settings, db)
    try:
        for external, fields in PEOPLE.items():
            await engine.ingest("leads", [RawRecord("", "contact", {"id": external, **fields})])
    finally:
        engine.close()
    # As the batch clusters the same three records: C's strong link to A is held, because
    # C against B (a scored pair between them) contradicts it.
    contacts = [
        Contact(
            first_name=f["first_name"],
            last_name=f["last_name"],
            emails=[f["email"]],
            phones=[f["phone"]] if "phone" in f else [],
            city=f.get("city"),
        )
        for f in PEOPLE.values()
    ]
    batch = cluster(contacts).clusters
    names = list(PEOPLE)
    assert sorted(sorted(names[i] for i in g) for g in batch) == [["A", "B"], ["C"]]
    assert _groups(db) == [["A", "B"], ["C"]]
    with db.connect() as conn:
        held = conn.execute(
            select(review_item.c.explanation)
            .join(source_record, source_record.c.id == review_item.c.record_b)
            .where(source_record.c.external_id == "C")
        ).scalar_one()
    assert "matches golden record" in held["held"]
