"""Steward decisions that age well: the evidence a constraint rests on, and re-checks.

A steward's decision on a pair (`do_not_merge` for "not the same person", `must_merge` for a
confirmed merge, both rows of `merge_constraint`) is taken on what the two records said at
the time. `snapshot` keeps that evidence with the constraint: each record's identity fields in
normalised form (emails, phones, name, company), with the value as written so a reason can
quote it. `recheck` runs after matching, in the page's transaction: when a later sync changes
a constrained record's identity materially (an email or phone gained or lost, the name or
company changed), the constraint is marked stale and the pair goes back to the review queue
with a reason a steward understands. Cosmetic edits (case, spacing, punctuation, a legal
suffix, gmail dots) normalise the same and change nothing.

Until a steward decides again the constraint keeps working: a do-not-merge still blocks and a
confirmed merge still holds. A new decision replaces the row (sync/review.py), with a fresh
snapshot and no stale mark. One change re-queues once: `stale_key` fingerprints the evidence
the pair was re-queued for, and the same evidence seen again does nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from sqlalchemy import Connection, and_, or_, select

from crmhub.records import Contact
from dedupe import Matcher
from dedupe.normalize import company_key, email_key, fold
from sync.staging import chunks
from sync.store import merge_constraint, one_of, review_item, source_record

__all__ = [
    "EVIDENCE_FIELDS",
    "Changed",
    "changes",
    "evidence_of",
    "recheck",
    "snapshot",
    "stale_reasons",
]

EVIDENCE_FIELDS = ("emails", "phones", "name", "company")
# A reason names at most this many changes ("... and 3 more").
MAX_PHRASES = 6
_KIND_WORDS = {"do_not_merge": "not the same person", "must_merge": "the same person"}
# The review item's status a constraint of each kind stands for (a reverted change restores it).
_DECIDED = {"do_not_merge": "rejected", "must_merge": "approved"}
_PHONE_NOISE = re.compile(r"[^0-9+]")


class Changed(Protocol):
    """A matched record as the pipeline hands it over (sync.golden.MatchInput is one)."""

    @property
    def record_id(self) -> int: ...

    @property
    def status(self) -> str: ...


def _name(data: Mapping[str, Any]) -> str:
    parts = [data.get("first_name"), data.get("last_name")]
    written = " ".join(str(p).strip() for p in parts if p and str(p).strip())
    return written or str(data.get("full_name") or "").strip()


def evidence_of(data: Mapping[str, Any]) -> dict[str, Any]:
    """One mapped contact's identity, normalised: `{"emails": {key: as written}, "phones":
    {key: as written}, "name": [key, as written], "company": [key, as written]}`.

    Keys are what matching compares (email identity keys, digits of a phone, folded name,
    company without legal form), so only a change of a key is material.
    """
    emails: dict[str, str] = {}
    for email in data.get("emails") or []:
        if email and str(email).strip():
            emails.setdefault(email_key(str(email)), str(email).strip())
    phones: dict[str, str] = {}
    for phone in data.get("phones") or []:
        key = _PHONE_NOISE.sub("", str(phone or ""))
        if key.strip("+"):
            phones.setdefault(key, str(phone).strip())
    name = _name(data)
    company = str(data.get("company") or "").strip()
    return {
        "emails": emails,
        "phones": phones,
        "name": [fold(name), name],
        "company": [company_key(company) if company else "", company],
    }


def _values(found: Mapping[str, Any] | None, what: str) -> dict[str, str]:
    return dict((found or {}).get(what) or {})


def _scalar(found: Mapping[str, Any] | None, what: str) -> tuple[str, str]:
    pair = (found or {}).get(what) or ["", ""]
    return str(pair[0] or ""), str(pair[1] or "")


def changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """What changed materially between two `evidence_of` results, in words (empty: nothing)."""
    out: list[str] = []
    for what, noun in (("emails", "email"), ("phones", "phone")):
        old, new = _values(before, what), _values(after, what)
        out += [f"gained {noun} {new[k]}" for k in new if k not in old]
        out += [f"lost {noun} {old[k]}" for k in old if k not in new]
    for what in ("name", "company"):
        (old_key, old_shown), (new_key, new_shown) = _scalar(before, what), _scalar(after, what)
        if old_key == new_key:
            continue
        if not old_key:
            out.append(f"gained {what} '{new_shown}'")
        elif not new_key:
            out.append(f"lost {what} '{old_shown}'")
        else:
            out.append(f"{what} changed from '{old_shown}' to '{new_shown}'")
    return out


def snapshot(conn: Connection, record_ids: Iterable[int]) -> dict[str, Any]:
    """The evidence of `record_ids` now, keyed by record id (as text: it is stored as JSON)."""
    ids = sorted(set(record_ids))
    rows = conn.execute(
        select(source_record.c.id, source_record.c.data).where(
            one_of(conn, source_record.c.id, ids)
        )
    )
    return {str(rid): evidence_of(data or {}) for rid, data in rows}


def _key(evidence: Mapping[str, Any]) -> str:
    """A fingerprint of the normalised identity only (what is written may vary freely)."""
    canonical = {
        rid: {
            "emails": sorted(_values(found, "emails")),
            "phones": sorted(_values(found, "phones")),
            "name": _scalar(found, "name")[0],
            "company": _scalar(found, "company")[0],
        }
        for rid, found in evidence.items()
    }
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _reason(
    row: Any, records: Mapping[int, Any], found: Sequence[tuple[str, int, list[str]]]
) -> str:
    who = row.created_by or "a steward"
    when = row.created_at.astimezone(UTC).date().isoformat()
    kind = _KIND_WORDS.get(row.kind, row.kind)
    phrases: list[str] = []
    for side, rid, said in found:
        source = records[rid].source
        phrases += [f"record {side} ({source}) {p}" for p in said]
    more = len(phrases) - MAX_PHRASES
    text = "; ".join(phrases[:MAX_PHRASES]) + (f"; and {more} more" if more > 0 else "")
    return f"since {who} decided on {when} ({kind}), {text}"


def _constraints_of(conn: Connection, ids: Sequence[int]) -> list[Any]:
    rows: dict[tuple[int, int], Any] = {}
    for part in chunks(sorted(ids)):
        for row in conn.execute(
            select(merge_constraint).where(
                or_(
                    one_of(conn, merge_constraint.c.record_a, part),
                    one_of(conn, merge_constraint.c.record_b, part),
                )
            )
        ):
            rows[(row.record_a, row.record_b)] = row
    return list(rows.values())


def _where_pair(table: Any, a: int, b: int) -> Any:
    return and_(table.c.record_a == a, table.c.record_b == b)


def recheck(
    conn: Connection,
    matcher: Matcher,
    matched: Iterable[Changed],
    now: datetime | None = None,
) -> int:
    """Re-check the constraints on the "changed" records of `matched`; returns how many
    pairs went back to the review queue. Call after matching, in the same transaction.

    A constraint whose records' identity changed materially since the decision is marked stale
    and its review item reopened (created for constraints without one, such as an unmerge's),
    scored afresh by `matcher`, with the reason. The same change never re-queues twice; a
    change undone again (the evidence is back to what was decided on) clears the stale mark
    and restores the decision. Constraints older than their evidence get a snapshot now.
    """
    now = now or datetime.now(UTC)
    requeued = 0
    ids = sorted({m.record_id for m in matched if m.status == "changed"})
    rows = _constraints_of(conn, ids) if ids else []
    records: dict[int, Any] = {}
    involved = {r for row in rows for r in (row.record_a, row.record_b)}
    for part in chunks(sorted(involved)):
        for rec in conn.execute(
            select(
                source_record.c.id,
                source_record.c.source,
                source_record.c.data,
                source_record.c.deleted,
            ).where(one_of(conn, source_record.c.id, part))
        ):
            records[int(rec.id)] = rec
    for row in rows:
        a, b = int(row.record_a), int(row.record_b)
        if records[a].deleted or records[b].deleted:
            continue  # a deleted record: the pair is nobody's to look at again
        current = {str(r): evidence_of(records[r].data or {}) for r in (a, b)}
        if row.evidence is None:  # decided before evidence was kept: this is the baseline
            conn.execute(
                merge_constraint.update()
                .where(_where_pair(merge_constraint, a, b))
                .values(evidence=current)
            )
            continue
        found = [
            (side, r, changes(row.evidence.get(str(r)) or {}, current[str(r)]))
            for side, r in (("A", a), ("B", b))
        ]
        if not any(said for _, _, said in found):
            if row.stale_at is not None:
                _clear(conn, row, now)
            continue
        key = _key(current)
        if key == row.stale_key:
            continue  # re-queued for exactly this evidence already
        conn.execute(
            merge_constraint.update()
            .where(_where_pair(merge_constraint, a, b))
            .values(stale_reason=_reason(row, records, found), stale_key=key, stale_at=now)
        )
        requeued += _reopen(conn, matcher, a, b, records, now)
    _reopen_settled(conn)
    return requeued


def _reopen(
    conn: Connection, matcher: Matcher, a: int, b: int, records: Mapping[int, Any], now: datetime
) -> int:
    """Put the pair back in the queue, scored on its records as they are now; 1 if it was not
    open already."""
    decision = matcher.compare(
        Contact.model_validate(records[a].data), Contact.model_validate(records[b].data)
    )
    scored = {"probability": decision.probability, "explanation": decision.explanation}
    status = conn.execute(
        select(review_item.c.status).where(_where_pair(review_item, a, b))
    ).scalar_one_or_none()
    if status is None:
        conn.execute(
            review_item.insert().values(
                record_a=a, record_b=b, status="open", created_at=now, **scored
            )
        )
        return 1
    conn.execute(
        review_item.update()
        .where(_where_pair(review_item, a, b))
        .values(status="open", decided_by=None, decided_at=None, **scored)
    )
    return 0 if status == "open" else 1


def _clear(conn: Connection, row: Any, now: datetime) -> None:
    """The evidence is back to what was decided on: the decision stands as it was."""
    a, b = int(row.record_a), int(row.record_b)
    conn.execute(
        merge_constraint.update()
        .where(_where_pair(merge_constraint, a, b))
        .values(stale_reason=None, stale_key=None, stale_at=None)
    )
    conn.execute(
        review_item.update()
        .where(_where_pair(review_item, a, b), review_item.c.status.in_(["open", "skipped"]))
        .values(
            status=_DECIDED.get(row.kind, "rejected"),
            decided_by=row.created_by,
            decided_at=row.created_at,
        )
    )


def _reopen_settled(conn: Connection) -> None:
    """A stale pair stays in the queue until a steward decides it: the pipeline settles open
    pairs whose records share a golden record (a confirmed merge's always do), so reopen any
    stale pair it settled. Starts from the stale constraints (few, and indexed)."""
    settled = (
        conn.execute(
            select(review_item.c.id)
            .select_from(merge_constraint)
            .join(
                review_item,
                and_(
                    review_item.c.record_a == merge_constraint.c.record_a,
                    review_item.c.record_b == merge_constraint.c.record_b,
                ),
            )
            .where(merge_constraint.c.stale_at.is_not(None), review_item.c.status == "merged")
        )
        .scalars()
        .all()
    )
    for part in chunks(sorted(settled)):
        conn.execute(
            review_item.update()
            .where(one_of(conn, review_item.c.id, part))
            .values(status="open", decided_by=None, decided_at=None)
        )


def stale_reasons(conn: Connection, pairs: Iterable[tuple[int, int]]) -> dict[tuple[int, int], Any]:
    """The stale constraints among `pairs` (record_a < record_b): pair -> row with `kind`,
    `stale_reason`, `stale_at`, `created_by`, `created_at`."""
    wanted = sorted(set(pairs))
    if not wanted:
        return {}
    found: dict[tuple[int, int], Any] = {}
    for part in chunks(wanted):
        asked = set(part)
        firsts = sorted({a for a, _ in part})
        for row in conn.execute(
            select(
                merge_constraint.c.record_a,
                merge_constraint.c.record_b,
                merge_constraint.c.kind,
                merge_constraint.c.stale_reason,
                merge_constraint.c.stale_at,
                merge_constraint.c.created_by,
                merge_constraint.c.created_at,
            ).where(
                merge_constraint.c.stale_at.is_not(None),
                one_of(conn, merge_constraint.c.record_a, firsts),
            )
        ):
            pair = (int(row.record_a), int(row.record_b))
            if pair in asked:
                found[pair] = row
    return found
