"""Blank-overwrite incidents: a source re-sent a contact without a value it had before.

Staging calls `record_blanks` for contacts whose content changed; each field that held a value
and is now empty or missing becomes one `blank_overwrite` row. Only ids and the field name are
kept, never the lost value: the steward looks at the source record (and fixes the source).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from crmhub.records import SCALAR_CONTACT_FIELDS
from sync.store import blank_overwrite, bulk_insert

__all__ = ["BLANK_FIELDS", "is_empty", "lost_fields", "record_blanks"]

# The contact's own fields; consent is a state, not a value to lose ("unknown" is its default).
BLANK_FIELDS: tuple[str, ...] = (
    *(f for f in SCALAR_CONTACT_FIELDS if not f.startswith("consent")),
    "emails",
    "phones",
)


def is_empty(value: Any) -> bool:
    return value is None or value == [] or (isinstance(value, str) and not value.strip())


def lost_fields(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Fields that had a value in `old` and have none in `new` (a list counts as lost only
    when it is empty now: one email of two going away is an edit, not a blank)."""
    if not old:
        return []
    return [f for f in BLANK_FIELDS if not is_empty(old.get(f)) and is_empty(new.get(f))]


def record_blanks(
    conn: Connection,
    source: str,
    changes: Iterable[tuple[int, str, dict[str, Any] | None, dict[str, Any]]],
    run_id: int | None,
    now: datetime,
) -> int:
    """Write one incident per lost field of each (record id, external id, old, new) change."""
    rows = [
        {
            "source": source,
            "record_id": record_id,
            "external_id": external_id,
            "field": name,
            "run_id": run_id,
            "detected_at": now,
        }
        for record_id, external_id, old, new in changes
        for name in lost_fields(old, new)
    ]
    bulk_insert(conn, blank_overwrite, rows)
    return len(rows)
