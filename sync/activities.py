"""The activity index: type, time and subject of each staged activity, and the email keys of
its participants (how a golden record's timeline finds it). Derived from the mapped data, so
the pipeline and a rebuild write it the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from crmhub.records import Activity
from dedupe.matcher import email_key
from sync.staging import chunks
from sync.store import activity, activity_participant, bulk_insert, one_of

__all__ = ["index_activities"]


def index_activities(
    conn: Connection, records: Sequence[tuple[int, dict[str, Any]]], replacing: Sequence[int]
) -> list[dict[str, Any]]:
    """Index `records` (record id, mapped Activity data); the rows of `replacing` (records
    indexed before) are dropped first. Returns the participant rows written."""
    for part in chunks(sorted(replacing)):
        conn.execute(activity.delete().where(one_of(conn, activity.c.record_id, part)))
        conn.execute(
            activity_participant.delete().where(
                one_of(conn, activity_participant.c.record_id, part)
            )
        )
    rows: list[dict[str, Any]] = []
    participants: list[dict[str, Any]] = []
    for record_id, data in records:
        act = Activity.model_validate(data)
        rows.append(
            {
                "record_id": record_id,
                "type": act.type,
                "occurred_at": act.occurred_at,
                "subject": (act.subject or "")[:500],
            }
        )
        participants.extend(
            {"record_id": record_id, "email_key": key}
            for key in dict.fromkeys(email_key(p) for p in act.participants)
        )
    if rows:
        bulk_insert(conn, activity, rows)
    if participants:
        bulk_insert(conn, activity_participant, participants)
    return participants
