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

from sqlalchemy import Connection, bindparam, or_, select

from crmhub.records import Contact
from dedupe import Decision, Matcher, Member, survive
from sync.staging import chunks
from sync.store import (
    allocate_ids,
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


def _write_keys(
    conn: Connection, matcher: Matcher, inputs: list[MatchInput]
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
    if rows:
        conn.execute(match_key.insert(), rows)
    return keys


def _candidates(
    conn: Connection, keys: dict[int, set[tuple[str, str]]]
) -> dict[tuple[str, str], list[int]]:
    by_kind: dict[str, set[str]] = defaultdict(set)
    for pairs in keys.values():
        for kind, value in pairs:
            by_kind[kind].add(value)
    holders: dict[tuple[str, str], list[int]] = defaultdict(list)
    for kind, values in by_kind.items():
        query = select(match_key.c.key_value, match_key.c.record_id).where(
            match_key.c.key_kind == kind
        )
        for value, record_id in _in_chunks(conn, query, match_key.c.key_value, values):
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
    conn: Connection, matcher: Matcher, inputs: list[MatchInput], now: datetime | None = None
) -> MatchOutcome:
    """Fold new/changed contacts into golden records; call inside the page's transaction."""
    now = now or datetime.now(UTC)
    outcome = MatchOutcome()
    if not inputs:
        return outcome
    batch = {i.record_id: i for i in inputs}
    keys = _write_keys(conn, matcher, inputs)
    holders = _candidates(conn, keys)
    candidate_ids = {rid for ids in holders.values() for rid in ids}
    member_of = dict(
        _in_chunks(
            conn,
            select(membership.c.record_id, membership.c.golden_id),
            membership.c.record_id,
            candidate_ids | set(batch),
        )
    )
    outside = candidate_ids - set(batch)
    contacts: dict[int, Contact] = {rid: i.contact for rid, i in batch.items()}
    for rid, data in _in_chunks(
        conn, select(source_record.c.id, source_record.c.data), source_record.c.id, outside
    ):
        contacts[rid] = Contact.model_validate(data)
    forbidden = _do_not_merge(conn, set(batch))

    uf = _UnionFind()
    reviews: dict[tuple[int, int], Decision] = {}
    for rid, item in batch.items():
        node: Node = ("r", rid)
        uf.find(node)
        if rid in member_of:
            uf.union(("g", member_of[rid]), node)
        others = {c for key in keys[rid] for c in holders.get(key, ()) if c != rid}
        for other in sorted(others):
            if other in batch and other > rid:
                continue  # compared once, from the other side
            if frozenset((rid, other)) in forbidden or other not in contacts:
                continue
            decision = matcher.compare(item.contact, contacts[other])
            if decision.action == "merge":
                target: Node = (
                    ("r", other)
                    if other in batch or other not in member_of
                    else ("g", member_of[other])
                )
                uf.union(target, node)
            elif decision.action == "review":
                reviews[(min(rid, other), max(rid, other))] = decision

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
        conn.execute(golden_record.insert(), rows)
        outcome.goldens_created += len(ids)
        for records, golden_id in zip(fresh, ids, strict=True):
            method = "new" if len(records) == 1 else "auto"
            new_members.extend(_membership(r, golden_id, method, now) for r in records)
    if new_members:
        conn.execute(membership.insert(), new_members)
    if moved:
        conn.execute(
            membership.update().where(membership.c.record_id == bindparam("b_record")), moved
        )
    _queue_reviews(conn, reviews, now, outcome)
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
