"""Term frequencies from the store, for the matcher's TF adjustment (dedupe.scoring.Frequencies).

Common values are weaker evidence: two "James Smith"s agree on a name thousands share. The
counts come from `match_key`: blocking keys count emails and phones, and each contact also
stores `tf:<kind>` rows for the values that are not blocking keys (first and last names,
company, email user name). Counts are fetched per page for the page's own values, so a
comparison never queries the store. Counts of common values (COMMON holders or more) are
kept in `key_frequency`, written by every batch and by pages that count one afresh, so a
process does not walk thousands of index entries for "john" again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from sqlalchemy import Connection, func, literal, select

from dedupe.normalize import Prepared
from dedupe.scoring import MIN_POPULATION, tf_values
from sync.key_lookup import key_counts
from sync.store import key_frequency, live_contact, match_key, source_record, upsert

__all__ = [
    "TF_ROW_KINDS",
    "StoreFrequencies",
    "counted_for",
    "kept_counts",
    "store_common_counts",
    "tf_rows",
]

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
# How often the store-wide contact count is taken again, at most: a table scan (0.4 s at 1M
# contacts on SQLite) that one request pays, for a figure our own pages keep current in
# between; only other processes' additions wait for it, and a few percent more or less do not
# change a term-frequency weight.
RECOUNT_SECONDS = 600.0
# A value held this often has its count reused until the next recount, and kept in the
# key_frequency table for other processes and later recounts.
COMMON = 1000
# A kept count is used while the store's contact count is within this share of the one it
# was taken at: what weighs is a value's share of the store, and a count moves with it.
KEPT_WITHIN = 0.1


def tf_rows(values: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """The extra match_key rows (kind, value) a contact stores for term frequencies."""
    return [(_STORED_AS[kind], v) for kind in TF_ROW_KINDS for v in values.get(kind, ()) if v]


class StoreFrequencies:
    """`Frequencies` over the store, prefetched for one page at a time. `exact`: count every
    value afresh, common ones too (no kept count, which may be up to KEPT_WITHIN stale)."""

    def __init__(self, exact: bool = False) -> None:
        self._exact = exact
        self._counted = 0  # contacts at the last full count
        self._counted_at: float | None = None
        self._since = 0  # contacts committed by our pages since that count
        self._pending = 0  # contacts of the page being written (uncommitted)
        self._counts: dict[tuple[str, str], int] = {}
        # Counts of at least COMMON rows, kept until the next recount: counting "john" walks
        # thousands of index entries, and a few more or less do not change its weight.
        self._common: dict[tuple[str, str], int] = {}
        self._conn: Connection | None = None
        self._own: dict[tuple[str, str], int] = {}  # the page's new records' values

    @property
    def total(self) -> int:
        return self._counted + self._since + self._pending

    def prefetch(
        self,
        conn: Connection,
        wanted: Iterable[tuple[str, str]],
        added: int = 0,
        own: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        """Load the contact count and the counts of `wanted` (matcher kind, value) pairs.

        `own`: how many of the page's new records hold each (matcher kind, value); `count`
        adds them (their rows are not stored yet), `stored` does not.
        `added`: contacts this page staged. The store-wide count is a table scan, so it is
        taken at most every RECOUNT_SECONDS and kept current in between by adding the pages'
        new contacts once their transaction commits (`page_committed`); a page rolled back
        and retried is not counted twice. Other writers' additions show at the next recount.
        """
        self._conn = conn
        self._own = {(_STORED_AS.get(k, k), v): n for (k, v), n in (own or {}).items()}
        now = time.monotonic()
        if self._counted_at is None or now - self._counted_at > RECOUNT_SECONDS:
            self._counted = int(
                conn.execute(
                    select(func.count()).select_from(source_record).where(live_contact)
                ).scalar_one()
            )
            self._counted_at = now
            self._since = self._pending = 0  # the count includes this page's staged rows
            self._common = {} if self._exact else kept_counts(conn, self._counted)
        else:
            self._pending = added
        wanted_keys = {(_STORED_AS.get(kind, kind), value) for kind, value in wanted}
        self._counts = {key: self._common[key] for key in wanted_keys if key in self._common}
        missing = sorted(wanted_keys - self._counts.keys())
        common: dict[tuple[str, str], int] = {}
        for key, count in key_counts(conn, missing).items():
            self._counts[key] = count
            if count >= COMMON:
                common[key] = count
        for key in missing:
            self._counts.setdefault(key, 0)
        if common:
            self._common.update(common)
            if conn.get_execution_options().get("write"):  # a page's write transaction
                _keep_counts(conn, common, self.total)

    def recount(self) -> None:
        """Take the store-wide count afresh at the next prefetch (after a batch of pages this
        object did not see, such as a first load clustered in one go)."""
        self._counted_at = None

    def page_committed(self) -> None:
        """The page whose counts were prefetched last has committed."""
        self._since += self._pending
        self._pending = 0

    def stored(self, key_kind: str, value: str) -> int | None:
        """Prefetched count of match_key rows of exactly `key_kind` (not a matcher kind),
        as the store held them before this page; None when not prefetched."""
        return self._counts.get((key_kind, value))

    def count(self, kind: str, value: str) -> int:
        stored = _STORED_AS.get(kind, kind)
        return self._stored_count(stored, value) + self._own.get((stored, value), 0)

    def _stored_count(self, stored: str, value: str) -> int:
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


def counted_for(
    conn: Connection, records: Iterable[Prepared], exact: bool = False
) -> StoreFrequencies | None:
    """The store's counts of `records`' values for a matcher, or None below MIN_POPULATION
    contacts (the matcher then keeps its shipped prior and no term frequencies, as the
    pipeline does). `exact`: common values counted afresh too (`StoreFrequencies`)."""
    frequencies = StoreFrequencies(exact)
    frequencies.prefetch(
        conn, [(kind, v) for r in records for kind, vs in tf_values(r).items() for v in vs]
    )
    return frequencies if frequencies.total >= MIN_POPULATION else None


def store_common_counts(conn: Connection, contacts: int) -> None:
    """Replace the kept counts with those of every value held COMMON times or more, from
    match_key as it stands (a batch that has just written it all: one scan of its index).
    `contacts`: the live contacts the rows are of."""
    conn.execute(key_frequency.delete())
    held = func.count()
    conn.execute(
        key_frequency.insert().from_select(
            ["key_kind", "key_value", "holders", "contacts"],
            select(match_key.c.key_kind, match_key.c.key_value, held, literal(contacts))
            .group_by(match_key.c.key_kind, match_key.c.key_value)
            .having(held >= COMMON),
        )
    )


def kept_counts(conn: Connection, contacts: int | None = None) -> dict[tuple[str, str], int]:
    """Kept counts (match_key kind, value -> holders) taken when the store was within
    KEPT_WITHIN of `contacts` contacts; with None, every one whenever it was taken (values
    held COMMON times or more then: enough for a caller that only asks whether a value is
    held more than a few hundred times, a local batch's blocking caps)."""
    rows = conn.execute(
        select(
            key_frequency.c.key_kind,
            key_frequency.c.key_value,
            key_frequency.c.holders,
            key_frequency.c.contacts,
        )
    )
    return {
        (kind, value): int(holders)
        for kind, value, holders, at in rows
        if contacts is None or abs(contacts - at) <= KEPT_WITHIN * max(at, 1)
    }


def _keep_counts(conn: Connection, counts: dict[tuple[str, str], int], contacts: int) -> None:
    """Store (or refresh) counts just taken, with the store's contact count now."""
    statement = upsert(conn, key_frequency)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=["key_kind", "key_value"],
            set_={
                "holders": statement.excluded.holders,
                "contacts": statement.excluded.contacts,
            },
        ),
        [
            {"key_kind": kind, "key_value": value, "holders": n, "contacts": contacts}
            for (kind, value), n in sorted(counts.items())
        ],
    )
