"""`crmhub rebuild`, the apply: write a rebuild plan in one transaction.

The plan is computed inside the write transaction (so it is exactly what gets applied, with
no sync slipping in between) and checked against `[matching] rebuild_max_moved_share`; a
refusal rolls back before anything is written. Killing the process mid-way leaves the old
state: everything, the audit entry included, commits together.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, select

from crmhub.settings import Settings
from dedupe import survive
from dedupe.cluster import collection_paused
from sync.activities import index_activities
from sync.configure import configure, survivorship_for
from sync.forms import FORM_COLUMNS
from sync.frequencies import store_common_counts
from sync.golden import (
    BUMP_VERSION,
    GOLDEN_COLUMNS,
    MEMBERSHIP_COLUMNS,
    MERGE_LOCK,
    SURVIVED_COLUMNS,
    finish_goldens,
    fold_golden,
    survived_rows,
)
from sync.rebuild import KeyRows, RebuildPlan, RebuildRefusedError, plan_rebuild, stop_if_asked
from sync.staging import chunks
from sync.store import (
    allocate_ids,
    audit_log,
    bind_values,
    bulk_insert,
    contact_form,
    dead_letter,
    golden_record,
    insert_rows,
    insert_rows_at_once,
    match_key,
    membership,
    one_of,
    review_item,
    source_record,
    update_rows_at_once,
    write_transaction,
)

__all__ = ["apply_plan", "preview", "rebuild", "write_keys"]

log = logging.getLogger("crmhub.rebuild")

ROWS_PER_INSERT = 50_000  # match_key rows built and written at a time
GOLDENS_PER_SLICE = 20_000  # golden records survived and finished at a time
REINDEX_FROM_CONTACTS = 20_000  # from this many contacts, match_key's index is built after


def preview(db: Engine, settings: Settings) -> RebuildPlan:
    """The plan, read in one snapshot; nothing is written (`crmhub rebuild --dry-run`)."""
    with db.connect() as conn:  # closing it rolls the read transaction back
        return plan_rebuild(conn, settings)


def rebuild(db: Engine, settings: Settings, *, actor: str, confirm: bool = False) -> RebuildPlan:
    """Plan and apply in one write transaction. Raises `RebuildRefusedError` (nothing
    written) when the plan moves more than the configured share of contacts and `confirm`
    is false."""
    now = datetime.now(UTC)
    cap = settings.matching.rebuild_max_moved_share
    configure(db, settings)  # golden records survive by these settings' policy
    with write_transaction(db) as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MERGE_LOCK})")
        plan = plan_rebuild(conn, settings, write_keys=write_keys)
        if plan.moved_share > cap and not confirm:
            raise RebuildRefusedError(
                f"rebuild would move {len(plan.moved)} of {plan.contacts} contacts "
                f"({plan.moved_share:.1%}) to another golden record, more than [matching] "
                f"rebuild_max_moved_share = {cap:g}; nothing was changed. Look at "
                "`crmhub rebuild --dry-run`, then run `crmhub rebuild --yes` to apply it",
                moved=len(plan.moved),
                contacts=plan.contacts,
                share=plan.moved_share,
                cap=cap,
            )
        apply_plan(conn, plan, actor, now)
    log.info(
        "rebuild applied",
        extra={"moved": len(plan.moved), "remapped": len(plan.remapped), "actor": actor},
    )
    return plan


def apply_plan(
    conn: Connection,
    plan: RebuildPlan,
    actor: str,
    now: datetime,
    stop: threading.Event | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Write `plan` (from `plan_rebuild` in this transaction); `actor` goes to the audit log,
    with `details` beside the plan's summary. A set `stop` ends it with `BatchStopped` after
    any slice of golden records. A local plan's audit line is "rebuild.borderline", so that it
    is not taken for a batch of the store (`sync.first_load.last_batch_size`)."""
    stop_if_asked(stop)
    _write_data(conn, plan)
    _write_letters(conn, plan, now)
    if not plan.keys_written and not plan.local:
        write_keys(conn, plan.keys, stop)
    created, survived = _write_goldens(conn, plan, now, stop)
    for alias, survivor in sorted(plan.aliases.items()):
        fold_golden(conn, alias, survivor, now)
    _write_reviews(conn, plan, now)
    for part in chunks(sorted(survived), GOLDENS_PER_SLICE):
        finish_goldens(conn, set(part), now)
    conn.execute(
        audit_log.insert().values(
            at=now,
            actor=actor,
            action="rebuild.borderline" if plan.local else "rebuild.apply",
            details={**plan.summary(), "created": created, **(details or {})},
        )
    )


_INSERT_KEYS_FROM_JSON = (
    "INSERT INTO match_key (record_id, key_kind, key_value) "
    "SELECT json_extract(r.value, '$[0]'), json_extract(k.value, '$[0]'), "
    "json_extract(k.value, '$[1]') FROM json_each(?) AS r, json_each(r.value, '$[1]') AS k"
)
_INSERT_FORMS_FROM_JSON = (
    "INSERT INTO contact_form (record_id, digest, form) SELECT json_extract(value, '$[0]'), "
    "json_extract(value, '$[1]'), json_extract(value, '$[2]') FROM json_each(?)"
)
FORMS_PER_INSERT = 20_000  # contact_form rows written at a time (about 150 bytes each)


def write_keys(conn: Connection, keys: KeyRows, stop: threading.Event | None = None) -> None:
    """Replace every match_key row with `keys`, and every contact_form row with their
    prepared forms. Rows go in record order, which is the primary key's; the lookup index
    (key kind, value) would take them in random order, one page miss each once it outgrows
    the cache, so for a large store it is dropped and built again afterwards (a sort),
    inside the same transaction. The counts of common values are
    kept from the new rows (`sync.frequencies.store_common_counts`). A set `stop` ends it
    with `BatchStopped` after its next slice of rows (the caller's transaction rolls back)."""
    conn.execute(match_key.delete())
    rebuild_indexes = len(keys) >= REINDEX_FROM_CONTACTS
    if rebuild_indexes:
        for index in match_key.indexes:
            index.drop(conn)
    # Written in slices as they are built: at 1M contacts (~17M rows) the whole list of row
    # dicts would take several GB on top of the plan.
    if conn.dialect.name == "sqlite":
        # One statement per slice: SQLite parses the JSON and inserts its rows while the
        # GIL is free, where an executemany takes the GIL back for every row and slows the
        # clustering beside it (a first load runs the two side by side; docs/benchmarks.md).
        for text in keys.json_slices(ROWS_PER_INSERT):
            stop_if_asked(stop)
            conn.exec_driver_sql(_INSERT_KEYS_FROM_JSON, (text,))
    else:
        columns = ("record_id", "key_kind", "key_value")
        rows: list[tuple[int, str, str]] = []
        for rid, own in keys.items():
            rows += [(rid, kind, value) for kind, value in own]
            if len(rows) >= ROWS_PER_INSERT:
                stop_if_asked(stop)
                insert_rows(conn, match_key, columns, rows)  # COPY on PostgreSQL
                rows = []
        insert_rows(conn, match_key, columns, rows)
    stop_if_asked(stop)
    if rebuild_indexes:
        for index in sorted(match_key.indexes, key=lambda i: str(i.name)):
            index.create(conn)
    store_common_counts(conn, len(keys))
    _write_forms(conn, keys, stop)


def _write_forms(conn: Connection, keys: KeyRows, stop: threading.Event | None) -> None:
    """Replace every contact_form row with the plan's (sync/forms.py)."""
    conn.execute(contact_form.delete())
    if conn.dialect.name == "sqlite":
        for text in keys.form_slices(FORMS_PER_INSERT):
            stop_if_asked(stop)
            conn.exec_driver_sql(_INSERT_FORMS_FROM_JSON, (text,))
        return
    forms = keys.forms()
    while part := list(islice(forms, FORMS_PER_INSERT)):
        stop_if_asked(stop)
        insert_rows(conn, contact_form, FORM_COLUMNS, part)


def _write_data(conn: Connection, plan: RebuildPlan) -> None:
    """Re-mapped records: new data (and activities' rows, which the pipeline derives)."""
    if not plan.remapped:
        return
    conn.execute(
        source_record.update()
        .where(source_record.c.id == bindparam("b_id"))
        .values(data=bindparam("b_data"), source_updated_at=bindparam("b_updated")),
        [
            {"b_id": rid, "b_data": data, "b_updated": updated}
            for rid, (data, updated) in plan.remapped.items()
        ],
    )
    kinds = dict(
        conn.execute(
            select(source_record.c.id, source_record.c.kind).where(
                one_of(conn, source_record.c.id, sorted(plan.remapped))
            )
        ).all()
    )
    acts = sorted(r for r, k in kinds.items() if k == "activity")
    index_activities(conn, [(rid, plan.remapped[rid][0]) for rid in acts], acts)


def _write_letters(conn: Connection, plan: RebuildPlan, now: datetime) -> None:
    bulk_insert(
        conn,
        dead_letter,
        [
            {
                "run_id": None,
                "source": f.source,
                "scope": "record",
                "origin": f"rebuild:{f.external_id}"[:500],
                "field": None,
                "reason": f"{f.reason} (re-mapping the stored payload; the record keeps the "
                "data it was staged with)",
                "raw": json.dumps(f.payload, default=str),
                "created_at": now,
            }
            for f in plan.failures
        ],
    )


def _write_goldens(
    conn: Connection, plan: RebuildPlan, now: datetime, stop: threading.Event | None
) -> tuple[int, set[int]]:
    """The plan's golden records and memberships. Fields and lineage are survived from the
    data the plan read (no member is read back); new golden records get real ids and are
    inserted with them, the others updated. A slice is written on a thread while the next is
    survived: on SQLite each of its statements runs without the GIL (`insert_rows_at_once`),
    so both cores work. Returns how many golden records were created, and the golden records
    survived (`_survived`)."""
    if plan.staged is None:
        raise ValueError("apply_plan needs a plan made for an apply: plan_rebuild(write_keys=...)")
    placeholders = sorted({g for g in plan.target.values() if g < 0}, reverse=True)
    ids = allocate_ids(conn, golden_record, len(placeholders))
    real = dict(zip(placeholders, ids, strict=True))
    plan.target = {r: real.get(g, g) for r, g in plan.target.items()}
    staged, created = plan.staged, set(ids)
    groups = staged.members_of(plan.target)
    survived_now = _survived(plan, set(groups))
    policy = survivorship_for(conn)
    stamp = bind_values(conn, golden_record.c.updated_at, [now])[0]
    # The connection is the writer's alone while it writes a slice: surviving does no I/O.
    # Surviving makes no cyclic garbage, and the collector would re-scan the batch's
    # millions of live objects (a sixth of the time at 1M): paused.
    with collection_paused(), ThreadPoolExecutor(1, thread_name_prefix="crmhub-goldens") as pool:
        writing: Future[None] | None = None
        # A slice at a time: its members' data is decoded for it (1M contacts' at once would
        # be several GB). Each golden record is independent.
        for part in chunks(sorted(groups), GOLDENS_PER_SLICE):
            survived = {
                golden: survive([staged.member(i) for i in groups[golden]], policy)
                for golden in part
                if golden in survived_now
            }
            goldens = survived_rows(survived, stamp, created)
            members = _membership_rows(plan, staged.ids, [(g, groups[g]) for g in part], stamp)
            if writing is not None:
                writing.result()
            stop_if_asked(stop)
            writing = pool.submit(_write_slice, conn, goldens, members)
        if writing is not None:
            writing.result()
    return len(ids), survived_now


def _survived(plan: RebuildPlan, goldens: set[int]) -> set[int]:
    """Of the plan's golden records (`goldens`, ids real), those the apply survives (fields,
    lineage, version) and finishes: every one of a batch of the store (a survivorship setting
    may have changed), only those whose members change of a local batch."""
    if not plan.local:
        return goldens
    moved = plan.moved
    left = {plan.current[r] for r in moved if r in plan.current}  # aliases are folded instead
    return {plan.target[r] for r in moved} | (left & goldens)


Rows = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]  # (to insert, to update)
# a moved membership's update, or a staying one's whose borderline link changed
_MOVED_COLUMNS = ("golden_id", "method", "probability", "decided_at")


def _membership_rows(
    plan: RebuildPlan, ids: list[int], goldens: list[tuple[int, list[int]]], stamp: Any
) -> Rows:
    """Membership rows for `goldens` (golden id, its members' positions in `ids`):
    `MEMBERSHIP_COLUMNS` rows for records with no golden record yet, `_MOVED_COLUMNS` rows
    (and the record id) for records that move; records that stay are left alone unless the
    borderline link that placed them changed (their membership's probability)."""
    fresh: list[tuple[Any, ...]] = []
    moved: list[tuple[Any, ...]] = []
    for golden, members in goldens:
        for i in members:
            rid = ids[i]
            before = plan.current.get(rid)
            steward = rid in plan.steward  # a steward's membership keeps its probability
            weak = plan.kept.get(rid) if steward else plan.borderline.get(rid)
            if before == golden and weak == plan.kept.get(rid):
                continue
            method = "steward" if steward else "auto" if len(members) > 1 else "new"
            if before is None:
                fresh.append((rid, golden, method, weak, stamp))
            else:
                moved.append((golden, method, weak, stamp, rid))
    return fresh, moved


def _write_slice(conn: Connection, goldens: Rows, members: Rows) -> None:
    """One slice of golden records (before the memberships naming them), then memberships."""
    insert_rows_at_once(conn, golden_record, GOLDEN_COLUMNS, goldens[0])
    update_rows_at_once(conn, golden_record, SURVIVED_COLUMNS, "id", goldens[1], also=BUMP_VERSION)
    update_rows_at_once(conn, membership, _MOVED_COLUMNS, "record_id", members[1])
    insert_rows_at_once(conn, membership, MEMBERSHIP_COLUMNS, members[0])


def _write_reviews(conn: Connection, plan: RebuildPlan, now: datetime) -> None:
    """Open items whose records now share a golden record are settled; the clusterer's new
    uncertain pairs are queued (the plan leaves out pairs asked about before)."""
    settled = [
        int(i)
        for i, a, b in conn.execute(
            select(review_item.c.id, review_item.c.record_a, review_item.c.record_b).where(
                review_item.c.status == "open"
            )
        )
        if a in plan.target and plan.target.get(a) == plan.target.get(b)
    ]
    plan.reviews_settled = len(settled)
    for part in chunks(settled):
        conn.execute(
            review_item.update()
            .where(one_of(conn, review_item.c.id, part))
            .values(status="merged", decided_by="rebuild", decided_at=now)
        )
    bulk_insert(
        conn,
        review_item,
        [
            {
                "record_a": a,
                "record_b": b,
                "probability": p,
                "explanation": explanation,
                "status": "open",
                "created_at": now,
            }
            for a, b, p, explanation in plan.reviews
        ],
    )
