"""match_key lookups by many (key_kind, key_value) pairs in one statement.

A single-record page asks about a dozen key kinds; one statement per kind costs more in
statement building than the index lookups themselves. Each function here answers all pairs in
one round trip (per CHUNK pairs) with a fixed SQL text per dialect: a JSON array of pairs on
SQLite, two arrays unnested on PostgreSQL. Both use the (key_kind, key_value) index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import orjson
from sqlalchemy import Connection, TextClause, text

from sync.staging import LONG_CHUNK, chunks

__all__ = ["key_counts", "key_holders"]

_PAIRS = {
    "sqlite": "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') "
    "FROM json_each(:pairs)",
    "postgresql": "SELECT * FROM unnest(CAST(:kinds AS varchar[]), CAST(:vals AS varchar[]))",
}
_COUNTS = {
    name: text(
        "SELECT key_kind, key_value, count(*) FROM match_key "
        f"WHERE (key_kind, key_value) IN ({pairs}) GROUP BY key_kind, key_value"
    )
    for name, pairs in _PAIRS.items()
}
_HOLDERS = {
    name: text(
        "SELECT key_kind, key_value, record_id FROM match_key "
        f"WHERE (key_kind, key_value) IN ({pairs})"
    )
    for name, pairs in _PAIRS.items()
}


def _run(
    conn: Connection, statements: dict[str, TextClause], pairs: Sequence[tuple[str, str]]
) -> Iterator[Any]:
    dialect = conn.dialect.name
    # The pairs travel as one parameter, so a statement takes many; the database sorts them.
    for part in chunks(list(set(pairs)), LONG_CHUNK):
        if dialect == "postgresql":
            params: dict[str, Any] = {
                "kinds": [k for k, _ in part],
                "vals": [v for _, v in part],
            }
        else:
            params = {"pairs": orjson.dumps(part).decode()}
        yield from conn.execute(statements[dialect], params).all()


def key_counts(conn: Connection, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """How many match_key rows hold each (key_kind, key_value) pair; absent pairs are left out."""
    return {(kind, value): int(count) for kind, value, count in _run(conn, _COUNTS, pairs)}


def key_holders(
    conn: Connection, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], list[int]]:
    """The records holding each (key_kind, key_value) pair; absent pairs are left out."""
    out: dict[tuple[str, str], list[int]] = {}
    for kind, value, record_id in _run(conn, _HOLDERS, pairs):
        out.setdefault((kind, value), []).append(int(record_id))
    return out
