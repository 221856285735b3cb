"""Stage: upsert source records by (source, kind, external_id) with a content hash.

Unchanged records stop here, which makes re-runs and replays after a crash no-ops. A contact
whose content changed is compared with what was staged before: fields it lost become
blank-overwrite incidents (sync/blanks.py), written in the page's transaction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import orjson
from sqlalchemy import Connection, bindparam, select

from sync.blanks import record_blanks
from sync.store import allocate_ids, bind_values, insert_rows, one_of, source_record

__all__ = ["LONG_CHUNK", "StageItem", "Staged", "chunks", "stage"]

T = TypeVar("T")
# Keeps IN (...) lists under SQLite's variable limit with room to spare.
CHUNK = 900
# A list that travels as one parameter (`sync.store.one_of`) can be longer: fewer statements.
LONG_CHUNK = 10_000


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# source_record's columns as `stage` inserts them.
_COLUMNS = (
    "id",
    "source",
    "kind",
    "external_id",
    "content_hash",
    "payload",
    "data",
    "source_updated_at",
    "staged_at",
    "deleted",
)


@dataclass(slots=True)
class StageItem:
    """A mapped record to stage; payload and data as the store's JSON text (`json_text`)."""

    external_id: str
    content_hash: str
    payload_json: str
    data_json: str
    source_updated_at: datetime | None
    _data: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = orjson.loads(self.data_json)
        return self._data


@dataclass(slots=True)
class Staged:
    record_id: int
    item: StageItem
    status: Literal["new", "changed", "unchanged"]


def stage(
    conn: Connection,
    source: str,
    kind: str,
    items: list[StageItem],
    run_id: int | None = None,
) -> list[Staged]:
    """Upsert `items` (unique external ids) and say which were new, changed or unchanged.

    Contacts that changed get their lost fields recorded (`run_id` names the run, if any)."""
    existing: dict[str, tuple[int, str, int]] = {}
    for part in chunks([i.external_id for i in items], LONG_CHUNK):
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
    # Live contacts whose content changed: the only rows whose old data is read (a deleted
    # record coming back had no live value to lose).
    compare: list[tuple[int, StageItem]] = []
    for item in items:
        found = existing.get(item.external_id)
        if found is None:
            new_items.append(item)
        elif found[1] == item.content_hash and not found[2]:
            results.append(Staged(found[0], item, "unchanged"))
        else:
            results.append(Staged(found[0], item, "changed"))
            if kind == "contact" and not found[2]:
                compare.append((found[0], item))
            changed_rows.append(
                {
                    "b_id": found[0],
                    "content_hash": item.content_hash,
                    "payload": orjson.loads(item.payload_json),
                    "data": item.data,
                    "source_updated_at": item.source_updated_at,
                    "staged_at": now,
                    "deleted": 0,
                    "alias_of": None,  # listed again: no longer merged away (sync/aliases.py)
                }
            )
    if changed_rows:
        if compare:
            _record_blanks(conn, source, compare, run_id, now)
        conn.execute(
            source_record.update().where(source_record.c.id == bindparam("b_id")),
            changed_rows,
        )
    if new_items:
        ids = allocate_ids(conn, source_record, len(new_items))
        updated = bind_values(
            conn, source_record.c.source_updated_at, [i.source_updated_at for i in new_items]
        )
        staged_at = bind_values(conn, source_record.c.staged_at, [now])[0]
        insert_rows(
            conn,
            source_record,
            _COLUMNS,
            [
                (
                    rid,
                    source,
                    kind,
                    i.external_id,
                    i.content_hash,
                    i.payload_json,
                    i.data_json,
                    at,
                    staged_at,
                    0,
                )
                for rid, i, at in zip(ids, new_items, updated, strict=True)
            ],
        )
        results.extend(Staged(rid, item, "new") for rid, item in zip(ids, new_items, strict=True))
    return results


def _record_blanks(
    conn: Connection,
    source: str,
    compare: list[tuple[int, StageItem]],
    run_id: int | None,
    now: datetime,
) -> None:
    """Read the stored data of `compare` (live records whose content hash changed) before the
    update overwrites it, and record the fields each lost."""
    old: dict[int, dict[str, Any]] = {}
    for part in chunks([rid for rid, _ in compare]):
        rows = conn.execute(
            select(source_record.c.id, source_record.c.data).where(
                one_of(conn, source_record.c.id, part)
            )
        )
        old.update(dict(rows.all()))
    record_blanks(
        conn,
        source,
        ((rid, item.external_id, old.get(rid), item.data) for rid, item in compare),
        run_id,
        now,
    )
