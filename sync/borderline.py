"""A growing store decides its borderline merges again (docs/matching.md, "Borderline
rechecks").

A merge is decided with the store as it is then: its size sets the prior, its counts the term
frequencies. As the store grows both move, and a link a little above `auto_merge` (merged by a
batch or a page) can weigh a little below it once the store is a few percent bigger, or an open
review item a little below it a little above: exactly the decisions on which a store fed over
time and a batch of the same records differ. So the records a borderline link placed keep its
probability on their membership (`dedupe.cluster.kept_probability`), and each `[matching]
recheck_growth` (1%) the store grows since its last batch or recheck, the golden records they
are in, with those of the two records of each open review item within `BORDERLINE` below
`auto_merge`, are clustered again in one local batch (`plan_rebuild(only=...)`): weighed with
the whole store's size and exact counts, steward constraints winning, golden ids stable, in
the page's transaction. That is a small share of the store (about 5% of its records), where a
batch of the store (`sync.first_load`, each `recluster_growth`) takes all of it.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import Connection, insert, select

from crmhub.settings import Settings
from dedupe.cluster import BORDERLINE
from dedupe.scoring import MIN_POPULATION
from sync.first_load import BatchOutcome
from sync.rebuild import plan_rebuild
from sync.rebuild_apply import apply_plan
from sync.store import audit_log, live_contact, membership, one_of, review_item, source_record

__all__ = ["ACTOR", "borderline_contacts", "decide_again", "due"]

log = logging.getLogger("crmhub.sync")

ACTOR = "sync (borderline)"


def due(contacts: int, last: int, growth: float) -> bool:
    """Whether a store of `contacts` contacts, last batched or rechecked at `last`
    (`first_load.last_batch_size(rechecks=True)`), is due
    for a recheck at `growth` (0: never; below MIN_POPULATION the matcher keeps its shipped
    prior and no term frequencies, so nothing moves)."""
    return growth > 0 and contacts >= MIN_POPULATION and contacts >= last * (1 + growth)


def borderline_contacts(conn: Connection, auto_merge: float) -> list[int]:
    """The live contacts of every golden record one of whose members a borderline link
    placed, and of the golden records of both records of each open review item within
    BORDERLINE below `auto_merge` (and above: links the chain guard held)."""
    goldens = set(
        conn.execute(
            select(membership.c.golden_id).where(
                membership.c.method == "auto",
                membership.c.probability < auto_merge + BORDERLINE,
            )
        ).scalars()
    )
    asked = conn.execute(
        select(review_item.c.record_a, review_item.c.record_b).where(
            review_item.c.status == "open",
            review_item.c.probability >= auto_merge - BORDERLINE,
        )
    ).all()
    records = sorted({r for pair in asked for r in pair})
    if records:
        goldens.update(
            conn.execute(
                select(membership.c.golden_id).where(one_of(conn, membership.c.record_id, records))
            ).scalars()
        )
    if not goldens:
        return []
    return sorted(
        conn.execute(
            select(membership.c.record_id)
            .join(source_record, source_record.c.id == membership.c.record_id)
            .where(one_of(conn, membership.c.golden_id, sorted(goldens)), live_contact)
        ).scalars()
    )


def decide_again(
    conn: Connection, settings: Settings, contacts: int, now: datetime
) -> BatchOutcome:
    """Decide the borderline again, in `conn`'s (write) transaction, for a store of
    `contacts` contacts; the audit log says it was done at that size ("rebuild.borderline"),
    with the plan's figures when there was anything to decide."""
    ids = borderline_contacts(conn, settings.matching.auto_merge)
    details = {"store_contacts": contacts}
    if not ids:
        conn.execute(
            insert(audit_log).values(
                at=now, actor=ACTOR, action="rebuild.borderline", details={**details, "contacts": 0}
            )
        )
        return BatchOutcome()
    plan = plan_rebuild(conn, settings, remap=False, only=ids)
    outcome = BatchOutcome.of(plan)
    apply_plan(conn, plan, ACTOR, now, details=details)
    outcome.reviews_settled = plan.reviews_settled
    log.info(
        "borderline decisions taken again",
        extra={
            "contacts": plan.contacts,
            "store_contacts": contacts,
            "moved": len(plan.moved),
            **plan.timings,
        },
    )
    return outcome
