"""Pair lookups in match_key (sync/key_lookup.py) and review settling through them."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, select

from sync.golden import _settle_reviews
from sync.key_lookup import key_counts, key_holders
from sync.store import (
    bulk_insert,
    golden_record,
    match_key,
    membership,
    review_item,
    source_record,
    write_transaction,
)

NOW = datetime(2026, 11, 25, tzinfo=UTC)


def _records(conn, ids: list[int]) -> None:
    bulk_insert(
        conn,
        source_record,
        [
            {
                "id": rid,
                "source": "leads",
                "kind": "contact",
                "external_id": f"L-{rid}",
                "content_hash": str(rid),
                "payload": {},
                "data": {},
                "source_updated_at": None,
                "staged_at": NOW,
                "deleted": 0,
            }
            for rid in ids
        ],
    )


def test_counts_and_holders_of_many_kinds_in_one_statement(db: Engine) -> None:
    with write_transaction(db) as conn:
        _records(conn, [1, 2, 3])
        rows = [
            (1, "email", "ann@example.com"),
            (2, "email", "ann@example.com"),
            (3, "email", "bob@example.com"),
            (1, "tf:last", "O'Brien"),
            (2, "tf:last", "O'Brien"),
            (3, "tf:last", "Müller"),
            (3, "tf:first", "O'Brien"),  # same value, another kind: counted apart
        ]
        bulk_insert(
            conn,
            match_key,
            [{"record_id": r, "key_kind": k, "key_value": v} for r, k, v in rows],
        )
        wanted = [
            ("email", "ann@example.com"),
            ("tf:last", "O'Brien"),
            ("tf:first", "O'Brien"),
            ("tf:last", "Müller"),
            ("email", "nobody@example.com"),
        ]
        assert key_counts(conn, wanted) == {
            ("email", "ann@example.com"): 2,
            ("tf:last", "O'Brien"): 2,
            ("tf:first", "O'Brien"): 1,
            ("tf:last", "Müller"): 1,
        }
        holders = key_holders(conn, wanted)
        assert sorted(holders[("email", "ann@example.com")]) == [1, 2]
        assert holders[("tf:first", "O'Brien")] == [3]
        assert ("email", "nobody@example.com") not in holders
        assert key_counts(conn, []) == {}


def test_settling_finds_items_by_record_in_either_order(db: Engine) -> None:
    """Open items whose two records now share a golden record are settled; the others stay
    open, whichever of the two records the item lists first. The golden records looked at
    are the page's records' and the ones it touched."""
    with write_transaction(db) as conn:
        _records(conn, [1, 2, 3, 4, 5, 6])
        golden = {"fields": {}, "lineage": {}, "version": 1, "created_at": NOW, "updated_at": NOW}
        bulk_insert(conn, golden_record, [{"id": 10, **golden}, {"id": 20, **golden}])
        bulk_insert(
            conn,
            membership,
            [
                {
                    "record_id": r,
                    "golden_id": g,
                    "method": "auto",
                    "probability": None,
                    "decided_at": NOW,
                }
                for r, g in ((1, 10), (2, 10), (3, 10), (4, 20), (5, 20), (6, 20))
            ],
        )
        item = {"probability": 0.9, "explanation": {}, "status": "open", "created_at": NOW}
        bulk_insert(
            conn,
            review_item,
            [
                {"id": 1, "record_a": 1, "record_b": 2, **item},
                {"id": 2, "record_a": 3, "record_b": 1, **item},
                {"id": 3, "record_a": 1, "record_b": 4, **item},
                {"id": 4, "record_a": 2, "record_b": 3, **item, "status": "rejected"},
                {"id": 5, "record_a": 6, "record_b": 5, **item},
            ],
        )
        assert _settle_reviews(conn, {1}, set(), NOW) == 2
        status = dict(conn.execute(select(review_item.c.id, review_item.c.status)).all())
        decided = dict(conn.execute(select(review_item.c.id, review_item.c.decided_by)).all())
        assert status == {1: "merged", 2: "merged", 3: "open", 4: "rejected", 5: "open"}
        assert decided[1] == decided[2] == "matcher"
        assert _settle_reviews(conn, set(), {20}, NOW) == 1  # a golden record the page touched
        item_5 = select(review_item.c.status).where(review_item.c.id == 5)
        assert conn.execute(item_5).scalar() == "merged"
        assert _settle_reviews(conn, {4}, set(), NOW) == 0  # nothing open is settled twice
