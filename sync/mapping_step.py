"""Map step: raw records -> canonical data, in-process or on a helper process.

Mapping is pure CPU (phone parsing, validation, hashing), so big pages are mapped on a helper
process while the previous page is written: the two cores of a small machine both work. The
function is the same either way; small pages (webhooks, demos) never pay for the round trip.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import os
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from operator import attrgetter
from pathlib import Path
from typing import Any

import orjson

from crmhub.mapping import Mapping, content_hash, json_text, load_mapping, record_data
from crmhub.records import Activity, Contact, RawRecord
from dedupe import ExactMatcher
from dedupe.survivorship import solo
from sync.helper import HelperProcess, helper_pool

__all__ = ["MappedRecord", "PageMapper", "Rejected", "map_records"]

log = logging.getLogger("crmhub.sync")

# Below this many records a page is mapped in-process: the round trip (about 1 us a record
# each way) costs more than it saves. Vendor APIs page by 100, so they use the helper.
POOL_THRESHOLD = 64
# The engine maps pages ahead while it writes one, so two can be mapping at once: with one
# helper, a 1M-contact CSV's staging had the helper at a full core and this process at half
# of one. A second helper starts only when a page finds the first busy.
MAPPING_HELPERS = 2


@dataclass(slots=True)
class MappedRecord:
    """A mapped record. Mapped for the writer (`map_records(..., for_writer=True)`), what the
    store keeps travels as JSON text (`json_text`), so the writer neither decodes nor encodes
    it, and only that text crosses from the mapping process (`_pack`); `data` decodes on
    demand."""

    index: int  # position in the page, for the payload
    kind: str
    external_id: str
    origin: str
    content_hash: str
    updated_at: datetime | None
    issues: list[tuple[str, str]] = field(default_factory=list)
    # For the writer, which has no core to spare: the mapped Contact / Activity and the raw
    # payload as JSON text, the exact matcher's keys (when that is the matcher), and a
    # contact's golden record were it alone: its fields as JSON text and its lineage keys
    # (`dedupe.survivorship.solo`).
    data_json: str | None = None
    payload_json: str | None = None
    keys: list[tuple[str, str]] | None = None
    solo: tuple[str, list[str]] | None = None
    _data: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def data(self) -> dict[str, Any]:
        """The mapped record as `record_data` gives it."""
        if self._data is None:
            self._data = orjson.loads(self.data_json or "{}")
        return self._data


@dataclass(slots=True)
class Rejected:
    index: int
    origin: str
    reason: str


_EXACT = ExactMatcher()


@lru_cache(maxsize=32)
def _mapping(path: str, mtime_ns: int) -> Mapping:
    return load_mapping(Path(path))


def _map_one(
    mapping: Mapping,
    raw: RawRecord,
    index: int,
    region: str,
    for_writer: bool,
    exact_keys: bool,
    with_solo: bool = True,
) -> MappedRecord | Rejected:
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
    data = record_data(model)
    mapped = MappedRecord(
        index,
        raw.kind,
        external_id,
        origin,
        digest,
        updated,
        [(i.field, i.reason) for i in result.issues],
        _data=data,
    )
    if for_writer:
        mapped.data_json = json_text(data)
        mapped.payload_json = json_text(raw.payload)
        if isinstance(model, Contact):
            if with_solo:
                fields, lineage = solo(data, updated)
                mapped.solo = (json_text(fields), lineage)
            if exact_keys:
                mapped.keys = [(k.kind, k.value) for k in _EXACT.keys(model)]
    return mapped


def map_records(
    mapping_path: str,
    mtime_ns: int,
    region: str,
    records: list[RawRecord],
    for_writer: bool = False,
    exact_keys: bool = False,
    with_solo: bool = True,
) -> list[MappedRecord | Rejected]:
    """Map every non-deletion record of a page; never raises for a bad record.

    `for_writer`: also fill in what the pipeline's writer takes (`MappedRecord`'s JSON texts
    and, `with_solo`, `solo`); `exact_keys`: and each contact's exact-matcher keys."""
    mapping = _mapping(mapping_path, mtime_ns)
    return [
        _map_one(mapping, raw, index, region, for_writer, exact_keys, with_solo)
        for index, raw in enumerate(records)
        if raw.kind != "deletion"
    ]


# MappedRecord's fields in constructor order, as `_pack` sends them (`_data` stays behind).
_PACKED = (
    "index",
    "kind",
    "external_id",
    "origin",
    "content_hash",
    "updated_at",
    "issues",
    "data_json",
    "payload_json",
    "keys",
    "solo",
)
_UPDATED = _PACKED.index("updated_at")


def _map_packed(
    path: str,
    mtime_ns: int,
    region: str,
    records: bytes | list[RawRecord],
    *options: bool,
) -> bytes:
    """`map_records` on the helper process: a page `_pack_raw`ed there, `_pack`ed back."""
    return _pack(map_records(path, mtime_ns, region, _unpack_raw(records), *options))


def _iso(times: list[datetime | None]) -> list[str | None]:
    """Time stamps as marshal takes them (ISO text keeps naive and aware times apart)."""
    return [at.isoformat() if at else None for at in times]


def _times(texts: list[str | None]) -> list[datetime | None]:
    """`_iso`'s time stamps again."""
    return [datetime.fromisoformat(at) if at else None for at in texts]


def _pack_raw(records: list[RawRecord]) -> bytes | list[RawRecord]:
    """A page of raw records for the helper as marshalled columns (7 ms for 10,000 CSV rows
    on this process, against 19 to pickle the records); the records themselves, pickled,
    when a payload holds what marshal does not take (a date, a subclass of str or dict)."""
    try:
        return marshal.dumps(
            (
                [r.external_id for r in records],
                [r.kind for r in records],
                [r.payload for r in records],
                _iso([r.updated_at for r in records]),
                [r.origin for r in records],
            )
        )
    except ValueError:
        return records


def _unpack_raw(packed: bytes | list[RawRecord]) -> list[RawRecord]:
    """`_pack_raw`'s page again (on the helper)."""
    if not isinstance(packed, bytes):
        return packed
    ids, kinds, payloads, times, origins = marshal.loads(packed)
    return list(map(RawRecord, ids, kinds, payloads, _times(times), origins))


def _pack(items: list[MappedRecord | Rejected]) -> bytes:
    """A mapped page as columns of plain values for `marshal`: the helper's time limits a
    bulk load as much as the writer's, and this packs a 10,000-record page in 40 ms where
    pickling each record took 55; unpacking is a little cheaper too (26 vs 29 ms)."""
    mapped = [m for m in items if isinstance(m, MappedRecord)]
    rejected = [(r.index, r.origin, r.reason) for r in items if isinstance(r, Rejected)]
    columns = [[getattr(m, name) for m in mapped] for name in _PACKED]
    columns[_UPDATED] = _iso(columns[_UPDATED])
    return marshal.dumps((columns, rejected))


def _unpack(packed: bytes) -> list[MappedRecord | Rejected]:
    """`_pack`'s page again, in page order."""
    columns, rejected = marshal.loads(packed)
    columns[_UPDATED] = _times(columns[_UPDATED])
    items: list[MappedRecord | Rejected] = list(map(MappedRecord, *columns))
    if rejected:
        items += [Rejected(*r) for r in rejected]
        items.sort(key=attrgetter("index"))
    return items


@dataclass(slots=True)
class _Helper:
    pool: HelperProcess
    ready: Future[bool]  # done once it has started
    busy: int = 0  # pages it is mapping or has waiting


class PageMapper:
    """Maps pages, on helper processes when a page is big and there is a core to spare."""

    def __init__(self, region: str, exact_keys: bool = False) -> None:
        self.region = region
        self.exact_keys = exact_keys
        self._helpers: list[_Helper] = []
        self._use_pool = (os.cpu_count() or 1) > 1

    def _helper(self) -> _Helper | None:
        """The least busy helper that has started. One is started for the first big page,
        another (up to `MAPPING_HELPERS`) when a page finds every one busy. None until one
        has started: it imports for a second or more, and pages are mapped here meanwhile."""
        if len(self._helpers) < MAPPING_HELPERS and all(h.busy for h in self._helpers):
            self._helpers.append(_Helper(*helper_pool()))
        started = [h for h in self._helpers if h.ready.done()]
        return min(started, key=attrgetter("busy"), default=None)

    async def map(
        self,
        mapping: Mapping,
        records: list[RawRecord],
        *,
        inline: bool = False,
        with_solo: bool = True,
    ) -> list[MappedRecord | Rejected]:
        """Map `records`; on a helper process for big pages unless `inline`. Without
        `with_solo` no lone golden record is worked out (pages only staged, whose golden
        records a first load's batch makes)."""
        path = str(mapping.path)
        mtime = mapping.path.stat().st_mtime_ns if mapping.path.exists() else 0
        where = (path, mtime, self.region)
        options = (True, self.exact_keys, with_solo)  # for the writer
        if inline or not self._use_pool or len(records) < POOL_THRESHOLD:
            return map_records(*where, records, *options)
        helper = self._helper()
        if helper is None:
            return map_records(*where, records, *options)
        loop = asyncio.get_running_loop()
        page = _pack_raw(records)
        helper.busy += 1
        try:
            packed = await loop.run_in_executor(helper.pool, _map_packed, *where, page, *options)
        except BrokenProcessPool:
            # The helper was killed (the out-of-memory killer): a worker keeps its mapper for
            # good, so this page is mapped here and a later big one starts a new helper.
            log.warning("a mapping helper process ended; mapping here, starting a new one")
            self._stop(helper)
            return map_records(*where, records, *options)
        finally:
            helper.busy -= 1
        return _unpack(packed)

    def _stop(self, helper: _Helper) -> None:
        if helper in self._helpers:
            self._helpers.remove(helper)
            helper.pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        for helper in list(self._helpers):
            self._stop(helper)
