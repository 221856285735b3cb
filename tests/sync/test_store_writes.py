"""Bulk writes in one statement (`insert_rows_at_once`, `update_rows_at_once`) store exactly
what the row-by-row writers do, on both stores."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, select

from sync.golden import BUMP_VERSION, GOLDEN_COLUMNS, MEMBERSHIP_COLUMNS, SURVIVED_COLUMNS
from sync.store import (
    bind_values,
    golden_record,
    insert_rows,
    insert_rows_at_once,
    json_text,
    membership,
    source_record,
    update_rows,
    update_rows_at_once,
    write_transaction,
)

AWKWARD = {"first_name": 'Zoë "Zo" O\'Brien', "note": "back\\slash 🙂", "n": [1, None, 2.5]}
NOW = datetime(2026, 12, 7, 9, 30, 15, 123456, tzinfo=UTC)


def _goldens(db: Engine) -> dict[int, tuple]:
    with db.connect() as conn:
        return {
            r.id: (r.fields, r.lineage, r.version, r.created_at, r.updated_at)
            for r in conn.execute(select(golden_record))
        }


def test_rows_written_at_once_read_back_as_rows_written_one_by_one(db: Engine) -> None:
    with write_transaction(db) as conn:
        stamp = bind_values(conn, golden_record.c.updated_at, [NOW])[0]

        def rows(first: int) -> list[tuple]:
            return [
                (first, json_text(AWKWARD), json_text({"first_name": 3}), 1, stamp, stamp),
                (first + 1, json_text({}), json_text({}), 1, stamp, stamp),
            ]

        insert_rows(conn, golden_record, GOLDEN_COLUMNS, rows(1))
        insert_rows_at_once(conn, golden_record, GOLDEN_COLUMNS, rows(11))
    goldens = _goldens(db)
    assert goldens[11] == goldens[1] == (AWKWARD, {"first_name": 3}, 1, NOW, NOW)
    assert goldens[12] == goldens[2]

    later = datetime(2026, 12, 8, tzinfo=UTC)
    with write_transaction(db) as conn:
        stamp = bind_values(conn, golden_record.c.updated_at, [later])[0]
        new = json_text({"last_name": "Ñúñez"})
        update_rows(
            conn, golden_record, SURVIVED_COLUMNS, "id", [(new, new, stamp, 1)], also=BUMP_VERSION
        )
        update_rows_at_once(
            conn, golden_record, SURVIVED_COLUMNS, "id", [(new, new, stamp, 11)], also=BUMP_VERSION
        )
    goldens = _goldens(db)
    assert (
        goldens[11] == goldens[1] == ({"last_name": "Ñúñez"}, {"last_name": "Ñúñez"}, 2, NOW, later)
    )
    assert goldens[12] == goldens[2]  # only the rows named are updated


def test_memberships_at_once_keep_nulls_and_exact_probabilities(db: Engine) -> None:
    with write_transaction(db) as conn:
        stamp = bind_values(conn, membership.c.decided_at, [NOW])[0]
        conn.execute(
            source_record.insert(),
            [
                {
                    "id": i,
                    "source": "crm",
                    "kind": "contact",
                    "external_id": str(i),
                    "content_hash": "h",
                    "payload": {},
                    "data": {},
                    "staged_at": NOW,
                }
                for i in (1, 2, 3)
            ],
        )
        golden = [(g, json_text({}), json_text({}), 1, stamp, stamp) for g in (7, 8)]
        insert_rows_at_once(conn, golden_record, GOLDEN_COLUMNS, golden)
        insert_rows_at_once(
            conn,
            membership,
            MEMBERSHIP_COLUMNS,
            [(1, 7, "new", None, stamp), (2, 7, "auto", 0.1234567890123457, stamp)],
        )
        update_rows_at_once(
            conn,
            membership,
            ("golden_id", "method", "decided_at"),
            "record_id",
            [(8, "steward", stamp, 2)],
        )
    with db.connect() as conn:
        got = {r.record_id: tuple(r)[1:] for r in conn.execute(select(membership))}
    assert got == {1: (7, "new", None, NOW), 2: (8, "steward", 0.1234567890123457, NOW)}
