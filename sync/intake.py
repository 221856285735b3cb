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
from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.sources import load_source
from sync.store import dead_letter, inbox, write_transaction

__all__ = ["JSON_TYPE", "Accepted", "DrainReport", "Intake"]

log = logging.getLogger("crmhub.intake")

JSON_TYPE = "application/json"
# A claimed row is left alone this long (the claimant may still be working on it).
CLAIM_LEASE = timedelta(seconds=60)
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
    async def process(self, inbox_id: int) -> bool:
        """Process one pending row if it can be claimed; True when it was processed."""
        row = await asyncio.to_thread(self._claim, inbox_id)
        if row is None:
            return False
        name = row["connector"]
        try:
            provider = _provider(self.settings, name, row["content_type"])
            payload = json.loads(row["body"])
            if not isinstance(payload, dict):
                raise RecordError("delivery is not a JSON object", connector=name)
            submission = normalise(provider, payload, row["delivery_id"], row["received_at"])
            records = records_for(submission, origin=f"inbox:{inbox_id}")
            counts = await self.engine.ingest(name, records)
        except (RecordError, ValueError) as exc:
            # The delivery itself is unusable: dead-letter it (kept, visible), never retry.
            await asyncio.to_thread(self._fail, row, f"{type(exc).__name__}: {exc}", True)
            log.warning("delivery dead-lettered", extra={"connector": name, "inbox_id": inbox_id})
            return False
        except (CrmHubError, SQLAlchemyError, OSError) as exc:
            final = row["attempts"] >= MAX_ATTEMPTS
            await asyncio.to_thread(self._fail, row, f"{type(exc).__name__}: {exc}", final)
            log.warning(
                "delivery processing failed",
                extra={"connector": name, "inbox_id": inbox_id, "error_type": type(exc).__name__},
            )
            return False
        await asyncio.to_thread(self._done, inbox_id)
        log.info(
            "delivery processed",
            extra={"connector": name, "inbox_id": inbox_id, "new": counts.new},
        )
        return True

    async def drain(self, limit: int | None = None) -> DrainReport:
        """Process every pending row whose claim has lapsed (startup, or a periodic job)."""
        report = DrainReport()
        ids = await asyncio.to_thread(self._pending_ids, limit)
        for inbox_id in ids:
            if await self.process(inbox_id):
                report.processed += 1
                report.ids.append(inbox_id)
            else:
                report.skipped += 1
        report.failed = await asyncio.to_thread(self._count, "failed")
        if ids:
            log.info("inbox drained", extra={"processed": report.processed})
        return report

    # -- store helpers (run on a worker thread) -----------------------------------------
    def _lapsed(self, now: datetime) -> Any:
        return or_(inbox.c.claimed_at.is_(None), inbox.c.claimed_at < now - CLAIM_LEASE)

    def _pending_ids(self, limit: int | None) -> list[int]:
        now = datetime.now(UTC)
        query = (
            select(inbox.c.id)
            .where(inbox.c.status == "pending", self._lapsed(now))
            .order_by(inbox.c.id)
        )
        if limit is not None:
            query = query.limit(limit)
        with self.db.connect() as conn:
            return [int(i) for i in conn.execute(query).scalars()]

    def _claim(self, inbox_id: int) -> dict[str, Any] | None:
        now = datetime.now(UTC)
        with write_transaction(self.db) as conn:
            claimed = conn.execute(
                inbox.update()
                .where(inbox.c.id == inbox_id, inbox.c.status == "pending", self._lapsed(now))
                .values(claimed_at=now, attempts=inbox.c.attempts + 1)
            ).rowcount
            if claimed != 1:
                return None
            row = conn.execute(select(inbox).where(inbox.c.id == inbox_id)).mappings().one()
            return dict(row)

    def _done(self, inbox_id: int) -> None:
        with write_transaction(self.db) as conn:
            conn.execute(
                inbox.update()
                .where(inbox.c.id == inbox_id)
                .values(status="done", processed_at=datetime.now(UTC), error=None)
            )

    def _fail(self, row: dict[str, Any], reason: str, final: bool) -> None:
        now = datetime.now(UTC)
        with write_transaction(self.db) as conn:
            conn.execute(
                inbox.update()
                .where(inbox.c.id == row["id"])
                .values(status="failed" if final else "pending", error=reason[:2000])
            )
            if final:
                conn.execute(
                    dead_letter.insert(),
                    {
                        "run_id": None,
                        "source": row["connector"],
                        "scope": "record",
                        "origin": f"inbox:{row['id']} delivery {row['delivery_id']}"[:500],
                        "field": None,
                        "reason": reason[:2000],
                        "raw": row["body"],
                        "created_at": now,
                    },
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
