"""Map step: raw records -> canonical data, in-process or on a helper process.

Mapping is pure CPU (phone parsing, validation, hashing), so big pages are mapped on a helper
process while the previous page is written: the two cores of a small machine both work. The
function is the same either way; small pages (webhooks, demos) never pay for the round trip.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from crmhub.mapping import Mapping, content_hash, load_mapping, record_data
from crmhub.records import Activity, Contact, RawRecord

__all__ = ["MappedRecord", "PageMapper", "Rejected", "map_records"]

# Below this many records a page is mapped in-process: the round trip costs more than it saves.
POOL_THRESHOLD = 256


@dataclass(slots=True)
class MappedRecord:
    index: int  # position in the page, for the payload
    kind: str
    external_id: str
    origin: str
    content_hash: str
    data: dict[str, Any]
    updated_at: datetime | None
    issues: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class Rejected:
    index: int
    origin: str
    reason: str


@lru_cache(maxsize=32)
def _mapping(path: str, mtime_ns: int) -> Mapping:
    return load_mapping(Path(path))


def _map_one(mapping: Mapping, raw: RawRecord, index: int, region: str) -> MappedRecord | Rejected:
    origin = raw.origin or raw.external_id
    try:
        result = (
            mapping.map_contact(raw.payload, region)
            if raw.kind == "contact"
            else mapping.map_activity(raw.payload)
        )
    except ValueError as exc:
        return Rejected(index, origin, str(exc))
    model = result.record
    if isinstance(model, Contact) and not model.has_identity():
        return Rejected(index, origin, "no identity: the record has no email, phone or name")
    digest = content_hash(raw.payload)
    external_id = raw.external_id or result.external_id
    if not external_id:
        # No id at the source: the primary email identifies a contact, else its content.
        primary = model.primary_email if isinstance(model, Contact) else None
        external_id = primary or f"hash:{digest}"
    updated = result.updated_at or raw.updated_at
    if updated is None:
        updated = model.occurred_at if isinstance(model, Activity) else model.source_updated_at
    return MappedRecord(
        index,
        raw.kind,
        external_id,
        origin,
        digest,
        record_data(model),
        updated,
        [(i.field, i.reason) for i in result.issues],
    )


def map_records(
    mapping_path: str, mtime_ns: int, region: str, records: list[RawRecord]
) -> list[MappedRecord | Rejected]:
    """Map every non-deletion record of a page; never raises for a bad record."""
    mapping = _mapping(mapping_path, mtime_ns)
    return [
        _map_one(mapping, raw, index, region)
        for index, raw in enumerate(records)
        if raw.kind != "deletion"
    ]


class PageMapper:
    """Maps pages, on a helper process when a page is big and there is a core to spare."""

    def __init__(self, region: str) -> None:
        self.region = region
        self._pool: Executor | None = None
        self._use_pool = (os.cpu_count() or 1) > 1

    async def map(
        self, mapping: Mapping, records: list[RawRecord]
    ) -> list[MappedRecord | Rejected]:
        path = str(mapping.path)
        mtime = mapping.path.stat().st_mtime_ns if mapping.path.exists() else 0
        if not self._use_pool or len(records) < POOL_THRESHOLD:
            return map_records(path, mtime, self.region, records)
        if self._pool is None:
            # spawn: a forked copy of a process with threads and open connections is unsafe.
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, map_records, path, mtime, self.region, records
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
