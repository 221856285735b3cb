"""The durable inbox for pushed deliveries (form webhooks, hosted HTML forms).

A delivery is written to `inbox` in its own committed transaction *before* the sender gets
its 2xx (`Intake.accept`); UNIQUE (connector, delivery_id) makes a replayed or retried
delivery a no-op that is acknowledged again but never processed twice. Processing follows
(`Intake.process`, in-process right after the response): normalise the payload, then
`SyncEngine.ingest`, then mark the row done.

A crash after the 2xx loses nothing: the row stays `pending`, and `Intake.drain()` (run when
the web app starts, and callable as a job) processes every pending row whose claim has lapsed.
A row can be processed again only if a crash hit between ingest and "done"; staging makes that
replay a no-op (same source record, same content hash).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, or_, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from connectors.webform import normalise, records_for
from crmhub.errors import CrmHubError, RecordError
from crmhub.records import RawRecord
from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.sources import load_source
from sync.store import dead_letter, inbox, one_of, write_transaction

__all__ = ["JSON_TYPE", "Accepted", "DrainReport", "Intake"]

log = logging.getLogger("crmhub.intake")

JSON_TYPE = "application/json"
# A claimed row is left alone this long (the claimant may still be working on it).
CLAIM_LEASE = timedelta(seconds=60)
# Rows per claim: one ingest (one transaction) for a burst of deliveries.
BATCH_SIZE = 100  # 200 records: mapped in-process (sync/mapping_step.POOL_THRESHOLD)
# After this many failed attempts (store errors, not bad payloads) a row is marked failed.
MAX_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Accepted:
    """The outcome of `Intake.accept`: the inbox row, and whether it was already there."""

    inbox_id: int
    duplicate: bool


@dataclass(slots=True)
class DrainReport:
    processed: int = 0
    failed: int = 0
    skipped: int = 0
    ids: list[int] = field(default_factory=list)


class Intake:
    """Accept deliveries durably and process them through one shared `SyncEngine`."""

    def __init__(self, settings: Settings, db: Engine, engine: SyncEngine | None = None) -> None:
        self.settings = settings
        self.db = db
        self._engine = engine
        self._lock = asyncio.Lock()
        self._again = False

    @property
    def engine(self) -> SyncEngine:
        if self._engine is None:
            self._engine = SyncEngine(self.settings, self.db)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    # -- accept: the only step before the 2xx ------------------------------------------
    def record(self, connector: str, delivery_id: str, content_type: str, body: str) -> Accepted:
        """Commit the raw delivery; a delivery id seen before returns the existing row."""
        now = datetime.now(UTC)
        try:
            with write_transaction(self.db) as conn:
                inbox_id = conn.execute(
                    inbox.insert().returning(inbox.c.id),
                    {
                        "connector": connector,
                        "delivery_id": delivery_id,
                        "received_at": now,
                        "content_type": content_type,
                        "body": body,
                        "status": "pending",
                        "attempts": 0,
                    },
                ).scalar_one()
            return Accepted(int(inbox_id), duplicate=False)
        except IntegrityError:
            with self.db.connect() as conn:
                existing = conn.execute(
                    select(inbox.c.id).where(
                        inbox.c.connector == connector, inbox.c.delivery_id == delivery_id
                    )
                ).scalar_one()
            return Accepted(int(existing), duplicate=True)

    async def accept(
        self, connector: str, delivery_id: str, content_type: str, body: str
    ) -> Accepted:
        return await asyncio.to_thread(self.record, connector, delivery_id, content_type, body)

    # -- process: after the 2xx ----------------------------------------------------------
    async def process_pending(self) -> DrainReport:
        """Claim and process pending rows in batches until none is left; one loop per process.

        Called after each accepted delivery. A call that finds the loop running only flags
        it to look again, so a burst of deliveries becomes a few batches, not one ingest
        each; every committed row is seen by the loop before it stops.
        """
        report = DrainReport()
        if self._lock.locked():
            self._again = True
            return report
        async with self._lock:
            while True:
                self._again = False
                rows = await asyncio.to_thread(self._claim_batch, BATCH_SIZE)
                if rows:
                    await self._process_rows(rows, report)
                elif not self._again:
                    break
        return report

    async def drain(self) -> DrainReport:
        """Process every pending row whose claim has lapsed (startup, a job, or by hand)."""
        report = await self.process_pending()
        report.failed = await asyncio.to_thread(self._count, "failed")
        if report.processed:
            log.info("inbox drained", extra={"processed": report.processed})
        return report

    async def _process_rows(self, rows: list[dict[str, Any]], report: DrainReport) -> None:
        by_connector: dict[str, list[tuple[dict[str, Any], list[RawRecord]]]] = {}
        for row in rows:
            try:
                by_connector.setdefault(row["connector"], []).append((row, self._records(row)))
            except (RecordError, ValueError, CrmHubError) as exc:
                # The delivery itself is unusable: dead-letter it (kept, visible), never retry.
                await asyncio.to_thread(self._fail, [row], f"{type(exc).__name__}: {exc}", True)
                log.warning(
                    "delivery dead-lettered",
                    extra={"connector": row["connector"], "inbox_id": row["id"]},
                )
                report.skipped += 1
        for name, items in by_connector.items():
            group = [row for row, _ in items]
            try:
                records = [r for _, recs in items for r in recs]
                # On a thread with its own loop: mapping and matching are CPU work, and the
                # web server's loop must keep answering deliveries meanwhile.
                await asyncio.to_thread(asyncio.run, self.engine.ingest(name, records))
            except (CrmHubError, SQLAlchemyError, OSError) as exc:
                final = [r for r in group if r["attempts"] >= MAX_ATTEMPTS]
                retry = [r for r in group if r["attempts"] < MAX_ATTEMPTS]
                reason = f"{type(exc).__name__}: {exc}"
                await asyncio.to_thread(self._fail, final, reason, True)
                await asyncio.to_thread(self._fail, retry, reason, False)
                log.warning(
                    "delivery processing failed",
                    extra={"connector": name, "rows": len(group), "error_type": type(exc).__name__},
                )
                report.skipped += len(group)
                continue
            ids = [int(r["id"]) for r in group]
            await asyncio.to_thread(self._done, ids)
            report.processed += len(ids)
            report.ids.extend(ids)

    def _records(self, row: dict[str, Any]) -> list[RawRecord]:
        provider = _provider(self.settings, row["connector"], row["content_type"])
        payload = json.loads(row["body"])
        if not isinstance(payload, dict):
            raise RecordError("delivery is not a JSON object", connector=row["connector"])
        try:
            submission = normalise(provider, payload, row["delivery_id"], row["received_at"])
        except (AttributeError, TypeError, KeyError) as exc:
            # A payload near the provider's shape but not in it (a list where an object goes).
            raise RecordError(
                f"not a {provider} payload: {type(exc).__name__}", connector=row["connector"]
            ) from exc
        return records_for(submission, origin=f"inbox:{row['id']}")

    # -- store helpers (run on a worker thread) -----------------------------------------
    def _lapsed(self, now: datetime) -> Any:
        return or_(inbox.c.claimed_at.is_(None), inbox.c.claimed_at < now - CLAIM_LEASE)

    def _claim_batch(self, limit: int) -> list[dict[str, Any]]:
        """Claim up to `limit` pending rows; a row another process claimed first is skipped."""
        now = datetime.now(UTC)
        with write_transaction(self.db) as conn:
            ids = list(
                conn.execute(
                    select(inbox.c.id)
                    .where(inbox.c.status == "pending", self._lapsed(now))
                    .order_by(inbox.c.id)
                    .limit(limit)
                ).scalars()
            )
            if not ids:
                return []
            # The same condition again: only the rows this update changed are ours.
            claimed = list(
                conn.execute(
                    inbox.update()
                    .where(
                        one_of(conn, inbox.c.id, ids),
                        inbox.c.status == "pending",
                        self._lapsed(now),
                    )
                    .values(claimed_at=now, attempts=inbox.c.attempts + 1)
                    .returning(inbox.c.id)
                ).scalars()
            )
            if not claimed:
                return []
            rows = conn.execute(
                select(inbox).where(one_of(conn, inbox.c.id, claimed)).order_by(inbox.c.id)
            ).mappings()
            return [dict(r) for r in rows]

    def _done(self, ids: list[int]) -> None:
        with write_transaction(self.db) as conn:
            conn.execute(
                inbox.update()
                .where(one_of(conn, inbox.c.id, ids))
                .values(status="done", processed_at=datetime.now(UTC), error=None)
            )

    def _fail(self, rows: list[dict[str, Any]], reason: str, final: bool) -> None:
        if not rows:
            return
        now = datetime.now(UTC)
        with write_transaction(self.db) as conn:
            conn.execute(
                inbox.update()
                .where(one_of(conn, inbox.c.id, [int(r["id"]) for r in rows]))
                .values(status="failed" if final else "pending", error=reason[:2000])
            )
            if final:
                conn.execute(
                    dead_letter.insert(),
                    [
                        {
                            "run_id": None,
                            "source": row["connector"],
                            "scope": "record",
                            "origin": f"inbox:{row['id']} delivery {row['delivery_id']}"[:500],
                            "field": None,
                            "reason": reason[:2000],
                            "raw": row["body"],
                            "created_at": now,
                        }
                        for row in rows
                    ],
                )

    def _count(self, status: str) -> int:
        with self.db.connect() as conn:
            query = select(func.count()).select_from(inbox).where(inbox.c.status == status)
            return int(conn.execute(query).scalar_one())


def _provider(settings: Settings, name: str, content_type: str) -> str:
    """The normaliser for a row: the connector's provider for JSON webhooks; hosted HTML
    forms are flat fields whatever the provider."""
    if content_type != JSON_TYPE:
        return "generic"
    config = load_source(settings, name).config
    return str(getattr(config, "provider", "generic"))
