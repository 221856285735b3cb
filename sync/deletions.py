"""Deletions inferred from a full scan, under the max-delete-ratio guard.

Most vendors have no feed of deleted contacts (Mailchimp's permanent delete, ActiveCampaign,
Klaviyo, HubSpot's GDPR delete leave nothing to read). A `--full` run lists every contact the
source has, so the contacts it stored for that source and did not see are gone. Guarded:

- only a run that completed its full scan infers anything; one that fails or is interrupted
  infers nothing (the ids seen live in memory only), and neither does a scan with records
  that could not even be parsed (their ids are unknown, so they would look deleted);
- the deletions are applied at the end of the run in one transaction, and only when their
  share of the source's stored contacts is at most `max_delete_ratio`; above it nothing is
  deleted and the run reports `HeldDeletions`: how many, the share, how to confirm
  (`crmhub sync NAME --full --allow-deletes`, or a higher `max_delete_ratio`);
- only records no write touched since the scan began are candidates.

Deleting goes through the engine's deletion path (flag deleted, drop match keys, recompute
golden records), the one HubSpot's archived contacts take.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, Engine, func, select

from crmhub.records import Page
from sync.locks import fence
from sync.store import source_record, write_transaction

__all__ = ["FullScan", "HeldDeletions", "apply_inferred"]

log = logging.getLogger("crmhub.sync")

DeleteFn = Callable[[Connection, str, list[str], datetime], int]


@dataclass(slots=True)
class FullScan:
    """What a full scan of a source's contacts listed, page by page."""

    started: datetime
    seen: set[str] = field(default_factory=set)
    unreadable: int = 0

    def saw(self, page: Page) -> None:
        # Every id the source listed counts as present, whatever became of the record here
        # (dead-lettered, suppressed, merged away): only absence is a deletion.
        self.seen.update(r.external_id for r in page.records)
        self.unreadable += len(page.rejects)


@dataclass(frozen=True, slots=True)
class HeldDeletions:
    """Inferred deletions refused by the guard: nothing was deleted."""

    connector: str
    missing: int
    stored: int
    limit: float

    @property
    def ratio(self) -> float:
        return self.missing / self.stored if self.stored else 0.0

    def message(self) -> str:
        return (
            f"{self.connector}: the full scan did not list {self.missing:,} of the "
            f"{self.stored:,} contacts stored for it ({self.ratio:.1%}, above max_delete_ratio "
            f"= {self.limit:g}); nothing was deleted. If they really are gone at the source, "
            f"confirm with `crmhub sync {self.connector} --full --allow-deletes`, or raise "
            f"max_delete_ratio in [connectors.{self.connector}]."
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "missing": self.missing,
            "stored": self.stored,
            "ratio": round(self.ratio, 4),
            "max_delete_ratio": self.limit,
            "message": self.message(),
        }


def apply_inferred(
    db: Engine,
    connector: str,
    scan: FullScan,
    *,
    limit: float,
    confirmed: bool,
    delete: DeleteFn,
    now: datetime,
) -> tuple[int, HeldDeletions | None]:
    """Delete the contacts `scan` did not list, in one transaction, if the guard allows;
    returns (deleted, held)."""
    if scan.unreadable:
        log.warning(
            "full scan had unreadable records; no deletions inferred",
            extra={"connector": connector, "unreadable": scan.unreadable},
        )
        return 0, None
    with write_transaction(db) as conn:
        fence(conn, connector)
        stored, missing = _missing(conn, connector, scan)
        if not missing:
            return 0, None
        held = HeldDeletions(connector, len(missing), stored, limit)
        if held.ratio > limit and not confirmed:
            log.warning(
                "inferred deletions held for confirmation",
                extra={"connector": connector, "missing": len(missing), "stored": stored},
            )
            return 0, held
        deleted = delete(conn, connector, missing, now)
    log.info("deletions inferred", extra={"connector": connector, "deleted": deleted})
    return deleted, None


def _missing(conn: Connection, connector: str, scan: FullScan) -> tuple[int, list[str]]:
    """How many live contacts `connector` has stored, and those the scan did not list."""
    live = (
        source_record.c.source == connector,
        source_record.c.kind == "contact",
        source_record.c.deleted == 0,
    )
    stored = conn.execute(select(func.count()).select_from(source_record).where(*live)).scalar()
    untouched = conn.execute(
        select(source_record.c.external_id).where(*live, source_record.c.staged_at < scan.started)
    ).scalars()
    return int(stored or 0), sorted(x for x in untouched if x not in scan.seen)
