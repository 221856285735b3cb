"""Data quality per source: duplicate rate, field completeness, dead letters, and
blank-overwrite incidents (a re-sent record without a value it had before; sync/blanks.py).

So stewards fix the source rather than the symptoms: a source with many duplicates, empty
fields or values it keeps blanking shows up here before it fills the review queue.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, case, func, select

from sync.blanks import is_empty
from sync.store import (
    blank_overwrite,
    dead_letter,
    golden_record,
    live_contact,
    membership,
    source_record,
)

__all__ = ["BLANKS_WINDOW", "QUALITY_FIELDS", "blank_incidents", "blank_summary", "source_quality"]

QUALITY_FIELDS = ("first_name", "last_name", "emails", "phones", "company", "job_title", "city")
BLANKS_WINDOW = timedelta(days=30)


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
        .where(live_contact)
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
    blanks = blank_summary(conn)
    out = []
    for source in sorted(set(records) | {s for s, _ in letters} | set(blanks)):
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
                "blank_overwrites": blanks.get(source, _no_blanks()),
            }
        )
    return out


def _no_blanks() -> dict[str, Any]:
    return {"total": 0, "last_30_days": 0, "fields": []}


def blank_summary(conn: Connection, now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """Per source: blank-overwrite incidents in total and in the last 30 days, and per field
    (most affected first)."""
    since = (now or datetime.now(UTC)) - BLANKS_WINDOW
    recent = func.sum(case((blank_overwrite.c.detected_at >= since, 1), else_=0))
    out: dict[str, dict[str, Any]] = defaultdict(_no_blanks)
    rows = conn.execute(
        select(blank_overwrite.c.source, blank_overwrite.c.field, func.count(), recent)
        .group_by(blank_overwrite.c.source, blank_overwrite.c.field)
        .order_by(blank_overwrite.c.source, func.count().desc(), blank_overwrite.c.field)
    )
    for source, field, total, last in rows:
        summary = out[str(source)]
        summary["total"] += int(total)
        summary["last_30_days"] += int(last or 0)
        summary["fields"].append(
            {"field": str(field), "total": int(total), "last_30_days": int(last or 0)}
        )
    return dict(out)


def blank_incidents(
    conn: Connection, source: str | None = None, *, limit: int = 50, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """Blank-overwrite incidents (of one source, or all), newest first, and how many.

    Each names the field, the record (and its golden record) and whether the golden record
    still has a value for the field now, from another member (survivorship kept one)."""
    where = [blank_overwrite.c.source == source] if source else []
    total = int(
        conn.execute(select(func.count()).select_from(blank_overwrite).where(*where)).scalar_one()
    )
    rows = conn.execute(
        select(
            blank_overwrite.c.id,
            blank_overwrite.c.source,
            blank_overwrite.c.field,
            blank_overwrite.c.external_id,
            blank_overwrite.c.record_id,
            blank_overwrite.c.run_id,
            blank_overwrite.c.detected_at,
            membership.c.golden_id,
            golden_record.c.fields,
        )
        .outerjoin(membership, membership.c.record_id == blank_overwrite.c.record_id)
        .outerjoin(golden_record, golden_record.c.id == membership.c.golden_id)
        .where(*where)
        .order_by(blank_overwrite.c.detected_at.desc(), blank_overwrite.c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    items = [
        {
            "id": r.id,
            "source": r.source,
            "field": r.field,
            "external_id": r.external_id,
            "record_id": r.record_id,
            "golden_id": r.golden_id,
            "golden_has_value": r.fields is not None and not is_empty(r.fields.get(r.field)),
            "run_id": r.run_id,
            "detected_at": r.detected_at.isoformat(),
        }
        for r in rows
    ]
    return items, total
