"""Stage: upsert source records by (source, kind, external_id) with a content hash.

Unchanged records stop here, which makes re-runs and replays after a crash no-ops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import Connection, bindparam, select

from sync.store import allocate_ids, bulk_insert, one_of, source_record

__all__ = ["StageItem", "Staged", "chunks", "stage"]

T = TypeVar("T")
# Keeps IN (...) lists under SQLite's variable limit with room to spare.
CHUNK = 900


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(slots=True)
class StageItem:
    external_id: str
    content_hash: str
    payload: dict[str, Any]
    data: dict[str, Any]
    source_updated_at: datetime | None


@dataclass(slots=True)
class Staged:
    record_id: int
    item: StageItem
    status: Literal["new", "changed", "unchanged"]


def stage(conn: Connection, source: str, kind: str, items: list[StageItem]) -> list[Staged]:
    """Upsert `items` (unique external ids) and say which were new, changed or unchanged."""
    existing: dict[str, tuple[int, str, int]] = {}
    for part in chunks([i.external_id for i in items]):
        rows = conn.execute(
            select(
                source_record.c.external_id,
                source_record.c.id,
                source_record.c.content_hash,
                source_record.c.deleted,
            ).where(
                source_record.c.source == source,
                source_record.c.kind == kind,
                one_of(conn, source_record.c.external_id, part),
            )
        )
        existing.update({r[0]: (r[1], r[2], r[3]) for r in rows})
    now = datetime.now(UTC)
    results: list[Staged] = []
    new_items: list[StageItem] = []
    changed_rows: list[dict[str, Any]] = []
    for item in items:
        found = existing.get(item.external_id)
        if found is None:
            new_items.append(item)
        elif found[1] == item.content_hash and not found[2]:
            results.append(Staged(found[0], item, "unchanged"))
        else:
            results.append(Staged(found[0], item, "changed"))
            changed_rows.append(
                {
                    "b_id": found[0],
                    "content_hash": item.content_hash,
                    "payload": item.payload,
                    "data": item.data,
                    "source_updated_at": item.source_updated_at,
                    "staged_at": now,
                    "deleted": 0,
                }
            )
    if changed_rows:
        conn.execute(
            source_record.update().where(source_record.c.id == bindparam("b_id")),
            changed_rows,
        )
    if new_items:
        ids = allocate_ids(conn, source_record, len(new_items))
        bulk_insert(
            conn,
            source_record,
            [
                {
                    "id": record_id,
                    "source": source,
                    "kind": kind,
                    "external_id": i.external_id,
                    "content_hash": i.content_hash,
                    "payload": i.payload,
                    "data": i.data,
                    "source_updated_at": i.source_updated_at,
                    "staged_at": now,
                    "deleted": 0,
                }
                for record_id, i in zip(ids, new_items, strict=True)
            ],
        )
        results.extend(Staged(rid, item, "new") for rid, item in zip(ids, new_items, strict=True))
    return results
