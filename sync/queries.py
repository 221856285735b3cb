"""Read-side queries shared by the CLI, the API and the web UI."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, and_, exists, func, or_, select

from dedupe.matcher import email_key
from sync.store import (
    activity,
    activity_participant,
    dead_letter,
    golden_record,
    live_contact,
    match_key,
    membership,
    review_item,
    source_record,
    sync_run,
)

__all__ = [
    "consent_summary",
    "dead_letters",
    "find_contact_record",
    "golden_detail",
    "iter_golden",
    "iter_xref",
    "list_golden",
    "list_runs",
    "resolve_golden_id",
    "search_golden",
    "store_totals",
]

_live = and_(
    golden_record.c.merged_into.is_(None),
    exists().where(membership.c.golden_id == golden_record.c.id),
)


def store_totals(conn: Connection) -> dict[str, int]:
    def count(query: Any) -> int:
        return int(conn.execute(query).scalar_one())

    return {
        "contacts": count(select(func.count()).select_from(source_record).where(live_contact)),
        "activities": count(select(func.count()).select_from(activity)),
        "golden_records": count(select(func.count()).select_from(golden_record).where(_live)),
        "open_reviews": count(
            select(func.count()).select_from(review_item).where(review_item.c.status == "open")
        ),
        "dead_letters": count(
            select(func.count()).select_from(dead_letter).where(dead_letter.c.scope == "record")
        ),
    }


def _summary(row: Any) -> dict[str, Any]:
    fields = row.fields or {}
    return {
        "id": row.id,
        "name": fields.get("full_name"),
        "email": (fields.get("emails") or [None])[0],
        "phone": (fields.get("phones") or [None])[0],
        "company": fields.get("company"),
        "members": row.members,
        "sources": sorted(set((row.sources or "").split(","))) if row.sources else [],
    }


def _golden_query_for(conn: Connection) -> Any:
    distinct_source = source_record.c.source.distinct()
    aggregate = (
        func.string_agg(distinct_source, ",")
        if conn.dialect.name == "postgresql"
        else func.group_concat(distinct_source)
    )
    sources = (
        select(aggregate)
        .join(membership, membership.c.record_id == source_record.c.id)
        .where(membership.c.golden_id == golden_record.c.id)
        .scalar_subquery()
    )
    members = (
        select(func.count())
        .select_from(membership)
        .where(membership.c.golden_id == golden_record.c.id)
        .scalar_subquery()
    )
    return select(
        golden_record.c.id,
        golden_record.c.fields,
        members.label("members"),
        sources.label("sources"),
    ).where(_live)


def list_golden(
    conn: Connection, *, limit: int = 50, offset: int = 0, merged_only: bool = False
) -> list[dict[str, Any]]:
    query = _golden_query_for(conn)
    if merged_only:
        query = query.where(
            select(func.count())
            .select_from(membership)
            .where(membership.c.golden_id == golden_record.c.id)
            .scalar_subquery()
            > 1
        )
    rows = conn.execute(query.order_by(golden_record.c.id).limit(limit).offset(offset))
    return [_summary(r) for r in rows]


def search_golden(conn: Connection, text: str, *, limit: int = 50) -> list[dict[str, Any]]:
    """Golden records whose member records match `text` by email, phone, name or company."""
    needle = text.strip().lower()
    conditions = []
    if "@" in needle:
        conditions.append(
            and_(match_key.c.key_kind == "email", match_key.c.key_value == email_key(needle))
        )
    digits = "".join(ch for ch in needle if ch.isdigit())
    if len(digits) >= 6:
        conditions.append(
            and_(match_key.c.key_kind == "phone", match_key.c.key_value.like(f"%{digits[-9:]}"))
        )
    ids: set[int] = set()
    if conditions:
        ids.update(
            conn.execute(
                select(membership.c.golden_id)
                .join(match_key, match_key.c.record_id == membership.c.record_id)
                .where(or_(*conditions))
            ).scalars()
        )
    # LIKE's own wildcards in the text match themselves ("100%" is not "100 and anything").
    literal = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    pattern = f"%{literal}%"
    for column in ("full_name", "company"):
        value = func.lower(golden_record.c.fields[column].as_string())
        ids.update(
            conn.execute(
                select(golden_record.c.id)
                .where(_live, value.like(pattern, escape="\\"))
                .limit(limit)
            ).scalars()
        )
    if not ids:
        return []
    query = _golden_query_for(conn).where(golden_record.c.id.in_(sorted(ids)[:limit]))
    return [_summary(r) for r in conn.execute(query.order_by(golden_record.c.id))]


def resolve_golden_id(conn: Connection, golden_id: int) -> int | None:
    """Follow merge aliases: an id merged into another resolves to the survivor."""
    seen = set()
    current: int | None = golden_id
    while current is not None and current not in seen:
        seen.add(current)
        row = conn.execute(
            select(golden_record.c.merged_into).where(golden_record.c.id == current)
        ).first()
        if row is None:
            return None
        if row[0] is None:
            return current
        current = row[0]
    return current


def golden_detail(conn: Connection, golden_id: int) -> dict[str, Any] | None:
    """A golden record with its fields, lineage, members and activity timeline."""
    resolved = resolve_golden_id(conn, golden_id)
    if resolved is None:
        return None
    golden = conn.execute(select(golden_record).where(golden_record.c.id == resolved)).one()
    members = conn.execute(
        select(
            source_record.c.id,
            source_record.c.source,
            source_record.c.external_id,
            source_record.c.data,
            source_record.c.deleted,
            membership.c.method,
        )
        .join(membership, membership.c.record_id == source_record.c.id)
        .where(membership.c.golden_id == resolved)
        .order_by(source_record.c.id)
    ).all()
    by_id = {m.id: m for m in members}
    lineage = {
        name: {"record_id": rid, "source": by_id[rid].source, "external_id": by_id[rid].external_id}
        if rid in by_id
        else {"record_id": rid}
        for name, rid in (golden.lineage or {}).items()
    }
    keys = (
        conn.execute(
            select(match_key.c.key_value).where(
                match_key.c.key_kind == "email", match_key.c.record_id.in_(list(by_id) or [-1])
            )
        )
        .scalars()
        .all()
    )
    timeline = conn.execute(
        select(
            activity.c.record_id,
            activity.c.type,
            activity.c.occurred_at,
            activity.c.subject,
            source_record.c.source,
            source_record.c.external_id,
        )
        .join(source_record, source_record.c.id == activity.c.record_id)
        .where(
            activity.c.record_id.in_(
                select(activity_participant.c.record_id).where(
                    activity_participant.c.email_key.in_(list(keys) or [""])
                )
            )
        )
        .order_by(activity.c.occurred_at.desc())
        .limit(200)
    ).all()
    return {
        "id": resolved,
        "requested_id": golden_id,
        "version": golden.version,
        "fields": golden.fields,
        "lineage": lineage,
        "consent": consent_summary(golden.fields or {}, lineage),
        "members": [
            {
                "record_id": m.id,
                "source": m.source,
                "external_id": m.external_id,
                "method": m.method,
                "deleted": bool(m.deleted),
                "data": m.data,
            }
            for m in members
        ],
        "timeline": [
            {
                "record_id": t.record_id,
                "type": t.type,
                "occurred_at": t.occurred_at.isoformat(),
                "subject": t.subject,
                "source": t.source,
            }
            for t in _one_per_message(timeline)
        ],
    }


def consent_summary(fields: dict[str, Any], lineage: dict[str, Any]) -> dict[str, Any]:
    """The golden record's email-marketing consent: status, when it was set and the source
    record that decided it (see docs/matching.md#consent)."""
    origin = lineage.get("consent", {})
    return {
        "status": fields.get("consent") or "unknown",
        "at": fields.get("consent_at"),
        "source": origin.get("source"),
        "external_id": origin.get("external_id"),
        "record_id": origin.get("record_id"),
    }


def _one_per_message(rows: Sequence[Any]) -> list[Any]:
    """Drop copies of one email synced from several mailboxes (same Message-ID, any source)."""
    seen: set[str] = set()
    out = []
    for row in rows:
        if row.type == "email":
            if row.external_id in seen:
                continue
            seen.add(row.external_id)
        out.append(row)
    return out


def iter_golden(conn: Connection) -> Iterator[dict[str, Any]]:
    rows = conn.execute(
        select(golden_record.c.id, golden_record.c.fields, golden_record.c.lineage)
        .where(_live)
        .order_by(golden_record.c.id)
        .execution_options(yield_per=2000)
    )
    for row in rows:
        yield {"golden_id": row.id, **(row.fields or {})}


def iter_xref(conn: Connection) -> Iterator[tuple[str, str, int]]:
    rows = conn.execute(
        select(source_record.c.source, source_record.c.external_id, membership.c.golden_id)
        .join(membership, membership.c.record_id == source_record.c.id)
        .where(
            source_record.c.kind == "contact",
            # live records, and aliases (merged away at the source: the survivor's golden id)
            or_(source_record.c.deleted == 0, source_record.c.alias_of.is_not(None)),
        )
        .order_by(source_record.c.source, source_record.c.external_id)
        .execution_options(yield_per=5000)
    )
    for source, external_id, golden_id in rows:
        yield str(source), str(external_id), int(golden_id)


def list_runs(
    conn: Connection, *, connector: str | None = None, limit: int = 20
) -> list[dict[str, Any]]:
    query = select(sync_run).order_by(sync_run.c.id.desc()).limit(limit)
    if connector:
        query = query.where(sync_run.c.connector == connector)
    out = []
    for r in conn.execute(query):
        seconds = (r.finished_at - r.started_at).total_seconds() if r.finished_at else None
        out.append(
            {
                "id": r.id,
                "connector": r.connector,
                "state": r.state,
                "full": bool(r.full_refresh),
                "started_at": r.started_at.isoformat(),
                "seconds": seconds,
                "counts": r.counts or {},
                "error": r.error,
            }
        )
    return out


def dead_letters(
    conn: Connection,
    *,
    source: str | None = None,
    run_id: int | None = None,
    include_fields: bool = True,
    limit: int = 100,
) -> list[dict[str, Any]]:
    query = select(dead_letter).order_by(dead_letter.c.id.desc()).limit(limit)
    if source:
        query = query.where(dead_letter.c.source == source)
    if run_id is not None:
        query = query.where(dead_letter.c.run_id == run_id)
    if not include_fields:
        query = query.where(dead_letter.c.scope == "record")
    return [
        {
            "id": r.id,
            "run_id": r.run_id,
            "source": r.source,
            "scope": r.scope,
            "origin": r.origin,
            "field": r.field,
            "reason": r.reason,
            "raw": r.raw,
            "created_at": r.created_at.isoformat(),
        }
        for r in conn.execute(query)
    ]


def find_contact_record(conn: Connection, ref: str) -> dict[str, Any] | None:
    """A staged contact by record id (`42`) or by `source:external_id`."""
    query = select(
        source_record.c.id,
        source_record.c.source,
        source_record.c.external_id,
        source_record.c.data,
    ).where(source_record.c.kind == "contact")
    if ref.isdigit():
        query = query.where(source_record.c.id == int(ref))
    else:
        source, _, external_id = ref.partition(":")
        query = query.where(
            source_record.c.source == source, source_record.c.external_id == external_id
        )
    row = conn.execute(query).first()
    if row is None:
        return None
    golden = conn.execute(
        select(membership.c.golden_id).where(membership.c.record_id == row.id)
    ).scalar()
    return {
        "record_id": row.id,
        "source": row.source,
        "external_id": row.external_id,
        "golden_id": golden,
        "data": row.data,
    }
