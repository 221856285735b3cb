"""Data quality per source: duplicate rate, field completeness, dead letters.

So stewards fix the source rather than the symptoms: a source with many duplicates or empty
fields shows up here before it fills the review queue.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import Connection, func, select

from sync.store import dead_letter, membership, source_record

__all__ = ["QUALITY_FIELDS", "source_quality"]

QUALITY_FIELDS = ("first_name", "last_name", "emails", "phones", "company", "job_title", "city")


def source_quality(conn: Connection) -> list[dict[str, Any]]:
    """One row per source: contacts, duplicate rate, completeness per field, dead letters."""
    shared = set(
        conn.execute(
            select(membership.c.golden_id).group_by(membership.c.golden_id).having(func.count() > 1)
        ).scalars()
    )
    records: dict[str, int] = defaultdict(int)
    duplicates: dict[str, int] = defaultdict(int)
    filled: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(QUALITY_FIELDS, 0))
    rows = conn.execute(
        select(source_record.c.source, source_record.c.data, membership.c.golden_id)
        .join(membership, membership.c.record_id == source_record.c.id)
        .where(source_record.c.kind == "contact", source_record.c.deleted == 0)
        .execution_options(yield_per=5000)
    )
    for source, data, golden_id in rows:
        records[source] += 1
        duplicates[source] += golden_id in shared
        for name in QUALITY_FIELDS:
            if (data or {}).get(name) not in (None, "", []):
                filled[source][name] += 1
    letters: dict[tuple[str, str], int] = {
        (str(s), str(scope)): int(n)
        for s, scope, n in conn.execute(
            select(dead_letter.c.source, dead_letter.c.scope, func.count()).group_by(
                dead_letter.c.source, dead_letter.c.scope
            )
        )
    }
    out = []
    for source in sorted(set(records) | {s for s, _ in letters}):
        total = records.get(source, 0)
        out.append(
            {
                "source": source,
                "contacts": total,
                "duplicate_rate": round(duplicates[source] / total, 4) if total else 0.0,
                "completeness": {
                    name: round(filled[source][name] / total, 4) if total else 0.0
                    for name in QUALITY_FIELDS
                },
                "dead_letters": letters.get((source, "record"), 0),
                "field_issues": letters.get((source, "field"), 0),
            }
        )
    return out
