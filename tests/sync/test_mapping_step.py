"""The map step: pages mapped on the helper process arrive as the in-process mapping gives them."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, date, datetime, timedelta, timezone

from crmhub.mapping import BUILTIN_MAPPINGS
from crmhub.records import RawRecord
from sync import mapping_step
from sync.mapping_step import (
    MAPPING_HELPERS,
    POOL_THRESHOLD,
    MappedRecord,
    PageMapper,
    Rejected,
    _map_packed,
    _pack_raw,
    _unpack,
    map_records,
)

CSV_MAPPING = BUILTIN_MAPPINGS / "csv.toml"


def _page(size: int) -> list[RawRecord]:
    """Contacts of every shape the writer takes: keys and a lone golden record, a dropped
    value (an issue), a record with no identity (rejected), times with and without an
    offset or none at all, non-ASCII text; and a deletion, which is not mapped."""
    records = []
    for i in range(size):
        payload = {
            "id": f"C-{i}",
            "first_name": "Zoë" if i % 3 else "Ann",
            "last_name": f"Łukasz-{i}",
            "email": f"person{i}@example.com" if i % 5 else "not an address",
            "phone": f"+1 415 555 {i % 10000:04d}" if i % 2 else "",
            "updated_at": ["2026-01-02T03:04:05+02:00", "2026-03-04T05:06:07.123456Z", ""][i % 3],
        }
        if i % 17 == 0:
            payload = {"id": f"C-{i}", "updated_at": ""}  # nothing to identify anyone by
        at = datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-5))) if i % 4 == 0 else None
        records.append(RawRecord(f"C-{i}", "contact", payload, at, f"row {i + 2}"))
    records.append(RawRecord("C-0", "deletion", {}))
    return records


def test_a_packed_page_unpacks_to_what_mapping_in_process_gives():
    records = _page(300)
    here = map_records(str(CSV_MAPPING), 0, "US", records, True, True, True)
    packed = _pack_raw(records)
    assert isinstance(packed, bytes)
    there = _unpack(_map_packed(str(CSV_MAPPING), 0, "US", packed, True, True, True))
    assert there == here
    assert [type(m) for m in there] == [type(m) for m in here]
    assert {type(m) for m in here} == {MappedRecord, Rejected}  # both kinds were packed
    assert any(m.issues for m in here if isinstance(m, MappedRecord))
    times = {m.updated_at for m in there if isinstance(m, MappedRecord)}
    assert None in times
    assert datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC) in times
    assert there[1].data == here[1].data  # the JSON text decodes on demand


async def test_pages_mapped_on_the_helper_process_equal_the_in_process_mapping(monkeypatch):
    from crmhub.mapping import load_mapping

    mapping = load_mapping(CSV_MAPPING)
    mapper = PageMapper("US", exact_keys=True)
    try:
        first = _page(POOL_THRESHOLD + 10)
        second = _page(POOL_THRESHOLD + 50)
        # The first big page starts the helper (and is mapped here); once it is up, the next
        # goes to it (packed both ways).
        await mapper.map(mapping, first)
        assert await asyncio.wrap_future(mapper._helpers[0].ready)
        packed: list[bytes] = []

        def watched(page: bytes) -> list[MappedRecord | Rejected]:
            packed.append(page)
            return _unpack(page)

        monkeypatch.setattr(mapping_step, "_unpack", watched)
        mapped = await mapper.map(mapping, second)
        assert len(packed) == 1  # the page came back from the helper
    finally:
        mapper.close()
    path = str(CSV_MAPPING)
    mtime = CSV_MAPPING.stat().st_mtime_ns
    assert mapped == map_records(path, mtime, "US", second, True, True, True)
    times = {m.updated_at for m in mapped if isinstance(m, MappedRecord)}
    assert datetime(2026, 1, 2, 1, 4, 5, tzinfo=UTC) in times


async def test_pages_mapped_at_once_go_to_a_second_helper_only_when_the_first_is_busy():
    """Pages mapped one after another keep one helper; pages mapped together (the engine maps
    ahead while it writes) start a second, and each page comes back as mapped here."""
    from crmhub.mapping import load_mapping

    mapping = load_mapping(CSV_MAPPING)
    path, mtime = str(CSV_MAPPING), CSV_MAPPING.stat().st_mtime_ns
    pages = [_page(POOL_THRESHOLD + n) for n in (10, 20, 30, 40)]
    mapper = PageMapper("US", exact_keys=True)
    try:
        await mapper.map(mapping, pages[0])  # starts the first helper
        assert await asyncio.wrap_future(mapper._helpers[0].ready)
        await mapper.map(mapping, pages[1])
        await mapper.map(mapping, pages[2])
        assert len(mapper._helpers) == 1  # never busy when the next page came
        together = await asyncio.gather(*(mapper.map(mapping, page) for page in pages))
        assert len(mapper._helpers) == MAPPING_HELPERS
        assert all(h.busy == 0 for h in mapper._helpers)
        pids = {h.pool._process.pid for h in mapper._helpers}
        assert len(pids) == MAPPING_HELPERS
    finally:
        mapper.close()
    assert mapper._helpers == []
    assert together == [map_records(path, mtime, "US", page, True, True, True) for page in pages]


def test_a_page_marshal_cannot_take_travels_as_records():
    """A payload value outside marshal's plain types (here a date) sends the page pickled."""
    records = _page(70)
    records[5].payload["birth_date"] = date(1990, 2, 3)
    assert _pack_raw(records) is records
    here = map_records(str(CSV_MAPPING), 0, "US", records, True, False, True)
    assert _unpack(_map_packed(str(CSV_MAPPING), 0, "US", records, True, False, True)) == here


async def test_a_killed_helper_costs_one_page_on_this_process_then_a_new_helper_takes_over():
    """A worker keeps its mapper for its whole life: a helper killed (the OOM killer) must not
    fail every later page. The page in hand is mapped here; the next big one starts another."""
    from crmhub.mapping import load_mapping

    mapping = load_mapping(CSV_MAPPING)
    path, mtime = str(CSV_MAPPING), CSV_MAPPING.stat().st_mtime_ns
    page = _page(POOL_THRESHOLD + 10)
    expected = map_records(path, mtime, "US", page, True, True, True)
    mapper = PageMapper("US", exact_keys=True)
    try:
        await mapper.map(mapping, page)  # starts the helper
        [helper] = mapper._helpers
        assert await asyncio.wrap_future(helper.ready)
        first = helper.pool._process.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        helper.pool._process.join(30)
        assert await mapper.map(mapping, page) == expected  # mapped here
        assert mapper._helpers == []
        await mapper.map(mapping, page)  # a new helper starts ...
        [helper] = mapper._helpers
        assert await asyncio.wrap_future(helper.ready)
        assert helper.pool._process.pid != first
        assert await mapper.map(mapping, page) == expected  # ... and maps
    finally:
        mapper.close()
