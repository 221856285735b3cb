"""Source-side merges: a contact the source merged into another becomes an alias of it.

A connector reports "external id X now is Y" with `connectors.base.merged(X, Y)`, a deletion
that names its survivor. Applied in the page's transaction (after the page's contacts, so a
survivor in the same page is staged first):

- the retired record is flagged deleted and names its survivor in `alias_of`: it no longer
  supplies field values (survivorship reads live records only), is not counted, and a full
  scan that does not list it infers nothing (it is not live);
- its membership moves to the survivor's golden record (method `alias`); its old golden record
  is recomputed, or folded into the survivor's when it has no member left, so its id resolves
  to the survivor's (`golden show OLD`); records aliased to it earlier move along;
- its match keys stay: its email and phone keep resolving to the survivor's golden record, so
  its activities (linked by participant email) and later ones under its identity land there,
  and a new record with its identity is compared with it (`crmhub rebuild` re-keys live
  records only, so after one only the survivor's own addresses link activities);
- export xref lists it with the survivor's golden id.

A retired id the store never staged needs nothing. A survivor the store does not hold (not
staged, dead-lettered) still retires the record; its membership stays until then.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, select

from sync.golden import MERGE_LOCK, fold_golden, recompute_goldens
from sync.staging import chunks
from sync.store import membership, one_of, source_record

__all__ = ["apply_aliases"]


def apply_aliases(conn: Connection, source: str, merges: dict[str, str], now: datetime) -> int:
    """Apply `merges` (retired external id -> surviving external id) of `source`'s contacts;
    returns how many staged records became aliases (re-pointed ones are not counted again).
    Idempotent: a merge reported again
    (the survivor still lists the ids merged into it) changes nothing."""
    merges = {r: s for r, s in merges.items() if r != s}
    if not merges:
        return 0
    rows = _records(conn, source, set(merges) | set(merges.values()))
    if not any(r in rows for r in merges):
        return 0  # none of the retired ids was ever staged
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MERGE_LOCK})")
    retired = 0
    for old, new in merges.items():
        found = rows.get(old)
        final = _final(new, merges, rows)
        if found is None or final == old or found[2] == final:
            continue  # never staged, a cycle, or already an alias of the survivor
        for ext, rid in _retire(conn, source, found[0], old, final, rows.get(final), now):
            rows[ext] = (rid, 1, final)
        rows[old] = (found[0], 1, final)
        retired += 1 if found[2] is None else 0
    return retired


def _records(
    conn: Connection, source: str, ids: set[str]
) -> dict[str, tuple[int, int, str | None]]:
    """external id -> (record id, deleted, alias_of) of `source`'s staged contacts."""
    found: dict[str, tuple[int, int, str | None]] = {}
    for part in chunks(sorted(ids)):
        for ext, rid, deleted, alias_of in conn.execute(
            select(
                source_record.c.external_id,
                source_record.c.id,
                source_record.c.deleted,
                source_record.c.alias_of,
            ).where(
                source_record.c.source == source,
                source_record.c.kind == "contact",
                one_of(conn, source_record.c.external_id, part),
            )
        ):
            found[ext] = (rid, deleted, alias_of)
    return found


def _final(
    survivor: str, merges: dict[str, str], rows: dict[str, tuple[int, int, str | None]]
) -> str:
    """Follow the chain: a survivor merged away in the same batch, or earlier, names the
    record that survives it."""
    seen = {survivor}
    while True:
        nxt = merges.get(survivor)
        if nxt is None and survivor in rows and rows[survivor][1]:
            nxt = rows[survivor][2]
        if nxt is None or nxt in seen:
            return survivor
        seen.add(nxt)
        survivor = nxt


def _retire(
    conn: Connection,
    source: str,
    record_id: int,
    external_id: str,
    survivor: str,
    survivor_row: tuple[int, int, str | None] | None,
    now: datetime,
) -> list[tuple[str, int]]:
    """Make `record_id` (and the records aliased to it) aliases of `survivor`; returns the
    records that were aliased to it (external id, record id), now re-pointed."""
    repointed = [
        (str(ext), int(rid))
        for ext, rid in conn.execute(
            select(source_record.c.external_id, source_record.c.id).where(
                source_record.c.source == source,
                source_record.c.alias_of == external_id,
            )
        )
    ]
    earlier = [rid for _, rid in repointed]
    conn.execute(
        source_record.update()
        .where(source_record.c.id == record_id)
        .values(deleted=1, alias_of=survivor, staged_at=now)
    )
    if earlier:
        conn.execute(
            source_record.update()
            .where(one_of(conn, source_record.c.id, earlier))
            .values(alias_of=survivor)
        )
    moving = [record_id, *earlier]
    old = set(
        conn.execute(
            select(membership.c.golden_id).where(one_of(conn, membership.c.record_id, moving))
        ).scalars()
    )
    target = None
    if survivor_row is not None:
        target = conn.execute(
            select(membership.c.golden_id).where(membership.c.record_id == survivor_row[0])
        ).scalar()
    if target is None:
        recompute_goldens(conn, old, now)  # the survivor is not in the store: only retire
        return repointed
    conn.execute(
        membership.update()
        .where(one_of(conn, membership.c.record_id, moving))
        .values(golden_id=target, method="alias", probability=None, decided_at=now)
    )
    left = old - {target}
    # Golden records the move left without a live member fold into the survivor's: their ids
    # resolve to it, and their non-live members (deleted records) go along.
    alive = set()
    if left:
        alive = set(
            conn.execute(
                select(membership.c.golden_id)
                .join(source_record, source_record.c.id == membership.c.record_id)
                .where(
                    one_of(conn, membership.c.golden_id, sorted(left)),
                    source_record.c.deleted == 0,
                )
                .distinct()
            ).scalars()
        )
    for golden in sorted(left - alive):
        fold_golden(conn, golden, target, now)
    recompute_goldens(conn, alive | {target}, now)
    return repointed
