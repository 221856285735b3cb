"""Match and merge against the store: blocking keys, candidates, decisions, golden records.

`dedupe` decides (no I/O); this module feeds it candidates from the persisted blocking index
(`match_key`) and writes what it decided: memberships, golden records with lineage, review
items. Steward constraints (do-not-merge) always win.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Connection, bindparam, func, or_, select

from crmhub.records import Contact
from dedupe import Decision, Matcher, Member, survive
from dedupe.matcher import blocking_keys, lookup_keys
from dedupe.normalize import Prepared, prepare
from dedupe.scoring import tf_values
from sync.frequencies import StoreFrequencies, tf_rows
from sync.staging import chunks
from sync.store import (
    allocate_ids,
    bulk_insert,
    golden_record,
    match_key,
    membership,
    merge_constraint,
    one_of,
    review_item,
    source_record,
)

__all__ = ["MatchInput", "MatchOutcome", "match_and_merge", "recompute_goldens"]

Node = tuple[Literal["r", "g"], int]
# A blocking key held by more records than this finds no candidates (reported as capped).
MAX_BLOCK = 200
# Store size from which term frequencies and the store-size prior apply.
MIN_POPULATION = 2000
# Members per golden record sampled by the chain guard.
GUARD_SAMPLE = 8


@dataclass(slots=True)
class MatchInput:
    record_id: int
    contact: Contact
    data: dict[str, Any]
    updated_at: datetime | None
    status: Literal["new", "changed"]


@dataclass(slots=True)
class MatchOutcome:
    goldens_created: int = 0
    records_merged: int = 0
    goldens_merged: int = 0
    reviews_queued: int = 0
    touched_goldens: set[int] = field(default_factory=set)
    capped_keys: set[tuple[str, str]] = field(default_factory=set)


class _Comparer:
    """`matcher.compare` with each record normalised once per batch (when the matcher can)."""

    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher
        self.transitive = bool(getattr(matcher, "transitive", False))
        self._compare_prepared = getattr(matcher, "compare_prepared", None)
        self._prepared: dict[int, Prepared] = {}

    def prepared(self, record_id: int, contact: Contact) -> Prepared:
        found = self._prepared.get(record_id)
        if found is None:
            found = self._prepared[record_id] = prepare(contact)
        return found

    def __call__(self, a: int, contact_a: Contact, b: int, contact_b: Contact) -> Decision:
        if self._compare_prepared is None:
            return self.matcher.compare(contact_a, contact_b)
        decision: Decision = self._compare_prepared(
            self.prepared(a, contact_a), self.prepared(b, contact_b)
        )
        return decision


def _load_contacts(conn: Connection, ids: set[int], into: dict[int, Contact]) -> None:
    query = select(source_record.c.id, source_record.c.data)
    for rid, data in _in_chunks(conn, query, source_record.c.id, ids - set(into)):
        into[rid] = Contact.model_validate(data)


def _cluster_average(
    conn: Connection,
    compare: _Comparer,
    record: int,
    golden_a: int,
    golden_b: int,
    contacts: dict[int, Contact],
) -> float:
    """Average linkage between `golden_a` joined by `record` and `golden_b` (the chain guard).

    Members are sampled (GUARD_SAMPLE each), so a big cluster costs a bounded number of
    comparisons.
    """
    members: dict[int, list[int]] = defaultdict(list)
    rows = conn.execute(
        select(membership.c.golden_id, membership.c.record_id)
        .where(membership.c.golden_id.in_([golden_a, golden_b]))
        .order_by(membership.c.record_id)
    )
    for golden, rid in rows:
        if len(members[golden]) < GUARD_SAMPLE:
            members[golden].append(rid)
    _load_contacts(conn, set(members[golden_a]) | set(members[golden_b]), contacts)
    side_a = [*members[golden_a], record]
    scores = [
        compare(a, contacts[a], b, contacts[b]).probability
        for a in side_a
        for b in members[golden_b]
    ]
    return sum(scores) / len(scores) if scores else 0.0


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Hashable, Hashable] = {}

    def find(self, node: Hashable) -> Hashable:
        self.parent.setdefault(node, node)
        root = node
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[node] != root:
            self.parent[node], node = root, self.parent[node]
        return root

    def union(self, a: Hashable, b: Hashable) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def groups(self) -> list[list[Any]]:
        out: dict[Hashable, list[Any]] = defaultdict(list)
        for node in list(self.parent):
            out[self.find(node)].append(node)
        return list(out.values())


def _in_chunks(conn: Connection, query: Any, column: Any, values: Iterable[Any]) -> list[Any]:
    rows: list[Any] = []
    for part in chunks(sorted(set(values))):
        rows.extend(conn.execute(query.where(one_of(conn, column, part))).all())
    return rows


def _prefetch_frequencies(
    conn: Connection, freq: StoreFrequencies, compare: _Comparer, inputs: list[MatchInput]
) -> None:
    """Counts for every value the page's comparisons and key caps will ask about."""
    wanted: list[tuple[str, str]] = []
    for item in inputs:
        prepared = compare.prepared(item.record_id, item.contact)
        wanted += [(k.kind, k.value) for k in blocking_keys(prepared)]
        wanted += [(k.kind, k.value) for k in lookup_keys(prepared)]
        wanted += [(kind, v) for kind, vs in tf_values(prepared).items() for v in vs]
    freq.prefetch(conn, wanted)


def _write_keys(
    conn: Connection,
    matcher: Matcher,
    compare: _Comparer,
    inputs: list[MatchInput],
    freq: StoreFrequencies | None,
) -> dict[int, set[tuple[str, str]]]:
    keys = {i.record_id: {(k.kind, k.value) for k in matcher.keys(i.contact)} for i in inputs}
    changed = [i.record_id for i in inputs if i.status == "changed"]
    for part in chunks(changed):
        conn.execute(match_key.delete().where(one_of(conn, match_key.c.record_id, part)))
    rows = [
        {"record_id": rid, "key_kind": kind, "key_value": value}
        for rid, pairs in keys.items()
        for kind, value in pairs
    ]
    if freq is not None:
        # Term-frequency rows: how many contacts share a first name, surname, company...
        rows += [
            {"record_id": i.record_id, "key_kind": kind, "key_value": value}
            for i in inputs
            for kind, value in dict.fromkeys(
                tf_rows(tf_values(compare.prepared(i.record_id, i.contact)))
            )
        ]
    if rows:
        bulk_insert(conn, match_key, rows)
    return keys


def _candidates(
    conn: Connection, lookups: dict[int, list[tuple[str, str]]], outcome: MatchOutcome
) -> dict[tuple[str, str], list[int]]:
    """Records holding each lookup key; keys held by more than MAX_BLOCK records are capped
    (a shared inbox or switchboard number says nothing about who someone is)."""
    by_kind: dict[str, set[str]] = defaultdict(set)
    for pairs in lookups.values():
        for kind, value in pairs:
            by_kind[kind].add(value)
    holders: dict[tuple[str, str], list[int]] = defaultdict(list)
    for kind, values in by_kind.items():
        counted = select(match_key.c.key_value, func.count()).where(match_key.c.key_kind == kind)
        usable = []
        for part in chunks(sorted(values)):
            rows = conn.execute(
                counted.where(one_of(conn, match_key.c.key_value, part)).group_by(
                    match_key.c.key_value
                )
            )
            for value, count in rows:
                if count > MAX_BLOCK:
                    outcome.capped_keys.add((kind, value))
                else:
                    usable.append(value)
        query = select(match_key.c.key_value, match_key.c.record_id).where(
            match_key.c.key_kind == kind
        )
        for value, record_id in _in_chunks(conn, query, match_key.c.key_value, usable):
            holders[(kind, value)].append(record_id)
    return holders


def _do_not_merge(conn: Connection, ids: set[int]) -> set[frozenset[int]]:
    pairs: set[frozenset[int]] = set()
    for part in chunks(sorted(ids)):
        rows = conn.execute(
            select(merge_constraint.c.record_a, merge_constraint.c.record_b).where(
                merge_constraint.c.kind == "do_not_merge",
                or_(
                    one_of(conn, merge_constraint.c.record_a, part),
                    one_of(conn, merge_constraint.c.record_b, part),
                ),
            )
        )
        pairs.update(frozenset((a, b)) for a, b in rows)
    return pairs


def match_and_merge(
    conn: Connection,
    matcher: Matcher,
    inputs: list[MatchInput],
    now: datetime | None = None,
    frequencies: StoreFrequencies | None = None,
) -> MatchOutcome:
    """Fold new/changed contacts into golden records; call inside the page's transaction."""
    now = now or datetime.now(UTC)
    outcome = MatchOutcome()
    if not inputs:
        return outcome
    batch = {i.record_id: i for i in inputs}
    compare = _Comparer(matcher)
    if not hasattr(matcher, "frequencies"):
        frequencies = None  # the exact matcher has no use for them
    if frequencies is not None:
        _prefetch_frequencies(conn, frequencies, compare, inputs)
        # Below a few thousand contacts frequencies are noise (a phone on 2 of 3 records looks
        # "common"): the matcher keeps its shipped priors until the store is big enough.
        enough = frequencies.total >= MIN_POPULATION
        matcher.frequencies = frequencies if enough else None  # type: ignore[attr-defined]
    keys = _write_keys(conn, matcher, compare, inputs, frequencies)
    lookup = getattr(matcher, "lookup_keys", None)
    lookups = {
        i.record_id: (
            [(k.kind, k.value) for k in lookup(i.contact)] if lookup else sorted(keys[i.record_id])
        )
        for i in inputs
    }
    holders = _candidates(conn, lookups, outcome)
    pairs: set[tuple[int, int]] = set()
    for rid, wanted in lookups.items():
        for key in wanted:
            pairs.update((min(rid, o), max(rid, o)) for o in holders.get(key, ()) if o != rid)
    candidate_ids = {rid for pair in pairs for rid in pair}
    member_of = dict(
        _in_chunks(
            conn,
            select(membership.c.record_id, membership.c.golden_id),
            membership.c.record_id,
            candidate_ids | set(batch),
        )
    )
    contacts: dict[int, Contact] = {rid: i.contact for rid, i in batch.items()}
    _load_contacts(conn, candidate_ids - set(batch), contacts)
    forbidden = _do_not_merge(conn, set(batch))

    uf = _UnionFind()
    for rid in batch:
        uf.find(("r", rid))
        if rid in member_of:
            uf.union(("g", member_of[rid]), ("r", rid))
    reviews: dict[tuple[int, int], Decision] = {}
    # batch record -> golden record -> its strongest merge decision (and with which member)
    links: dict[int, dict[int, tuple[Decision, int]]] = defaultdict(dict)
    for a, b in sorted(pairs):
        if frozenset((a, b)) in forbidden:
            continue
        decision = compare(a, contacts[a], b, contacts[b])
        if decision.action == "review":
            reviews[(a, b)] = decision
        elif decision.action == "merge":
            if a in batch and b in batch:
                uf.union(("r", a), ("r", b))
            else:
                inside, other = (a, b) if a in batch else (b, a)
                golden = member_of.get(other)
                if golden is None:
                    continue  # a staged record without a golden record: nothing to join
                best = links[inside].get(golden)
                if best is None or decision.probability > best[0].probability:
                    links[inside][golden] = (decision, other)
    for rid, linked in links.items():
        ranked = sorted(linked.items(), key=lambda g: -g[1][0].probability)
        joined = [ranked[0][0]]
        for golden, (decision, other) in ranked[1:]:
            # Chain guard: one record may join two existing clusters only when the clusters
            # themselves look alike on average; otherwise the weaker link goes to review.
            average = (
                1.0
                if compare.transitive
                else _cluster_average(conn, compare, rid, joined[0], golden, contacts)
            )
            if average >= float(getattr(matcher, "review", 0.0)):
                joined.append(golden)
            else:
                held = (
                    f"held for review: this record would join two golden records ({joined[0]} "
                    f"and {golden}) whose members match only {average:.2f} on average"
                )
                reviews[(min(rid, other), max(rid, other))] = Decision(
                    "review", decision.probability, {**decision.explanation, "held": held}
                )
        for golden_id in joined:
            uf.union(("g", golden_id), ("r", rid))

    new_members: list[dict[str, Any]] = []
    moved: list[dict[str, Any]] = []
    fresh: list[list[int]] = []  # groups of batch records that need a new golden record
    for group in uf.groups():
        goldens = sorted(g for kind, g in group if kind == "g")
        records = sorted(r for kind, r in group if kind == "r")
        if len(group) > 1:
            outcome.records_merged += sum(
                1 for r in records if batch[r].status == "new" or member_of.get(r) not in goldens
            )
        if not goldens:
            fresh.append(records)
            continue
        golden_id = goldens[0]  # the oldest id survives; the others become aliases
        outcome.touched_goldens.add(golden_id)
        for alias in goldens[1:]:
            _alias(conn, alias, golden_id, now)
            outcome.goldens_merged += 1
        for r in records:
            if r not in member_of:
                new_members.append(_membership(r, golden_id, "auto", now))
            elif member_of[r] != golden_id:
                moved.append({"b_record": r, "golden_id": golden_id, "decided_at": now})
    if fresh:
        ids = allocate_ids(conn, golden_record, len(fresh))
        rows = []
        for golden_id, records in zip(ids, fresh, strict=True):
            fields, lineage = survive(
                [Member(r, batch[r].updated_at, batch[r].data) for r in records]
            )
            rows.append(
                {
                    "id": golden_id,
                    "fields": fields,
                    "lineage": lineage,
                    "version": 1,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        bulk_insert(conn, golden_record, rows)
        outcome.goldens_created += len(ids)
        for records, golden_id in zip(fresh, ids, strict=True):
            method = "new" if len(records) == 1 else "auto"
            new_members.extend(_membership(r, golden_id, method, now) for r in records)
    if new_members:
        bulk_insert(conn, membership, new_members)
    if moved:
        conn.execute(
            membership.update().where(membership.c.record_id == bindparam("b_record")), moved
        )
    _queue_reviews(conn, reviews, now, outcome)
    _settle_reviews(conn, set(batch), outcome.touched_goldens, now)
    recompute_goldens(conn, outcome.touched_goldens, now)
    return outcome


def _membership(record_id: int, golden_id: int, method: str, now: datetime) -> dict[str, Any]:
    return {
        "record_id": record_id,
        "golden_id": golden_id,
        "method": method,
        "probability": None,
        "decided_at": now,
    }


def _alias(conn: Connection, alias: int, survivor: int, now: datetime) -> None:
    """Fold golden record `alias` into `survivor`; its id keeps resolving to the survivor."""
    conn.execute(
        membership.update()
        .where(membership.c.golden_id == alias)
        .values(golden_id=survivor, decided_at=now)
    )
    conn.execute(
        golden_record.update()
        .where(golden_record.c.id == alias)
        .values(merged_into=survivor, updated_at=now)
    )
    conn.execute(
        golden_record.update()
        .where(golden_record.c.merged_into == alias)
        .values(merged_into=survivor)
    )


def _settle_reviews(
    conn: Connection, record_ids: set[int], goldens: set[int], now: datetime
) -> None:
    """Open review items whose two records now share a golden record need no steward."""
    goldens = set(goldens)
    for part in chunks(sorted(record_ids)):
        goldens.update(
            conn.execute(
                select(membership.c.golden_id).where(one_of(conn, membership.c.record_id, part))
            ).scalars()
        )
    a_member = membership.alias("a_member")
    b_member = membership.alias("b_member")
    settled: list[int] = []
    for part in chunks(sorted(goldens)):
        settled += (
            conn.execute(
                select(review_item.c.id)
                .join(a_member, a_member.c.record_id == review_item.c.record_a)
                .join(b_member, b_member.c.record_id == review_item.c.record_b)
                .where(
                    review_item.c.status == "open",
                    a_member.c.golden_id == b_member.c.golden_id,
                    one_of(conn, a_member.c.golden_id, part),
                )
            )
            .scalars()
            .all()
        )
    for part in chunks(settled):
        conn.execute(
            review_item.update()
            .where(one_of(conn, review_item.c.id, part))
            .values(status="merged", decided_by="matcher", decided_at=now)
        )


def _queue_reviews(
    conn: Connection, reviews: dict[tuple[int, int], Decision], now: datetime, outcome: MatchOutcome
) -> None:
    if not reviews:
        return
    existing = {
        (a, b)
        for a, b in _in_chunks(
            conn,
            select(review_item.c.record_a, review_item.c.record_b),
            review_item.c.record_a,
            {a for a, _ in reviews},
        )
    }
    rows = [
        {
            "record_a": a,
            "record_b": b,
            "probability": d.probability,
            "explanation": d.explanation,
            "status": "open",
            "created_at": now,
        }
        for (a, b), d in reviews.items()
        if (a, b) not in existing
    ]
    if rows:
        conn.execute(review_item.insert(), rows)
        outcome.reviews_queued += len(rows)


def recompute_goldens(conn: Connection, golden_ids: set[int], now: datetime | None = None) -> None:
    """Recompute fields and lineage of `golden_ids` from their live members (survivorship)."""
    if not golden_ids:
        return
    now = now or datetime.now(UTC)
    members: dict[int, list[Member]] = defaultdict(list)
    query = (
        select(
            membership.c.golden_id,
            source_record.c.id,
            source_record.c.source_updated_at,
            source_record.c.data,
        )
        .join(source_record, source_record.c.id == membership.c.record_id)
        .where(source_record.c.deleted == 0)
    )
    for golden_id, rid, updated_at, data in _in_chunks(
        conn, query, membership.c.golden_id, golden_ids
    ):
        members[golden_id].append(Member(rid, updated_at, data))
    rows = []
    for golden_id in golden_ids:
        fields, lineage = survive(members[golden_id]) if members[golden_id] else ({}, {})
        rows.append({"b_id": golden_id, "fields": fields, "lineage": lineage, "updated_at": now})
    conn.execute(
        golden_record.update()
        .where(golden_record.c.id == bindparam("b_id"))
        .values(version=golden_record.c.version + 1),
        rows,
    )
