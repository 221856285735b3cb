"""A golden record's history: how each member came in, and every steward action on it.

Two sources: `membership` says when and how each current member joined (new, auto-merge with
its probability, steward), and `audit_log` holds the steward actions that touched the record or
a record merged into it (merges, splits, and undos of those), found through `audit_golden`,
which sync/review.py fills in the same transaction as each entry. Like the audit log, the
history carries ids and states only, never personal data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, select

from sync.store import audit_golden, audit_log, golden_record, membership, source_record

__all__ = ["golden_history", "goldens_touched", "link_goldens"]

# The golden ids an action's audit details name (an undo touches those of the entry it undid).
_KEYS = {"review.approve": ("survivor", "alias"), "golden.unmerge": ("golden_id", "new_golden_id")}


def goldens_touched(action: str, details: dict[str, Any]) -> set[int]:
    return {int(details[k]) for k in _KEYS.get(action, ()) if details.get(k) is not None}


def link_goldens(conn: Connection, audit_id: int, goldens: Iterable[int]) -> None:
    """Index audit entry `audit_id` under each golden record it touched."""
    rows = [{"golden_id": g, "audit_id": audit_id} for g in sorted(set(goldens))]
    if rows:
        conn.execute(audit_golden.insert(), rows)


def _entry(row: Any) -> dict[str, Any]:
    return {
        "at": row.at.isoformat(),
        "actor": row.actor,
        "action": row.action,
        "audit_id": int(row.id),
        "details": row.details,
    }


def golden_history(conn: Connection, golden_id: int, *, limit: int = 50) -> list[dict[str, Any]]:
    """Newest first: steward actions on golden record `golden_id` (or on ids merged into it)
    and the sync's joins of its current members, at most `limit` of each."""
    ids = [
        golden_id,
        *conn.execute(
            select(golden_record.c.id).where(golden_record.c.merged_into == golden_id)
        ).scalars(),
    ]
    actions = conn.execute(
        select(audit_log)
        .where(
            audit_log.c.id.in_(
                select(audit_golden.c.audit_id).where(audit_golden.c.golden_id.in_(ids))
            )
        )
        .order_by(audit_log.c.id.desc())
        .limit(limit)
    ).all()
    joins = conn.execute(
        select(
            membership.c.record_id,
            membership.c.method,
            membership.c.probability,
            membership.c.decided_at,
            source_record.c.source,
            source_record.c.external_id,
        )
        .join(source_record, source_record.c.id == membership.c.record_id)
        .where(membership.c.golden_id == golden_id, membership.c.method != "steward")
        .order_by(membership.c.decided_at.desc())
        .limit(limit)
    ).all()
    entries = [_entry(r) for r in actions]
    entries += [
        {
            "at": j.decided_at.isoformat(),
            "actor": "sync",
            "action": f"joined.{j.method}",  # joined.new (the first member) or joined.auto
            "audit_id": None,
            "details": {
                "record_id": int(j.record_id),
                "source": j.source,
                "external_id": j.external_id,
                "probability": j.probability,
            },
        }
        for j in joins
    ]
    created = conn.execute(
        select(golden_record.c.created_at).where(golden_record.c.id == golden_id)
    ).scalar_one_or_none()
    if created is not None:
        entries.append(
            {
                "at": created.isoformat(),
                "actor": "sync",
                "action": "created",
                "audit_id": None,
                "details": {},
            }
        )
    # Newest first; at the same instant, "created" comes last (it happened first).
    entries.sort(
        key=lambda e: (e["at"], e["action"] != "created", e["audit_id"] or 0), reverse=True
    )
    return entries
