"""Term frequencies from the store, for the matcher's TF adjustment (dedupe.scoring.Frequencies).

Common values are weaker evidence: two "James Smith"s agree on a name thousands share. The
counts come from `match_key`: blocking keys count emails and phones, and each contact also
stores `tf:<kind>` rows for the values that are not blocking keys (first and last names,
company, email user name). Counts are fetched per page for the page's own values, so a
comparison never queries the store.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from sqlalchemy import Connection, func, select

from sync.staging import chunks
from sync.store import match_key, one_of, source_record

__all__ = ["TF_ROW_KINDS", "StoreFrequencies", "tf_rows"]

# Matcher kind -> the match_key kind its counts are stored under.
_STORED_AS = {
    "first": "tf:first",
    "last": "tf:last",
    "company": "tf:company",
    "local": "tf:local",
    "email": "email",
    "phone": "phone",
}
TF_ROW_KINDS = ("first", "last", "company", "local")


def tf_rows(values: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """The extra match_key rows (kind, value) a contact stores for term frequencies."""
    return [(_STORED_AS[kind], v) for kind in TF_ROW_KINDS for v in values.get(kind, ()) if v]


class StoreFrequencies:
    """`Frequencies` over the store, prefetched for one page at a time."""

    def __init__(self) -> None:
        self._total = 0
        self._counts: dict[tuple[str, str], int] = {}
        self._conn: Connection | None = None

    @property
    def total(self) -> int:
        return self._total

    def prefetch(self, conn: Connection, wanted: Iterable[tuple[str, str]]) -> None:
        """Load the contact count and the counts of `wanted` (matcher kind, value) pairs."""
        self._conn = conn
        self._total = int(
            conn.execute(
                select(func.count())
                .select_from(source_record)
                .where(source_record.c.kind == "contact", source_record.c.deleted == 0)
            ).scalar_one()
        )
        by_kind: dict[str, set[str]] = defaultdict(set)
        for kind, value in wanted:
            stored = _STORED_AS.get(kind, kind)
            if (stored, value) not in self._counts:
                by_kind[stored].add(value)
        self._counts = {}
        for stored, values in by_kind.items():
            for part in chunks(sorted(values)):
                rows = conn.execute(
                    select(match_key.c.key_value, func.count())
                    .where(
                        match_key.c.key_kind == stored, one_of(conn, match_key.c.key_value, part)
                    )
                    .group_by(match_key.c.key_value)
                )
                self._counts.update({(stored, v): int(c) for v, c in rows})
            for value in values:
                self._counts.setdefault((stored, value), 0)

    def count(self, kind: str, value: str) -> int:
        stored = _STORED_AS.get(kind, kind)
        found = self._counts.get((stored, value))
        if found is not None:
            return found
        if self._conn is None:
            return 0
        # Not prefetched (a candidate's own value): ask the store once and remember.
        count = int(
            self._conn.execute(
                select(func.count())
                .select_from(match_key)
                .where(match_key.c.key_kind == stored, match_key.c.key_value == value)
            ).scalar_one()
        )
        self._counts[(stored, value)] = count
        return count
