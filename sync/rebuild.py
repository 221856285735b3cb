"""`crmhub rebuild`, the plan: what re-mapping and re-matching the whole store would change.

Nothing is fetched again: every live record's stored raw payload is mapped with the current
mapping of its connector, every contact is clustered in memory by the batch clusterer with the
configured matcher (steward constraints honoured), and the result is compared with the
store's memberships. `plan_rebuild` only reads (an apply may have it write the match_key
rows while it clusters); sync/rebuild_apply.py writes a plan.

Stable golden ids: each old golden record goes with the new cluster that holds most of its
members (ties: the cluster with the lowest record id); a cluster keeps the oldest (lowest)
id among the golden records that went with it, and the others become aliases of it; a
cluster no old golden record went with (a split-off part, or records never matched) gets a
new id. So a golden record keeps its id when members join or leave, the larger part of a
split keeps it, and when clusters merge the older id survives.
"""

from __future__ import annotations

import sys
import threading
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import orjson
from sqlalchemy import Connection, Text, cast, literal, select

from crmhub.errors import DedupeError
from crmhub.records import RawRecord
from crmhub.settings import Settings
from dedupe import ExactMatcher
from dedupe.cluster import (
    SCORING_THREADS,
    KeyIndex,
    cluster_prepared,
    collection_paused,
    frequency_table,
    link,
)
from dedupe.matcher import FellegiSunterMatcher
from dedupe.normalize import Prepared
from dedupe.scoring import MIN_POPULATION, Frequencies, Params
from dedupe.survivorship import Member
from sync.batch_prepare import BatchPreparer, Staged, contact_of, rows_json
from sync.forms import split_row
from sync.frequencies import counted_for, kept_counts
from sync.golden import MAX_BLOCK
from sync.key_lookup import key_counts
from sync.mapping_step import MappedRecord, Rejected, map_records
from sync.model_params import active_params
from sync.sources import load_source
from sync.store import (
    match_key,
    membership,
    merge_constraint,
    one_of,
    review_item,
    source_record,
)

__all__ = [
    "BatchStopped",
    "Failure",
    "KeyRows",
    "RebuildPlan",
    "RebuildRefusedError",
    "SourceCounts",
    "StagedData",
    "plan_rebuild",
    "stop_if_asked",
]

CHUNK_ROWS = 5_000  # stored records read and re-mapped at a time
_MASK = (1 << 64) - 1


class RebuildRefusedError(DedupeError):
    """A rebuild would move more records than `[matching] rebuild_max_moved_share` allows."""


@dataclass(slots=True)
class Failure:
    """A stored payload the current mapping rejects (the record keeps its staged data)."""

    record_id: int
    source: str
    external_id: str
    reason: str
    payload: Any


@dataclass(slots=True)
class SourceCounts:
    records: int = 0
    remapped: int = 0
    failed: int = 0
    moved: int = 0


class KeyRows:
    """Every contact's match_key rows (kind, value), compact: one JSON string per contact
    (about 0.5 KB for the usual 17 rows, against 2.3 KB as tuples of strings; 1M contacts
    took several GB that way), and an order-free fingerprint of each (sum of hashes, count)
    to compare with the stored rows; and each contact's prepared form for `contact_form`
    (sync/forms.py), when the matcher prepares contacts."""

    __slots__ = ("_blobs", "_counts", "_forms", "_ids", "_sums")

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._blobs: list[str] = []
        self._forms: list[str] = []  # `sync.forms.form_row`s; "" for none
        self._sums = array("Q")
        self._counts = array("I")

    def add(self, record_id: int, keys: Iterable[tuple[str, str]]) -> None:
        rows = list(keys)
        self.add_encoded(record_id, rows_json(rows), rows)

    def add_encoded(
        self, record_id: int, blob: str, rows: Sequence[tuple[str, str]], form: str = ""
    ) -> None:
        """`add`, with the rows as JSON text made already (`rows_json`, on another process),
        and the contact's form row."""
        self._ids.append(record_id)
        self._blobs.append(blob)
        self._forms.append(form)
        self._sums.append(sum(map(hash, rows)) & _MASK)
        self._counts.append(len(rows))

    def __len__(self) -> int:
        return len(self._ids)

    def items(self) -> Iterator[tuple[int, list[tuple[str, str]]]]:
        """(record id, its rows), in the order they were added."""
        for rid, blob in zip(self._ids, self._blobs, strict=True):
            yield rid, [(kind, value) for kind, value in orjson.loads(blob)]

    def json_slices(self, rows: int) -> Iterator[str]:
        """The rows as JSON text, `[[record id, [[kind, value], ...]], ...]`, in the order
        they were added, about `rows` key rows a slice: SQLite takes a slice in one
        statement (`json_each`), parsing and inserting it without holding the GIL."""
        part: list[str] = []
        count = 0
        for rid, blob, n in zip(self._ids, self._blobs, self._counts, strict=True):
            part.append(f"[{rid},{blob}]")
            count += n
            if count >= rows:
                yield f"[{','.join(part)}]"
                part, count = [], 0
        if part:
            yield f"[{','.join(part)}]"

    def forms(self) -> Iterator[tuple[int, str, str]]:
        """(record id, digest, form) of the contacts that have a form, in the order added."""
        for rid, row in zip(self._ids, self._forms, strict=True):
            if row:
                yield rid, *split_row(row)

    def form_slices(self, rows: int) -> Iterator[str]:
        """The forms as JSON text, `[[record id, "digest", [fields...]], ...]`, `rows` a
        slice (SQLite inserts a slice in one statement, as `json_slices`)."""
        part: list[str] = []
        for rid, digest, form in self.forms():
            part.append(f'[{rid},"{digest}",{form}]')
            if len(part) >= rows:
                yield f"[{','.join(part)}]"
                part = []
        if part:
            yield f"[{','.join(part)}]"

    def fingerprints(self) -> Iterator[tuple[int, tuple[int, int]]]:
        """(record id, (sum of the rows' hashes mod 2^64, number of rows))."""
        return zip(self._ids, zip(self._sums, self._counts, strict=True), strict=True)


@dataclass(slots=True)
class StagedData:
    """Every contact's data as the plan read it (the store's JSON text, or a re-mapping's
    new data), its recency and source, in id order: survivorship's input, so the apply
    survives golden records without reading every member back (at 1M contacts that took
    9 s of the first load's apply)."""

    ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    data: list[str | dict[str, Any]] = field(default_factory=list)
    updated: list[datetime | None] = field(default_factory=list)

    def members_of(self, target: dict[int, int]) -> dict[int, list[int]]:
        """The positions of each golden record's members, by `target` (contact -> golden)."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, rid in enumerate(self.ids):
            groups[target[rid]].append(i)
        return groups

    def member(self, i: int) -> Member:
        data = self.data[i]
        decoded = orjson.loads(data) if isinstance(data, str) else data
        return Member(self.ids[i], self.updated[i], decoded, self.sources[i])


@dataclass(slots=True)
class RebuildPlan:
    """What a rebuild would do. Golden ids below 0 stand for golden records to create."""

    contacts: int = 0
    activities: int = 0
    matcher: str = ""
    # record id -> (new data, new source_updated_at) for records whose mapping changed
    remapped: dict[int, tuple[dict[str, Any], datetime | None]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    unconfigured: list[str] = field(default_factory=list)  # sources kept as staged
    target: dict[int, int] = field(default_factory=dict)  # contact -> golden id
    current: dict[int, int] = field(default_factory=dict)  # contact -> golden id now
    # contact -> the borderline link that placed it (`dedupe.cluster.kept_probability`):
    # as the clustering found it, and as its membership has it now (any probability kept)
    borderline: dict[int, float] = field(default_factory=dict)
    kept: dict[int, float] = field(default_factory=dict)
    steward: set[int] = field(default_factory=set)  # contacts with a steward membership
    aliases: dict[int, int] = field(default_factory=dict)  # old golden -> survivor
    keys: KeyRows = field(default_factory=KeyRows)  # match_key rows per contact
    keys_outdated: int = 0
    keys_written: bool = False  # `plan_rebuild(write_keys=...)` stored them already
    # A local batch (`plan_rebuild(only=...)`, sync/borderline.py): these contacts only, weighed
    # with the whole store's size and counts; their match_key rows are left as stored.
    local: bool = False
    staged: StagedData | None = None  # kept for an apply (`plan_rebuild(write_keys=...)`)
    reviews_settled: int = 0  # open review items the apply closed: their records merged
    # uncertain pairs (record a < record b, probability, the matcher's explanation)
    reviews: list[tuple[int, int, float, dict[str, Any]]] = field(default_factory=list)
    clusters: dict[str, int] = field(default_factory=dict)  # kept / changed / merged / ...
    goldens_split: int = 0
    per_source: dict[str, SourceCounts] = field(default_factory=dict)
    # seconds taken: reading and preparing the contacts (and on how many the helper worked),
    # clustering them (`match_seconds`: before the match_key writer beside it was done too);
    # for the log (`crmhub -v`), not the summary
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def moved(self) -> list[int]:
        """Contacts whose golden record changes (new ids included)."""
        return sorted(r for r, g in self.target.items() if self.current.get(r) != g)

    @property
    def moved_share(self) -> float:
        return self._share(len(self.moved))

    def _share(self, count: int) -> float:
        return count / self.contacts if self.contacts else 0.0

    @property
    def changes_anything(self) -> bool:
        return bool(self.remapped or self.moved or self.aliases or self.keys_outdated)

    def summary(self) -> dict[str, Any]:
        """The plan as JSON-ready figures: ids and counts, never personal data."""
        moved = len(self.moved)  # a pass over every contact: once
        return {
            "matcher": self.matcher,
            "contacts": self.contacts,
            "activities": self.activities,
            "remapped": len(self.remapped),
            "failed": len(self.failures),
            "failures": [
                {"record_id": f.record_id, "source": f.source, "reason": f.reason}
                for f in self.failures[:20]
            ],
            "unconfigured_sources": self.unconfigured,
            "match_keys_outdated": self.keys_outdated,
            "clusters": dict(self.clusters),
            "goldens_split": self.goldens_split,
            "goldens_merged": len(self.aliases),
            "aliases": {str(a): s for a, s in sorted(self.aliases.items())},
            "records_moved": moved,
            "moved_share": round(self._share(moved), 6),
            "reviews": len(self.reviews),
            "per_source": {
                name: {
                    "records": c.records,
                    "remapped": c.remapped,
                    "failed": c.failed,
                    "moved": c.moved,
                }
                for name, c in sorted(self.per_source.items())
            },
        }


def _json_form(value: Any) -> Any:
    """`value` as the store gives it back (JSON round trip), so comparisons are exact."""
    return orjson.loads(orjson.dumps(value, default=str))


def _mapping_of(settings: Settings, name: str) -> tuple[str, int] | None:
    """The current mapping of source `name` (path, mtime: `map_records`' cache key), or None
    when the connector is no longer configured."""
    if name not in settings.connectors:
        return None
    mapping = load_source(settings, name).mapping
    return str(mapping.path), mapping.path.stat().st_mtime_ns if mapping.path.exists() else 0


def _remap(
    conn: Connection,
    settings: Settings,
    plan: RebuildPlan,
    remap: bool = True,
    only: Sequence[int] | None = None,
) -> Iterator[Staged]:
    """Map every live record's payload again, `CHUNK_ROWS` rows at a time in id order, and
    yield each contact's (id, source, data); activities are counted. Rows (payloads) are
    dropped chunk by chunk: a 1M-record store never holds them all at once. Without `remap`
    the staged data is taken as it is, and the columns only a re-mapping needs are not read.
    Staged data comes as the store's JSON text: validating a contact from text is faster
    than decoding it first. `only`: these records alone."""
    only_remap = (source_record.c.external_id, source_record.c.payload)
    live = source_record.c.deleted == 0
    if only is not None:
        live = live & one_of(conn, source_record.c.id, only)
    rows = conn.execute(
        select(
            source_record.c.id,
            source_record.c.source,
            source_record.c.kind,
            cast(source_record.c.data, Text).label("data"),
            source_record.c.source_updated_at,
            *(c if remap else literal(None).label(c.name) for c in only_remap),
        )
        .where(live)
        .order_by(source_record.c.id)
        .execution_options(yield_per=CHUNK_ROWS)
    )
    mappings: dict[str, tuple[str, int] | None] = {}
    for chunk in rows.partitions():
        mapped = _map_chunk(chunk, settings, plan, mappings) if remap else {}
        for row in chunk:
            counts = plan.per_source.setdefault(row.source, SourceCounts())
            counts.records += row.kind == "contact"
            data: str | dict[str, Any] = row.data
            updated = row.source_updated_at
            result = mapped.get(row.id)
            if isinstance(result, MappedRecord):
                new = _json_form(result.data)
                if new != orjson.loads(row.data) or result.updated_at != row.source_updated_at:
                    plan.remapped[row.id] = (new, result.updated_at)
                    counts.remapped += 1
                    data, updated = new, result.updated_at  # UTC, as the store keeps it
            elif result is not None:
                plan.failures.append(
                    Failure(row.id, row.source, row.external_id, result.reason, row.payload)
                )
                counts.failed += 1
            if row.kind == "contact":
                yield Staged(row.id, sys.intern(row.source), data, updated)
            else:
                plan.activities += 1
    # The order a per-source pass gave: by source, then id.
    plan.unconfigured.sort()
    plan.failures.sort(key=lambda f: (f.source, f.record_id))


def _map_chunk(
    chunk: Sequence[Any],
    settings: Settings,
    plan: RebuildPlan,
    mappings: dict[str, tuple[str, int] | None],
) -> dict[int, MappedRecord | Rejected]:
    """Map one chunk of rows with their sources' current mappings, source by source; a
    source no longer configured keeps its staged data (noted in the plan once).
    `mappings` caches each source's mapping file between chunks."""
    by_source: dict[str, list[Any]] = defaultdict(list)
    for row in chunk:
        by_source[row.source].append(row)
    mapped: dict[int, MappedRecord | Rejected] = {}
    for name, records in by_source.items():
        if name not in mappings:
            mappings[name] = _mapping_of(settings, name)
            if mappings[name] is None:
                plan.unconfigured.append(name)
        where = mappings[name]
        if where is None:
            continue
        raws = [
            RawRecord(r.external_id, r.kind, r.payload, r.source_updated_at, r.external_id)
            for r in records
        ]
        results = map_records(where[0], where[1], settings.matching.default_region, raws)
        mapped.update((r.id, m) for r, m in zip(records, results, strict=True))
    return mapped


def _constraints(
    conn: Connection, index: dict[int, int]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], set[int]]:
    """Must-link pairs (confirmed merges; steward members of one golden record), cannot-link
    pairs (do-not-merge), as indices; and the records with a steward membership."""
    must: list[tuple[int, int]] = []
    cannot: list[tuple[int, int]] = []
    for a, b, kind in conn.execute(
        select(merge_constraint.c.record_a, merge_constraint.c.record_b, merge_constraint.c.kind)
    ):
        if a in index and b in index:
            (cannot if kind == "do_not_merge" else must).append((index[a], index[b]))
    by_golden: dict[int, list[int]] = defaultdict(list)
    for rid, golden in conn.execute(
        select(membership.c.record_id, membership.c.golden_id).where(
            membership.c.method == "steward"
        )
    ):
        if rid in index:
            by_golden[golden].append(rid)
    steward = {r for members in by_golden.values() for r in members}
    for members in by_golden.values():
        members.sort()
        must += [(index[members[0]], index[r]) for r in members[1:]]
    return must, cannot, steward


@dataclass(slots=True)
class _Batch:
    """The contacts as clustering needs them, in id order: ids, sources, and (probabilistic
    matcher) prepared forms and blocking keys, or (exact matcher) the holders of each key."""

    ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    records: list[Prepared] = field(default_factory=list)
    staged: StagedData | None = None  # their data too (the same ids and sources lists)
    index: KeyIndex = field(default_factory=KeyIndex)
    # a local batch's blocking keys, per contact: indexed once the store's counts are known
    keys: list[tuple[list[tuple[str, str]], bytes]] = field(default_factory=list)
    holders: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(list))


class BatchStopped(Exception):
    """A batch was asked to stop (its `stop` event set) and did at its next step; raised
    inside its transaction, which rolls back."""


STOP_CHECK_EVERY = 2_000  # contacts collected between two looks at the stop event


def stop_if_asked(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise BatchStopped("the batch was asked to stop; nothing of it was written")


def _collect(
    conn: Connection,
    settings: Settings,
    plan: RebuildPlan,
    remap: bool = True,
    stop: threading.Event | None = None,
    keep_data: bool = False,
    only: Sequence[int] | None = None,
) -> _Batch:
    """Re-map, validate and prepare every contact (a share on a helper process in a big
    batch: sync/batch_prepare.py), keeping only what matching and the match_key rows need (a
    contact's payload and `Contact` are dropped as soon as it is prepared; its data too
    unless `keep_data`, for survivorship). `only`: these contacts alone (a local batch)."""
    batch = _Batch()
    kept = batch.staged = StagedData(batch.ids, batch.sources) if keep_data else None
    staged = _remap(conn, settings, plan, remap, only)
    # millions of small objects that stay alive: see collection_paused's docstring
    with collection_paused(), BatchPreparer() as preparer:
        if settings.matching.method == "exact":
            exact = ExactMatcher()
            for one in staged:
                found = [(k.kind, k.value) for k in exact.keys(contact_of(one))]
                for key in found:
                    batch.holders[key].append(len(batch.ids))
                batch.ids.append(one.record_id)
                batch.sources.append(one.source)
                if kept is not None:
                    kept.data.append(one.data)
                    kept.updated.append(one.updated_at)
                plan.keys.add(one.record_id, found)
            return batch
        for one, record, keys in preparer.prepared(staged):
            if len(batch.ids) % STOP_CHECK_EVERY == 0:
                stop_if_asked(stop)
            if only is None:
                batch.index.add_parts(len(batch.ids), keys.used, keys.flags)
            else:
                batch.keys.append((keys.used, keys.flags))
            batch.ids.append(one.record_id)
            batch.sources.append(one.source)
            if kept is not None:
                kept.data.append(one.data)
                kept.updated.append(one.updated_at)
            batch.records.append(record)
            plan.keys.add_encoded(one.record_id, keys.rows_json, keys.rows, keys.form)
    plan.timings["prepared_on_helper"] = preparer.on_helper
    return batch


def _cluster(
    settings: Settings,
    params: Params,
    batch: _Batch,
    must: list[tuple[int, int]],
    cannot: list[tuple[int, int]],
    plan: RebuildPlan,
    stop: threading.Event | None = None,
    conn: Connection | None = None,
    asked: Container[tuple[int, int]] = (),
) -> list[list[int]]:
    """Clusters of indices into `batch.ids`; fills the plan's reviews, borderline links and
    matcher. A set `stop` ends it with `BatchStopped` at the clustering's next step. A local
    batch (`conn`: the store it is weighed against) takes the store's size and exact counts,
    and blocks without the keys whose blocks the store's batch skips (`_store_blocked`)."""
    m = settings.matching
    if m.method == "exact":
        pairs = [
            (members[0], other)
            for members in batch.holders.values()
            if len(members) <= MAX_BLOCK
            for other in members[1:]
        ]
        plan.matcher = ExactMatcher().version
        return link(len(batch.ids), pairs, must_link=must, cannot_link=cannot)
    records = batch.records
    frequencies: Frequencies | None
    if conn is None:
        enough = len(records) >= MIN_POPULATION
        frequencies = frequency_table(records, blocking=False) if enough else None
    else:
        # Exact counts, as a batch takes them: near `auto_merge` a common value's kept count
        # (up to 10% stale) tips pairs (docs/benchmarks.md, "Order independence").
        frequencies = counted_for(conn, records, exact=True)
        batch.index = _store_blocked(conn, batch.keys)
    matcher = FellegiSunterMatcher(
        params, auto_merge=m.auto_merge, review=m.review, frequencies=frequencies
    )
    plan.matcher = matcher.version
    result = cluster_prepared(
        records,
        matcher,
        max_block=MAX_BLOCK,
        index=batch.index,
        must_link=must,
        cannot_link=cannot,
        check_stop=partial(stop_if_asked, stop),
        threads=SCORING_THREADS if conn is None else 1,  # store counts: one connection
    )
    ids = batch.ids
    plan.borderline = {ids[i]: p for i, p in result.borderline.items()}
    plan.reviews = [  # explained only if not asked about before: the plan leaves those out
        (ids[a], ids[b], p, matcher.compare_prepared(records[a], records[b]).explanation)
        for a, b, p in result.review
        if (ids[a], ids[b]) not in asked
    ]
    return result.clusters


def _store_blocked(conn: Connection, keys: list[tuple[list[tuple[str, str]], bytes]]) -> KeyIndex:
    """A local batch's blocking keys that two of its contacts or more hold (no pair comes of
    the others), without those whose block the store's batch skips (`candidate_pairs`): an
    ordinary key the store holds more than MAX_BLOCK times, a probe key (flag set) more than
    the probe blocks' budget. Only shared keys are counted (at 1M contacts a local batch's
    67,000 contacts hold 500,000 keys, most of them their own), and not those with a kept
    count (held 1,000 times or more when counted): counting walks every holder."""
    holders = Counter(k for used, _ in keys for k in set(used))
    kept = kept_counts(conn)
    shared = [k for k, n in holders.items() if n > 1]
    counts = {k: kept[k] for k in shared if k in kept}
    counts.update(key_counts(conn, sorted(k for k in shared if k not in kept)))
    limits = (MAX_BLOCK, MAX_BLOCK * MAX_BLOCK // 2)
    index = KeyIndex()
    for owner, (used, flags) in enumerate(keys):
        blocked = [
            i
            for i, k in enumerate(used)
            if holders[k] > 1 and counts.get(k, 0) <= limits[flags[i] != 0]
        ]
        index.add_parts(owner, [used[i] for i in blocked], bytes(flags[i] for i in blocked))
    return index


def _outdated_keys(conn: Connection, wanted: KeyRows) -> int:
    """Contacts whose stored match_key rows differ from `wanted` (compared by an order-free
    fingerprint: a sum of hashes and a count, so the stored rows are never held at once)."""
    stored: dict[int, tuple[int, int]] = {}
    rows = conn.execute(
        select(
            match_key.c.record_id, match_key.c.key_kind, match_key.c.key_value
        ).execution_options(yield_per=20_000)
    )
    for rid, kind, value in rows:
        total, count = stored.get(rid, (0, 0))
        stored[rid] = ((total + hash((kind, value))) & _MASK, count + 1)
    outdated = sum(
        1 for rid, fingerprint in wanted.fingerprints() if stored.pop(rid, (0, 0)) != fingerprint
    )
    return outdated + len(stored)  # rows of records that should have none


def _assign(clusters: list[list[int]], current: dict[int, int], plan: RebuildPlan) -> None:
    """Golden ids for the new clusters (the stable-id rule in the module docstring)."""
    went: dict[int, Counter[int]] = defaultdict(Counter)
    for ci, members in enumerate(clusters):
        for rid in members:
            golden = current.get(rid)
            if golden is not None:
                went[golden][ci] += 1
    claimed: dict[int, list[int]] = defaultdict(list)
    for golden, counts in went.items():
        best = max(counts.items(), key=lambda kv: (kv[1], -clusters[kv[0]][0]))
        claimed[best[0]].append(golden)
        plan.goldens_split += len(counts) > 1
    tally: Counter[str] = Counter()
    fresh = 0
    for ci, members in enumerate(clusters):
        goldens = sorted(claimed.get(ci, ()))
        if goldens:
            golden_id = goldens[0]
            plan.aliases.update((g, golden_id) for g in goldens[1:])
        else:
            fresh += 1
            golden_id = -fresh
        for rid in members:
            plan.target[rid] = golden_id
        if golden_id < 0:
            tally["new"] += 1
        elif len(goldens) > 1:
            tally["merged"] += 1
        elif all(current.get(r) == golden_id for r in members) and sum(
            went[golden_id].values()
        ) == len(members):
            tally["kept"] += 1
        else:
            tally["changed"] += 1
    plan.clusters = {k: tally[k] for k in ("kept", "changed", "merged", "new")}


# Replaces every match_key row; a set event ends it with `BatchStopped`.
KeyWriter = Callable[[Connection, KeyRows, threading.Event | None], None]


def plan_rebuild(
    conn: Connection,
    settings: Settings,
    *,
    remap: bool = True,
    write_keys: KeyWriter | None = None,
    stop: threading.Event | None = None,
    only: Sequence[int] | None = None,
) -> RebuildPlan:
    """What `crmhub rebuild` would change, computed from the store and the settings; reads
    only, unless the apply passes its `write_keys`: then the plan's match_key rows are
    written on a thread while the contacts are clustered (the driver does the inserts and
    the index build outside the GIL, so both cores work: at 1M contacts the 17.6M rows and
    their index took 70 s on their own) and the plan says `keys_written`, and keeps every
    contact's data for survivorship (`staged`). Call inside the apply's transaction to apply
    exactly what was planned. Without `remap` the records keep their staged data and only
    the matching is done again. A set `stop` ends it with `BatchStopped` at its next step
    (between phases, every `STOP_CHECK_EVERY` contacts collected, and within the
    clustering: `cluster_prepared`'s `check_stop`).

    `only`: a local batch of these contacts (sync/borderline.py), for an apply: they are weighed
    with the whole store's size and counts and clustered among themselves; their match_key
    rows stay as stored (`write_keys` is not used), and the plan is `local`."""
    plan = RebuildPlan(local=only is not None)
    asked = {  # pairs a review item asked about already (ids ascending, as the batch's)
        (a, b) for a, b in conn.execute(select(review_item.c.record_a, review_item.c.record_b))
    }
    started = time.perf_counter()
    keep_data = write_keys is not None or plan.local
    batch = _collect(conn, settings, plan, remap, stop, keep_data=keep_data, only=only)
    stop_if_asked(stop)
    clustering = time.perf_counter()
    plan.timings["collect_seconds"] = round(clustering - started, 1)
    ids = batch.ids
    plan.contacts = len(ids)
    index = {rid: i for i, rid in enumerate(ids)}
    must, cannot, plan.steward = _constraints(conn, index)
    params = active_params(conn)
    if plan.local:
        clusters = _cluster(settings, params, batch, must, cannot, plan, stop, conn, asked)
    elif write_keys is None:
        clusters = _cluster(settings, params, batch, must, cannot, plan, stop, asked=asked)
    else:
        plan.keys_outdated = _outdated_keys(conn, plan.keys)  # what is stored before it goes
        # The connection is the writer's alone until it is done: clustering does no I/O.
        with ThreadPoolExecutor(1, thread_name_prefix="crmhub-keys") as pool:
            writing = pool.submit(write_keys, conn, plan.keys, stop)
            clusters = _cluster(settings, params, batch, must, cannot, plan, stop, asked=asked)
            plan.timings["match_seconds"] = round(time.perf_counter() - clustering, 1)
        writing.result()
        plan.keys_written = True
    stop_if_asked(stop)
    plan.timings["cluster_seconds"] = round(time.perf_counter() - clustering, 1)
    batch.records, batch.holders = [], {}  # prepared forms are done with: release them
    plan.staged = batch.staged
    members = select(
        membership.c.record_id,
        membership.c.golden_id,
        membership.c.probability,
    )
    if plan.local:
        members = members.where(one_of(conn, membership.c.record_id, ids))
    for r, g, p in conn.execute(members):
        if r in index:
            plan.current[int(r)] = int(g)
            if p is not None:
                plan.kept[int(r)] = float(p)
    _assign([[ids[i] for i in c] for c in clusters], plan.current, plan)
    del clusters
    for rid in plan.moved:
        plan.per_source[batch.sources[index[rid]]].moved += 1
    plan.reviews = [r for r in plan.reviews if plan.target[r[0]] != plan.target[r[1]]]
    if not plan.keys_written and not plan.local:
        plan.keys_outdated = _outdated_keys(conn, plan.keys)
    return plan
