"""Folding one golden record into another (the pipeline's merge and a rebuild share it)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select

from sync.golden import fold_golden
from sync.store import field_choice, golden_record, membership, source_record

NOW = datetime(2026, 11, 25, tzinfo=UTC)


def test_fold_moves_members_aliases_and_the_stewards_untaken_choices(db):
    with db.begin() as conn:
        for rid in (1, 2, 3):
            conn.execute(
                source_record.insert().values(
                    id=rid,
                    source="crm",
                    kind="contact",
                    external_id=str(rid),
                    content_hash="h",
                    payload={},
                    data={},
                    staged_at=NOW,
                )
            )
        for gid in (10, 20, 30):
            conn.execute(
                golden_record.insert().values(
                    id=gid, fields={}, lineage={}, created_at=NOW, updated_at=NOW
                )
            )
        conn.execute(golden_record.update().where(golden_record.c.id == 30).values(merged_into=20))
        conn.execute(
            membership.insert(),
            [
                {"record_id": 1, "golden_id": 10, "method": "new", "decided_at": NOW},
                {"record_id": 2, "golden_id": 20, "method": "new", "decided_at": NOW},
                {"record_id": 3, "golden_id": 20, "method": "auto", "decided_at": NOW},
            ],
        )
        choice = {"created_by": "sam", "created_at": NOW}
        conn.execute(
            field_choice.insert(),
            [
                {"golden_id": 10, "field": "company", "record_id": 1, **choice},
                {"golden_id": 20, "field": "company", "record_id": 2, **choice},
                {"golden_id": 20, "field": "job_title", "record_id": 3, **choice},
            ],
        )

        fold_golden(conn, 20, 10, NOW)

        members = dict(conn.execute(select(membership.c.record_id, membership.c.golden_id)).all())
        assert members == {1: 10, 2: 10, 3: 10}
        merged = dict(conn.execute(select(golden_record.c.id, golden_record.c.merged_into)).all())
        assert merged == {10: None, 20: 10, 30: 10}  # the earlier alias resolves too
        choices = set(
            conn.execute(
                select(field_choice.c.golden_id, field_choice.c.field, field_choice.c.record_id)
            )
        )
        # The survivor keeps its own company choice; the alias's job title choice moves over.
        assert choices == {(10, "company", 1), (20, "company", 2), (10, "job_title", 3)}
