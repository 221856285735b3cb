"""Survivorship: which member supplies each golden field, with lineage."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from crmhub.records import SCALAR_CONTACT_FIELDS

__all__ = ["Member", "survive"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CONSENT_RANK = {"unsubscribed": 4, "cleaned": 3, "subscribed": 2, "pending": 1, "unknown": 0}


@dataclass(frozen=True, slots=True)
class Member:
    """One source record of a golden record: its id, recency and mapped contact fields."""

    record_id: int
    updated_at: datetime | None
    data: dict[str, Any]


def survive(members: list[Member]) -> tuple[dict[str, Any], dict[str, int]]:
    """Most recent non-empty value per field; every distinct email and phone, primary first.

    Consent is the exception: the least permissive status wins (an opt-out anywhere holds).
    Returns (fields, lineage) where lineage maps a field to the record id that supplied it.
    """
    ordered = sorted(members, key=lambda m: (m.updated_at or _EPOCH, m.record_id), reverse=True)
    fields: dict[str, Any] = {}
    lineage: dict[str, int] = {}
    for name in SCALAR_CONTACT_FIELDS:
        if name == "consent":
            continue
        for member in ordered:
            value = member.data.get(name)
            if value not in (None, ""):
                fields[name] = value
                lineage[name] = member.record_id
                break
    consent_member = max(
        ordered, key=lambda m: _CONSENT_RANK.get(m.data.get("consent") or "unknown", 0)
    )
    fields["consent"] = consent_member.data.get("consent") or "unknown"
    if fields["consent"] != "unknown":
        lineage["consent"] = consent_member.record_id
    for plural in ("emails", "phones"):
        values: list[str] = []
        for member in ordered:
            for value in member.data.get(plural) or []:
                if value not in values:
                    values.append(value)
                    lineage.setdefault(f"{plural}.{value}", member.record_id)
        fields[plural] = values
    return fields, lineage
