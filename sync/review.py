"""Steward decisions on the merge-review queue: the one implementation behind web, API and CLI.

A review item is a pair of source records the matcher was unsure about. A steward approves it
(the two golden records become one, optionally choosing the surviving value per field),
rejects it (a do_not_merge constraint the pipeline honours on every later sync), or skips it.
Any member can be split off a golden record again (unmerge), and a steward's last action can
be undone. Every action is one write transaction that also appends to `audit_log`; the audit
entry keeps ids and states only (no personal data), which is also what undo replays.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, or_, select
from sqlalchemy.sql import Select

from crmhub.errors import DedupeError, StaleDecisionError
from crmhub.records import SCALAR_CONTACT_FIELDS
from sync.constraints import snapshot, stale_reasons
from sync.golden import recompute_goldens
from sync.history import goldens_touched, link_goldens
from sync.queries import resolve_golden_id
from sync.store import (
    allocate_ids,
    audit_log,
    field_choice,
    golden_record,
    membership,
    merge_constraint,
    one_of,
    review_item,
    source_record,
    write_transaction,
)

__all__ = [
    "BUCKETS",
    "CHOOSABLE_FIELDS",
    "COUNT_CAP",
    "MAX_AGE_DAYS",
    "SORTS",
    "AlreadyDecidedError",
    "ConflictError",
    "NotFoundError",
    "ReviewError",
    "StaleDecisionError",
    "apply_field_choices",
    "approve",
    "approve_bucket",
    "audit_entries",
    "bucket_counts",
    "bucket_preview",
    "list_reviews",
    "reject",
    "review_counts",
    "show_review",
    "skip",
    "undo_last",
    "unmerge",
]

log = logging.getLogger(__name__)

COUNT_CAP = 10_000  # filtered totals above this read "more than 10,000"
MAX_AGE_DAYS = 36_500
# Queue orders. Ids are allocated in queueing order, so they sort by age on the primary key.
SORTS: dict[str, tuple[Any, ...]] = {
    "best": (review_item.c.probability.desc(), review_item.c.id),
    "borderline": (review_item.c.probability, review_item.c.id),
    "oldest": (review_item.c.id,),
    "newest": (review_item.c.id.desc(),),
}
# "merged": settled without a decision of its own, because its records came to share a
# golden record (another approval, or the pipeline, which marks them the same way).
STATUSES = ("open", "approved", "rejected", "skipped", "merged")
# Fields a steward may pick per merge; emails and phones keep every distinct value anyway.
CHOOSABLE_FIELDS: tuple[str, ...] = tuple(f for f in SCALAR_CONTACT_FIELDS if f != "consent")
_NAMES = ("full_name", "first_name", "last_name")
# Names and identifiers first, then the model's other fields (derived: stays in step with it).
_COMPARE_FIELDS: tuple[str, ...] = (
    *_NAMES,
    "emails",
    "phones",
    *(f for f in SCALAR_CONTACT_FIELDS if f not in _NAMES),
)
# Which matcher comparison speaks for which field (explanation["fields"] is keyed by these).
_EVIDENCE = {
    "first_name": "first_name",
    "last_name": "last_name",
    "emails": "email",
    "phones": "phone",
    "company": "company",
    "city": "city",
}
_UNDOABLE = ("review.approve", "review.reject", "review.skip", "golden.unmerge")


_A = source_record.alias("a")
_B = source_record.alias("b")


class ReviewError(DedupeError):
    """A steward action cannot be carried out as asked."""


class NotFoundError(ReviewError):
    """No such review item, record or golden record."""


class AlreadyDecidedError(ReviewError):
    """Someone decided this review item already (two stewards on one pair)."""


class ConflictError(ReviewError):
    """The action does not fit the current state (nothing to undo, the last member, a choice
    naming a record outside the pair, a record deleted since): a well-formed request that the
    API answers with 409, not 422."""


# ---------------------------------------------------------------------------------------------
# Reading the queue


def _person(data: dict[str, Any] | None) -> dict[str, Any]:
    data = data or {}
    name = data.get("full_name") or " ".join(
        p for p in (data.get("first_name"), data.get("last_name")) if p
    )
    return {
        "name": name or None,
        "email": (data.get("emails") or [None])[0],
        "company": data.get("company"),
    }


def _queue_query(
    columns: Iterable[Any],
    *,
    status: str,
    min_score: float | None,
    max_score: float | None,
    source: str | None,
    queued_before: datetime | None,
    queued_after: datetime | None,
    joined: bool = True,
) -> Select[Any]:
    a, b = _A, _B
    query = select(*columns).select_from(review_item)
    if joined or source:  # the count needs the records only to filter by source
        query = query.join(a, a.c.id == review_item.c.record_a).join(
            b, b.c.id == review_item.c.record_b
        )
    if status != "all":
        query = query.where(review_item.c.status == status)
    if min_score is not None:
        query = query.where(review_item.c.probability >= min_score)
    if max_score is not None:
        query = query.where(review_item.c.probability <= max_score)
    if source:
        query = query.where(or_(a.c.source == source, b.c.source == source))
    if queued_before is not None:
        query = query.where(review_item.c.created_at <= queued_before)
    if queued_after is not None:
        query = query.where(review_item.c.created_at >= queued_after)
    return query


def list_reviews(
    conn: Connection,
    *,
    status: str = "open",
    min_score: float | None = None,
    max_score: float | None = None,
    source: str | None = None,
    min_age_days: float | None = None,
    max_age_days: float | None = None,
    sort: str = "best",
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """One page of the queue and the total for the filters. `sort`: best (most probable)
    first, borderline (least probable) first, oldest or newest first. `min_age_days` /
    `max_age_days`: only pairs queued at least / at most that many days ago."""
    if status not in (*STATUSES, "all"):
        raise ReviewError(f"unknown status {status!r}: use one of {', '.join(STATUSES)} or all")
    if sort not in SORTS:
        raise ReviewError(f"unknown sort {sort!r}: use one of {', '.join(SORTS)}")
    for days in (min_age_days, max_age_days):
        if days is not None and not 0 <= days <= MAX_AGE_DAYS:
            raise ReviewError(f"an age of {days} days is out of range (0 to {MAX_AGE_DAYS})")
    now = datetime.now(UTC)

    def query_of(columns: list[Any], joined: bool = True) -> Select[Any]:
        return _queue_query(
            columns,
            status=status,
            min_score=min_score,
            max_score=max_score,
            source=source,
            queued_before=None if min_age_days is None else now - timedelta(days=min_age_days),
            queued_after=None if max_age_days is None else now - timedelta(days=max_age_days),
            joined=joined,
        )

    if source or min_age_days is not None or max_age_days is not None:
        # These filters cannot use the queue index: count at most COUNT_CAP + 1 rows.
        capped = query_of([review_item.c.id], joined=False).limit(COUNT_CAP + 1).subquery()
        total = int(conn.execute(select(func.count()).select_from(capped)).scalar_one())
    else:
        total = int(conn.execute(query_of([func.count()], joined=False)).scalar_one())
    a, b = _A, _B
    columns = [
        review_item.c.id,
        review_item.c.probability,
        review_item.c.status,
        review_item.c.created_at,
        review_item.c.decided_by,
        a.c.id.label("a_id"),
        a.c.source.label("a_source"),
        a.c.data.label("a_data"),
        b.c.id.label("b_id"),
        b.c.source.label("b_source"),
        b.c.data.label("b_data"),
    ]
    order = SORTS[sort]
    # Page the ids on the queue index first, then join the records of those rows only:
    # a deep OFFSET would otherwise join every skipped row (seen: 1 s at 100k on SQLite).
    page = (
        query_of([review_item.c.id], joined=False)
        .order_by(*order)
        .limit(max(1, min(limit, 500)))
        .offset(max(0, offset))
        .scalar_subquery()
        if not source
        else None
    )
    query = query_of(columns).order_by(*order)
    if page is not None:
        query = query.where(review_item.c.id.in_(page))
    else:
        query = query.limit(max(1, min(limit, 500))).offset(max(0, offset))
    rows = conn.execute(query).all()
    stale = stale_reasons(conn, [(r.a_id, r.b_id) for r in rows])
    items = [
        {
            "id": r.id,
            "probability": round(float(r.probability), 4),
            "status": r.status,
            "created_at": r.created_at.isoformat(),
            "decided_by": r.decided_by,
            "a": {"record_id": r.a_id, "source": r.a_source, **_person(r.a_data)},
            "b": {"record_id": r.b_id, "source": r.b_source, **_person(r.b_data)},
            "recheck": _recheck(stale.get((r.a_id, r.b_id))),
        }
        for r in rows
    ]
    return items, total


def _recheck(row: Any) -> dict[str, Any] | None:
    """Why a decided pair is back in the queue (its evidence changed since), or None."""
    if row is None:
        return None
    return {
        "reason": row.stale_reason,
        "decision": row.kind,
        "decided_by": row.created_by,
        "decided_at": row.created_at.isoformat(),
        "stale_since": row.stale_at.isoformat(),
    }


def review_counts(conn: Connection) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for status, n in conn.execute(
        select(review_item.c.status, func.count()).group_by(review_item.c.status)
    ):
        counts[str(status)] = int(n)
    return counts


def _golden_of(conn: Connection, record_ids: Iterable[int]) -> dict[int, int]:
    ids = list(record_ids)
    return {
        int(r): int(g)
        for r, g in conn.execute(
            select(membership.c.record_id, membership.c.golden_id).where(
                membership.c.record_id.in_(ids)
            )
        )
    }


def _fingerprint(status: str, hash_a: str, hash_b: str, golden_a: Any, golden_b: Any) -> str:
    """What the steward saw: a decision sent with an older fingerprint is stale."""
    raw = f"{status}|{hash_a}|{hash_b}|{golden_a}|{golden_b}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _known_id(value: int, what: str) -> None:
    if not 0 < value < 2**63:  # beyond the 64-bit id range: no such row (and no driver error)
        raise NotFoundError(f"no {what} {value}")


def show_review(conn: Connection, review_id: int) -> dict[str, Any]:
    """A review item with both records side by side, differing fields and per-field evidence."""
    _known_id(review_id, "review item")
    item = conn.execute(select(review_item).where(review_item.c.id == review_id)).first()
    if item is None:
        raise NotFoundError(f"no review item {review_id}", review_id=review_id)
    records = {
        r.id: r
        for r in conn.execute(
            select(source_record).where(source_record.c.id.in_([item.record_a, item.record_b]))
        )
    }
    goldens = _golden_of(conn, records)
    sides = {}
    for key, rid in (("a", item.record_a), ("b", item.record_b)):
        rec = records[rid]
        sides[key] = {
            "record_id": rid,
            "source": rec.source,
            "external_id": rec.external_id,
            "golden_id": goldens.get(rid),
            "deleted": bool(rec.deleted),
            "updated_at": rec.source_updated_at.isoformat() if rec.source_updated_at else None,
            "data": rec.data,
        }
    explanation = item.explanation or {}
    evidence = explanation.get("fields") or {}
    fields = []
    for name in _COMPARE_FIELDS:
        va, vb = sides["a"]["data"].get(name), sides["b"]["data"].get(name)
        if va in (None, "", []) and vb in (None, "", []):
            continue
        fields.append(
            {
                "field": name,
                "a": va,
                "b": vb,
                "differs": _norm(va) != _norm(vb),
                "choosable": name in CHOOSABLE_FIELDS
                and va not in (None, "")
                and vb not in (None, ""),
                "evidence": evidence.get(_EVIDENCE.get(name, name)),
            }
        )
    return {
        "id": item.id,
        "status": item.status,
        "probability": round(float(item.probability), 4),
        "created_at": item.created_at.isoformat(),
        "decided_by": item.decided_by,
        "decided_at": item.decided_at.isoformat() if item.decided_at else None,
        "a": sides["a"],
        "b": sides["b"],
        "same_golden": goldens.get(item.record_a) == goldens.get(item.record_b),
        "fields": fields,
        "explanation": explanation,
        "recheck": _recheck(
            stale_reasons(conn, [(item.record_a, item.record_b)]).get(
                (item.record_a, item.record_b)
            )
        ),
        "seen": _fingerprint(
            item.status,
            records[item.record_a].content_hash,
            records[item.record_b].content_hash,
            goldens.get(item.record_a),
            goldens.get(item.record_b),
        ),
    }


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.casefold().split())
    if isinstance(value, list):
        return sorted(_norm(v) for v in value)
    return value


# ---------------------------------------------------------------------------------------------
# Deciding


def _audit(
    conn: Connection,
    actor: str,
    action: str,
    details: dict[str, Any],
    now: datetime,
    goldens: Iterable[int] = (),
) -> int:
    """One audit entry, indexed under the golden records it touched (their history)."""
    audit_id = int(
        conn.execute(
            audit_log.insert()
            .values(at=now, actor=actor, action=action, details=details)
            .returning(audit_log.c.id)
        ).scalar_one()
    )
    link_goldens(conn, audit_id, [*goldens, *goldens_touched(action, details)])
    return audit_id


def _lock_open_item(conn: Connection, review_id: int, seen: str | None) -> Any:
    _known_id(review_id, "review item")
    query = select(review_item).where(review_item.c.id == review_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()  # two stewards on one pair: the second waits, then sees
    item = conn.execute(query).first()
    if item is None:
        raise NotFoundError(f"no review item {review_id}", review_id=review_id)
    if item.status != "open" and item.status != "skipped":
        raise AlreadyDecidedError(
            f"review item {review_id} was {item.status} by {item.decided_by or 'the pipeline'} "
            "already; reload the queue",
            review_id=review_id,
            status=item.status,
        )
    if seen is not None:
        hashes = dict(
            conn.execute(
                select(source_record.c.id, source_record.c.content_hash).where(
                    source_record.c.id.in_([item.record_a, item.record_b])
                )
            ).all()
        )
        goldens = _golden_of(conn, [item.record_a, item.record_b])
        now_seen = _fingerprint(
            item.status,
            hashes[item.record_a],
            hashes[item.record_b],
            goldens.get(item.record_a),
            goldens.get(item.record_b),
        )
        if now_seen != seen:
            raise StaleDecisionError(
                f"review item {review_id} changed since it was shown (a record was re-synced "
                "or merged); look at it again",
                review_id=review_id,
            )
    return item


def _constraint(conn: Connection, a: int, b: int) -> str | None:
    a, b = min(a, b), max(a, b)
    return conn.execute(
        select(merge_constraint.c.kind).where(
            merge_constraint.c.record_a == a, merge_constraint.c.record_b == b
        )
    ).scalar_one_or_none()


def _set_constraint(
    conn: Connection, a: int, b: int, kind: str | None, actor: str, now: datetime
) -> None:
    a, b = min(a, b), max(a, b)
    conn.execute(
        merge_constraint.delete().where(
            merge_constraint.c.record_a == a, merge_constraint.c.record_b == b
        )
    )
    if kind is not None:
        # The evidence this decision rests on: a later material change re-queues the pair.
        conn.execute(
            merge_constraint.insert().values(
                record_a=a,
                record_b=b,
                kind=kind,
                created_by=actor,
                created_at=now,
                evidence=snapshot(conn, (a, b)),
            )
        )


def _decide(conn: Connection, ids: list[int], status: str, actor: str | None, now: Any) -> None:
    if ids:
        conn.execute(
            review_item.update()
            .where(review_item.c.id.in_(ids))
            .values(status=status, decided_by=actor, decided_at=now)
        )


def _members(conn: Connection, golden_id: int) -> list[int]:
    return [
        int(r)
        for r in conn.execute(
            select(membership.c.record_id)
            .where(membership.c.golden_id == golden_id)
            .order_by(membership.c.record_id)
        ).scalars()
    ]


def _methods(conn: Connection, record_ids: list[int]) -> dict[str, str]:
    return {
        str(r): str(m)
        for r, m in conn.execute(
            select(membership.c.record_id, membership.c.method).where(
                membership.c.record_id.in_(record_ids)
            )
        )
    }


def apply_field_choices(conn: Connection, golden_ids: set[int]) -> None:
    """Overlay stewards' per-field choices on freshly survived golden records.

    A choice holds while its record is a live member with a value for the field; otherwise
    survivorship's value stands.
    """
    if not golden_ids:
        return
    rows = conn.execute(
        select(
            field_choice.c.golden_id,
            field_choice.c.field,
            field_choice.c.record_id,
            source_record.c.data,
        )
        .join(source_record, source_record.c.id == field_choice.c.record_id)
        .join(
            membership,
            and_(
                membership.c.record_id == field_choice.c.record_id,
                membership.c.golden_id == field_choice.c.golden_id,
            ),
        )
        .where(
            one_of(conn, field_choice.c.golden_id, sorted(golden_ids)),
            source_record.c.deleted == 0,
        )
    ).all()
    by_golden: dict[int, list[Any]] = {}
    for row in rows:
        by_golden.setdefault(int(row.golden_id), []).append(row)
    for golden_id, choices in by_golden.items():
        current = conn.execute(
            select(golden_record.c.fields, golden_record.c.lineage).where(
                golden_record.c.id == golden_id
            )
        ).one()
        fields, lineage = dict(current.fields or {}), dict(current.lineage or {})
        for choice in choices:
            value = (choice.data or {}).get(choice.field)
            if value not in (None, ""):
                fields[choice.field] = value
                lineage[choice.field] = int(choice.record_id)
        conn.execute(
            golden_record.update()
            .where(golden_record.c.id == golden_id)
            .values(fields=fields, lineage=lineage)
        )


def approve(
    db: Engine,
    review_id: int,
    actor: str,
    *,
    choices: dict[str, int] | None = None,
    seen: str | None = None,
) -> dict[str, Any]:
    """Merge the pair's golden records (the older id survives); `choices` maps a field to the
    record whose value the merged record keeps. Returns what happened, with the audit id."""
    now = datetime.now(UTC)
    choices = dict(choices or {})
    with write_transaction(db) as conn:
        item = _lock_open_item(conn, review_id, seen)
        a, b = int(item.record_a), int(item.record_b)
        goldens = _golden_of(conn, [a, b])
        if a not in goldens or b not in goldens:
            raise ConflictError(f"review item {review_id}: a record of the pair was deleted")
        ga, gb = goldens[a], goldens[b]
        for name, rid in choices.items():
            if name not in CHOOSABLE_FIELDS:
                raise ReviewError(
                    f"cannot choose field {name!r}: use one of {', '.join(CHOOSABLE_FIELDS)}",
                    field=name,
                )
            if rid not in (a, b):
                raise ConflictError(
                    f"field {name!r}: record {rid} is not one of the pair ({a}, {b})", field=name
                )
        survivor, alias = min(ga, gb), max(ga, gb)
        details: dict[str, Any] = {
            "review_id": review_id,
            "record_a": a,
            "record_b": b,
            "previous_status": item.status,
            "survivor": survivor,
            "alias": alias if alias != survivor else None,
            "alias_members": _members(conn, alias) if alias != survivor else [],
            "methods": _methods(conn, [a, b]),
            "constraint_before": _constraint(conn, a, b),
            "recheck": bool(stale_reasons(conn, [(a, b)])),
        }
        if alias != survivor:
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
            membership.update()
            .where(membership.c.record_id.in_([a, b]))
            .values(method="steward", probability=float(item.probability), decided_at=now)
        )
        _set_constraint(conn, a, b, "must_merge", actor, now)
        previous_choices = {}
        for name, rid in choices.items():
            previous_choices[name] = conn.execute(
                select(field_choice.c.record_id).where(
                    field_choice.c.golden_id == survivor, field_choice.c.field == name
                )
            ).scalar_one_or_none()
            conn.execute(
                field_choice.delete().where(
                    field_choice.c.golden_id == survivor, field_choice.c.field == name
                )
            )
            conn.execute(
                field_choice.insert().values(
                    golden_id=survivor, field=name, record_id=rid, created_by=actor, created_at=now
                )
            )
        details["choices"] = choices
        details["previous_choices"] = previous_choices
        _decide(conn, [review_id], "approved", actor, now)
        # Other open pairs now inside one golden record need no decision any more.
        members = _members(conn, survivor)
        inside = conn.execute(
            select(review_item.c.id, review_item.c.record_a, review_item.c.record_b).where(
                review_item.c.status.in_(["open", "skipped"]),
                review_item.c.record_a.in_(members),
                review_item.c.record_b.in_(members),
            )
        ).all()
        # A pair re-queued because its evidence changed waits for its own decision.
        stale = stale_reasons(conn, [(r.record_a, r.record_b) for r in inside])
        resolved = [int(r.id) for r in inside if (r.record_a, r.record_b) not in stale]
        _decide(conn, resolved, "merged", actor, now)
        details["resolved"] = resolved
        recompute_goldens(conn, {survivor}, now)
        audit_id = _audit(conn, actor, "review.approve", details, now)
    log.info("review %s approved by %s: golden %s <- %s", review_id, actor, survivor, alias)
    return {
        "review_id": review_id,
        "status": "approved",
        "record_a": a,
        "record_b": b,
        "golden_id": survivor,
        "merged": alias if alias != survivor else None,
        "resolved": resolved,
        "audit_id": audit_id,
    }


def reject(db: Engine, review_id: int, actor: str, *, seen: str | None = None) -> dict[str, Any]:
    """Not the same person: a do_not_merge constraint that later syncs honour."""
    now = datetime.now(UTC)
    with write_transaction(db) as conn:
        item = _lock_open_item(conn, review_id, seen)
        a, b = int(item.record_a), int(item.record_b)
        goldens = _golden_of(conn, [a, b])
        if a in goldens and goldens.get(a) == goldens.get(b):
            # Typically a confirmed merge re-queued for a re-check: a constraint alone would
            # leave them merged. Splitting one off is the explicit way apart.
            raise ConflictError(
                f"review item {review_id}: records {a} and {b} are both in golden record "
                f"{goldens[a]}; split one off (unmerge) to keep them apart",
                review_id=review_id,
            )
        details = {
            "review_id": review_id,
            "record_a": a,
            "record_b": b,
            "previous_status": item.status,
            "constraint_before": _constraint(conn, a, b),
            "recheck": bool(stale_reasons(conn, [(a, b)])),
        }
        _set_constraint(conn, a, b, "do_not_merge", actor, now)
        _decide(conn, [review_id], "rejected", actor, now)
        audit_id = _audit(conn, actor, "review.reject", details, now)
    log.info("review %s rejected by %s", review_id, actor)
    return {"review_id": review_id, "status": "rejected", "audit_id": audit_id}


def skip(db: Engine, review_id: int, actor: str) -> dict[str, Any]:
    """Put the pair aside (status skipped); it leaves the open queue until undone."""
    now = datetime.now(UTC)
    with write_transaction(db) as conn:
        item = _lock_open_item(conn, review_id, None)
        if item.status == "skipped":
            raise AlreadyDecidedError(f"review item {review_id} is skipped already")
        _decide(conn, [review_id], "skipped", actor, now)
        audit_id = _audit(conn, actor, "review.skip", {"review_id": review_id}, now)
    return {"review_id": review_id, "status": "skipped", "audit_id": audit_id}


def unmerge(db: Engine, record_id: int, actor: str) -> dict[str, Any]:
    """Split source record `record_id` off its golden record into a golden record of its own.

    do_not_merge constraints against the other members keep later syncs from folding it back.
    """
    now = datetime.now(UTC)
    _known_id(record_id, "source record")
    with write_transaction(db) as conn:
        golden_id = conn.execute(
            select(membership.c.golden_id).where(membership.c.record_id == record_id)
        ).scalar_one_or_none()
        if golden_id is None:
            raise NotFoundError(f"no source record {record_id} in any golden record")
        golden_id = int(golden_id)
        if conn.dialect.name == "postgresql":
            conn.execute(
                select(golden_record.c.id).where(golden_record.c.id == golden_id).with_for_update()
            )
        others = [r for r in _members(conn, golden_id) if r != record_id]
        if not others:
            raise ConflictError(
                f"record {record_id} is the only member of golden record {golden_id}: "
                "nothing to split off",
                record_id=record_id,
            )
        new_id = allocate_ids(conn, golden_record, 1)[0]
        conn.execute(
            golden_record.insert().values(
                id=new_id, fields={}, lineage={}, version=1, created_at=now, updated_at=now
            )
        )
        details: dict[str, Any] = {
            "record_id": record_id,
            "golden_id": golden_id,
            "new_golden_id": new_id,
            "methods": _methods(conn, [record_id]),
            "constraints_before": {str(o): _constraint(conn, record_id, o) for o in others},
            "choices_removed": [
                [str(f), int(r)]
                for f, r in conn.execute(
                    select(field_choice.c.field, field_choice.c.record_id).where(
                        field_choice.c.golden_id == golden_id,
                        field_choice.c.record_id == record_id,
                    )
                )
            ],
        }
        conn.execute(
            membership.update()
            .where(membership.c.record_id == record_id)
            .values(golden_id=new_id, method="steward", probability=None, decided_at=now)
        )
        for other in others:
            _set_constraint(conn, record_id, other, "do_not_merge", actor, now)
        conn.execute(
            field_choice.delete().where(
                field_choice.c.golden_id == golden_id, field_choice.c.record_id == record_id
            )
        )
        recompute_goldens(conn, {golden_id, new_id}, now)
        audit_id = _audit(conn, actor, "golden.unmerge", details, now)
    log.info("record %s split off golden %s into %s by %s", record_id, golden_id, new_id, actor)
    return {
        "record_id": record_id,
        "golden_id": golden_id,
        "new_golden_id": new_id,
        "audit_id": audit_id,
    }


# ---------------------------------------------------------------------------------------------
# Bulk approval by rule bucket: a named rule over the matcher's per-field evidence; a steward
# looks at a random sample, then approves the whole bucket (each pair audited on its own).


def _levels(explanation: dict[str, Any] | None) -> dict[str, str]:
    fields = (explanation or {}).get("fields") or {}
    return {name: str(entry.get("level")) for name, entry in fields.items()}


def _no_conflict(levels: dict[str, str]) -> bool:
    return "different" not in levels.values()


BUCKETS: dict[str, tuple[str, Any]] = {
    "same-email": (
        "Same canonical email, no conflicting field",
        lambda lv: lv.get("email") == "exact" and _no_conflict(lv),
    ),
    "same-phone": (
        "Same phone number, no conflicting field",
        lambda lv: lv.get("phone") == "exact" and _no_conflict(lv),
    ),
    "same-name-company": (
        "Same name (or nickname) at the same company, no conflicting field",
        lambda lv: (
            lv.get("first_name") in ("exact", "nickname")
            and lv.get("last_name") == "exact"
            and lv.get("company") == "exact"
            and _no_conflict(lv)
        ),
    ),
}


def _bucket_ids(conn: Connection, bucket: str) -> list[int]:
    if bucket not in BUCKETS:
        raise NotFoundError(f"no bucket {bucket!r}: use one of {', '.join(BUCKETS)}")
    rule = BUCKETS[bucket][1]
    rows = conn.execute(
        select(review_item.c.id, review_item.c.explanation)
        .where(review_item.c.status == "open")
        .order_by(review_item.c.id)
        .execution_options(yield_per=2000)
    )
    return [int(i) for i, explanation in rows if rule(_levels(explanation))]


def bucket_counts(conn: Connection) -> list[dict[str, Any]]:
    """Each bucket with its label and how many open pairs fall in it."""
    counts = dict.fromkeys(BUCKETS, 0)
    rows = conn.execute(
        select(review_item.c.explanation)
        .where(review_item.c.status == "open")
        .execution_options(yield_per=2000)
    )
    for (explanation,) in rows:
        levels = _levels(explanation)
        for name, (_label, rule) in BUCKETS.items():
            if rule(levels):
                counts[name] += 1
    return [{"bucket": n, "label": BUCKETS[n][0], "count": c} for n, c in counts.items()]


def bucket_preview(
    conn: Connection, bucket: str, *, sample: int = 5, seed: int | None = None
) -> dict[str, Any]:
    """The bucket's size and a random sample of its pairs to look at before approving."""
    ids = _bucket_ids(conn, bucket)
    picked = sorted(random.Random(seed).sample(ids, min(sample, len(ids))))
    return {
        "bucket": bucket,
        "label": BUCKETS[bucket][0],
        "count": len(ids),
        "sample": [show_review(conn, i) for i in picked],
    }


def approve_bucket(db: Engine, bucket: str, actor: str, *, expected: int) -> dict[str, Any]:
    """Approve every open pair in `bucket`, if it still holds `expected` pairs (the count the
    steward confirmed); pairs decided meanwhile by someone else are left out."""
    with db.connect() as conn:
        ids = _bucket_ids(conn, bucket)
    if len(ids) != expected:
        raise StaleDecisionError(
            f"bucket {bucket!r} holds {len(ids)} pairs now, not the {expected} you confirmed; "
            "preview it again",
            bucket=bucket,
        )
    approved, passed = [], []
    for review_id in ids:
        try:
            approve(db, review_id, actor)
        except (AlreadyDecidedError, ReviewError):
            passed.append(review_id)  # resolved by an earlier merge in this bucket, or gone
        else:
            approved.append(review_id)
    log.info("bucket %s: %s approved by %s", bucket, len(approved), actor)
    return {"bucket": bucket, "approved": len(approved), "passed_over": passed}


# ---------------------------------------------------------------------------------------------
# Undo and the audit trail


def undo_last(db: Engine, actor: str) -> dict[str, Any]:
    """Undo `actor`'s most recent action that is not undone yet."""
    now = datetime.now(UTC)
    with write_transaction(db) as conn:
        rows = conn.execute(
            select(audit_log.c.id, audit_log.c.action, audit_log.c.details)
            .where(audit_log.c.actor == actor, audit_log.c.action.in_([*_UNDOABLE, "undo"]))
            .order_by(audit_log.c.id.desc())
            .limit(200)
        ).all()
        undone = {int(r.details.get("undid", 0)) for r in rows if r.action == "undo"}
        target = next((r for r in rows if r.action != "undo" and r.id not in undone), None)
        if target is None:
            raise ConflictError(f"nothing to undo for {actor}")
        details = dict(target.details)
        if target.action == "review.approve":
            _undo_approve(conn, details, actor, now)
        elif target.action == "review.reject":
            a, b = details["record_a"], details["record_b"]
            _set_constraint(conn, a, b, details["constraint_before"], actor, now)
            _reopen(conn, details)
        elif target.action == "review.skip":
            _reopen(conn, details)
        else:
            _undo_unmerge(conn, details, actor, now)
        audit_id = _audit(
            conn,
            actor,
            "undo",
            {"undid": int(target.id), "action": target.action},
            now,
            goldens_touched(target.action, details),
        )
    log.info("%s undid audit entry %s (%s)", actor, target.id, target.action)
    return {"undid": int(target.id), "action": target.action, "audit_id": audit_id}


def _reopen(conn: Connection, details: dict[str, Any]) -> None:
    status = details.get("previous_status", "open")
    _decide(conn, [int(details["review_id"])], status, None, None)


def _restore_methods(conn: Connection, methods: dict[str, str]) -> None:
    for rid, method in methods.items():
        conn.execute(
            membership.update().where(membership.c.record_id == int(rid)).values(method=method)
        )


def _undo_approve(conn: Connection, details: dict[str, Any], actor: str, now: datetime) -> None:
    survivor, alias = int(details["survivor"]), details.get("alias")
    if resolve_golden_id(conn, survivor) != survivor:
        raise StaleDecisionError(
            f"cannot undo: golden record {survivor} was merged again since; unmerge instead"
        )
    touched = {survivor}
    if alias is not None:
        back = [r for r in details["alias_members"] if r in set(_members(conn, survivor))]
        conn.execute(
            membership.update()
            .where(membership.c.record_id.in_(back))
            .values(golden_id=int(alias), decided_at=now)
        )
        conn.execute(
            golden_record.update()
            .where(golden_record.c.id == int(alias))
            .values(merged_into=None, updated_at=now)
        )
        touched.add(int(alias))
    _restore_methods(conn, details["methods"])
    _set_constraint(
        conn, details["record_a"], details["record_b"], details["constraint_before"], actor, now
    )
    for name, previous in (details.get("previous_choices") or {}).items():
        conn.execute(
            field_choice.delete().where(
                field_choice.c.golden_id == survivor, field_choice.c.field == name
            )
        )
        if previous is not None:
            conn.execute(
                field_choice.insert().values(
                    golden_id=survivor,
                    field=name,
                    record_id=int(previous),
                    created_by=actor,
                    created_at=now,
                )
            )
    _reopen(conn, details)
    _decide(conn, [int(i) for i in details.get("resolved", [])], "open", None, None)
    recompute_goldens(conn, touched, now)


def _undo_unmerge(conn: Connection, details: dict[str, Any], actor: str, now: datetime) -> None:
    record_id, new_id = int(details["record_id"]), int(details["new_golden_id"])
    if _members(conn, new_id) != [record_id]:
        raise StaleDecisionError(f"cannot undo: golden record {new_id} changed since the unmerge")
    target = resolve_golden_id(conn, int(details["golden_id"]))
    if target is None:
        raise NotFoundError(f"golden record {details['golden_id']} is gone; cannot undo")
    conn.execute(
        membership.update()
        .where(membership.c.record_id == record_id)
        .values(golden_id=target, decided_at=now)
    )
    # The split-off id keeps resolving (someone may have bookmarked it).
    conn.execute(
        golden_record.update()
        .where(golden_record.c.id == new_id)
        .values(merged_into=target, updated_at=now)
    )
    _restore_methods(conn, details["methods"])
    for other, kind in details["constraints_before"].items():
        _set_constraint(conn, record_id, int(other), kind, actor, now)
    for name, rid in details.get("choices_removed", []):
        conn.execute(
            field_choice.insert().values(
                golden_id=target, field=name, record_id=rid, created_by=actor, created_at=now
            )
        )
    recompute_goldens(conn, {target}, now)


def audit_entries(
    conn: Connection, *, actor: str | None = None, limit: int = 100, offset: int = 0
) -> list[dict[str, Any]]:
    query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit).offset(offset)
    if actor:
        query = query.where(audit_log.c.actor == actor)
    return [
        {
            "id": r.id,
            "at": r.at.isoformat(),
            "actor": r.actor,
            "action": r.action,
            "details": r.details,
        }
        for r in conn.execute(query)
    ]
