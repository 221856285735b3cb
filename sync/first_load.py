"""A first load of many contacts into an empty store is clustered in one batch; so is a store
that grows past one of `batch_sizes` a page at a time (docs/matching.md, "Growing stores").

Matching contacts against the store a page at a time costs the probabilistic matcher about half
a millisecond a contact (candidate lookups, loading and preparing candidates, comparisons, a
dozen index rows each); the batch clusterer does the same work for a whole data set in a
fraction of that (`crmhub rebuild`'s path, docs/benchmarks.md "Matching"). So when a run into a
store that held no golden record when it began has staged `[matching] batch_first_load`
contacts, its later pages are staged without matching, and when its contacts stream is done
the whole store is clustered in one batch, as `crmhub rebuild` does without re-mapping. The
pages matched before are clustered again with the rest (golden ids stay stable, as in a
rebuild).

Crash safety: a deferred page names its source in `pending_match` in its own transaction, and
the batch clusters and clears it in one. A run or pushed delivery that finds a source pending
whose first load is not running any more (it was interrupted) clusters before it does anything
else; one still running is left to cluster at its own end, so that others do not recluster the
store every few seconds while it loads (what they match meanwhile is clustered again with it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, exists, insert, select

from crmhub.settings import Settings
from dedupe.scoring import MIN_POPULATION
from sync.golden import MERGE_LOCK
from sync.rebuild import RebuildPlan, plan_rebuild
from sync.rebuild_apply import apply_plan, write_keys
from sync.store import (
    audit_log,
    golden_record,
    membership,
    pending_match,
    source_record,
    sync_run,
    write_transaction,
)

__all__ = [
    "BatchOutcome",
    "Deferral",
    "any_pending",
    "batch_sizes",
    "cluster_pending",
    "has_goldens",
    "is_pending",
    "last_batch_size",
    "mark_pending",
    "size_reached",
]

log = logging.getLogger("crmhub.sync")

ACTOR = "sync (batch)"  # a first load, or a store grown past one of `batch_sizes`


@dataclass(slots=True)
class Deferral:
    """One run's first load: pages are matched until `after` contacts are staged, and only
    staged from then on (`deferred` once one was)."""

    after: int
    staged: int = 0
    deferred: bool = False

    @property
    def due(self) -> bool:
        """Whether the next page is staged without matching."""
        return self.staged >= self.after


@dataclass(slots=True)
class BatchOutcome:
    """What clustering the pending first load did, in the run summary's terms."""

    contacts: int = 0
    goldens_created: int = 0
    goldens_merged: int = 0
    records_merged: int = 0
    reviews_queued: int = 0
    reviews_settled: int = 0  # open reviews of its first pages whose records it merged

    @classmethod
    def of(cls, plan: RebuildPlan) -> BatchOutcome:
        """What `plan` will do, taken before it is applied (the apply gives new golden
        records their ids); `reviews_settled` is the apply's to fill in."""
        new = [r for r in plan.target if r not in plan.current]
        sizes = Counter(plan.target.values())
        return cls(
            contacts=plan.contacts,
            goldens_created=len({g for g in plan.target.values() if g < 0}),
            goldens_merged=len(plan.aliases),
            records_merged=sum(1 for r in new if sizes[plan.target[r]] > 1),
            reviews_queued=len(plan.reviews),
        )


def has_goldens(conn: Connection) -> bool:
    return conn.execute(select(golden_record.c.id).limit(1)).first() is not None


def is_pending(db: Engine) -> bool:
    """Whether a first load's staged contacts wait for their batch (one tiny-table read)."""
    with db.connect() as conn:
        return any_pending(conn)


def any_pending(conn: Connection) -> bool:
    """Whether some source waits for a batch, as `conn` sees the store."""
    return conn.execute(select(pending_match.c.source).limit(1)).first() is not None


def mark_pending(conn: Connection, source: str, now: datetime) -> None:
    """Record, in the deferred page's transaction, that `source` has contacts to cluster."""
    listed = select(pending_match.c.source).where(pending_match.c.source == source)
    if conn.execute(listed).first() is None:
        conn.execute(insert(pending_match).values(source=source, since=now))


def batch_sizes(growth: float) -> Iterator[int]:
    """The store sizes at which the whole store is clustered again in one batch:
    MIN_POPULATION, then each `growth` more (2,000, 2,200, 2,420, ... at 0.1; only 2,000 at 0).
    The ladder is fixed, so every process agrees on it and nothing needs storing."""
    size = MIN_POPULATION
    yield size
    while growth > 0:
        size = max(size + 1, round(size * (1 + growth)))
        yield size


def size_reached(contacts: int, growth: float) -> int | None:
    """The largest of the `batch_sizes` a store of `contacts` contacts has reached, if any.
    Records decided one at a time weighed with the store's size and counts when they arrived;
    a batch weighs them all with today's (docs/matching.md, "Growing stores")."""
    reached = None
    for size in batch_sizes(growth):
        if size > contacts:
            break
        reached = size
    return reached


def last_batch_size(conn: Connection, rechecks: bool = False) -> int:
    """Contacts the store held at its newest batch (a first load's, a growing store's, or
    `crmhub rebuild`'s: each leaves a "rebuild.apply" line in the audit log), or with
    `rechecks` at its newest batch or borderline recheck ("rebuild.borderline",
    sync/borderline.py); 0 if none."""
    actions = ("rebuild.apply", "rebuild.borderline") if rechecks else ("rebuild.apply",)
    row = conn.execute(
        select(audit_log.c.action, audit_log.c.details)
        .where(audit_log.c.action.in_(actions))
        .order_by(audit_log.c.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return 0
    key = "store_contacts" if row.action == "rebuild.borderline" else "contacts"
    return int(row.details.get(key, 0))


def cluster_pending(
    db: Engine,
    settings: Settings,
    own: str | None = None,
    stop: threading.Event | None = None,
) -> BatchOutcome | None:
    """Cluster the whole store in one batch if a first load is pending, in one transaction
    that also clears it; None when nothing was pending (or another process did it), or when
    every pending source is still loading in a run other than `own`'s. A set `stop` ends it
    with `sync.rebuild.BatchStopped` at its next step, and nothing of it is written."""
    now = datetime.now(UTC)
    with write_transaction(db) as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MERGE_LOCK})")
        pending = set(conn.execute(select(pending_match.c.source)).scalars())
        loading = set(
            conn.execute(
                select(sync_run.c.connector).where(
                    sync_run.c.state == "running", sync_run.c.connector.in_(pending - {own})
                )
            ).scalars()
        )
        if not pending - loading:
            return None
        plan = plan_rebuild(conn, settings, remap=False, write_keys=write_keys, stop=stop)
        outcome = BatchOutcome.of(plan)
        applying = time.perf_counter()
        apply_plan(conn, plan, ACTOR, now, stop)
        outcome.reviews_settled = plan.reviews_settled
        _attach_aliases(conn, now)
        conn.execute(pending_match.delete())
        plan.timings["apply_seconds"] = round(time.perf_counter() - applying, 1)
        committing = time.perf_counter()
    plan.timings["commit_seconds"] = round(time.perf_counter() - committing, 1)
    log.info(
        "store clustered in one batch",
        extra={"contacts": outcome.contacts, **plan.timings},
    )
    return outcome


def _attach_aliases(conn: Connection, now: datetime) -> None:
    """Contacts the source merged into others while the first load was deferred are aliases
    without a golden record (the batch clusters live contacts only): they join their
    survivor's, as sync/aliases.py does for matched ones."""
    retired = conn.execute(
        select(source_record.c.id, source_record.c.source, source_record.c.alias_of).where(
            source_record.c.alias_of.is_not(None),
            source_record.c.kind == "contact",
            ~exists().where(membership.c.record_id == source_record.c.id),
        )
    ).all()
    for record_id, source, survivor in retired:
        golden = conn.execute(
            select(membership.c.golden_id)
            .join(source_record, source_record.c.id == membership.c.record_id)
            .where(
                source_record.c.source == source,
                source_record.c.kind == "contact",
                source_record.c.external_id == survivor,
            )
        ).scalar()
        if golden is not None:
            conn.execute(
                insert(membership).values(
                    record_id=record_id,
                    golden_id=golden,
                    method="alias",
                    probability=None,
                    decided_at=now,
                )
            )
