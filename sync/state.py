"""Per-(connector, stream) cursors: the incremental semantics, written down once.

- A cursor is whatever the connector yielded as `Page.next_cursor` (a JSON object); the store
  never looks inside it.
- `None` means "from the beginning": a first sync, or `--full`.
- The cursor of a page is saved in the same transaction as that page's records, so the stored
  cursor never runs ahead of committed data (a crash replays at most one page).
- Connectors resume *at* the cursor, inclusively where ties are possible; re-read records are
  absorbed by staging (same content hash -> no-op), so boundary duplicates cost nothing.
- `--full` ignores the stored cursor for the pull but still stores the new one.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Connection, select

from crmhub.records import Cursor
from sync.store import connector_state

__all__ = ["load_cursor", "save_cursor"]


def load_cursor(conn: Connection, connector: str, stream: str) -> Cursor | None:
    row = conn.execute(
        select(connector_state.c.cursor).where(
            connector_state.c.connector == connector, connector_state.c.stream == stream
        )
    ).first()
    return None if row is None else row[0]


def save_cursor(conn: Connection, connector: str, stream: str, cursor: Cursor | None) -> None:
    """Upsert the cursor; call inside the transaction that commits the page it covers."""
    now = datetime.now(UTC)
    updated = conn.execute(
        connector_state.update()
        .where(connector_state.c.connector == connector, connector_state.c.stream == stream)
        .values(cursor=cursor, updated_at=now)
    )
    if updated.rowcount == 0:
        conn.execute(
            connector_state.insert().values(
                connector=connector, stream=stream, cursor=cursor, updated_at=now
            )
        )
