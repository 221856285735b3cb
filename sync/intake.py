"""The durable inbox for pushed deliveries (form webhooks, hosted HTML forms).

A delivery is committed to `inbox` *before* the sender gets its 2xx (`Intake.accept`, through
one group-committing writer thread: sync/inbox_writer.py); UNIQUE (connector, delivery_id)
makes a replayed or retried delivery a no-op that is acknowledged again but never processed
twice. On SQLite the inbox is a file of its own next to the store (sync/inbox_store.py), so
an accept never waits for the store's write lock. What a committed accept survives:
sync/inbox_store.py. Processing follows (`Intake.process_pending`,
in the web process or a processor process next to it: sync/intake_process.py): claim a batch,
normalise the payloads, `SyncEngine.ingest`, then mark the rows done.

A crash after the 2xx loses nothing: the row stays `pending`, and `Intake.drain()` (run when
the web app starts, and callable as a job) processes every pending row whose claim has lapsed.
A row can be processed again only if a crash hit between ingest and "done"; staging makes that
replay a no-op (same source record, same content hash).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, event, func, or_, select, true
from sqlalchemy.exc import SQLAlchemyError

from connectors.webform import normalise, records_for
from crmhub.errors import CrmHubError, RecordError
from crmhub.records import RawRecord
from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.inbox_store import InboxStore, fsync_commits
from sync.inbox_writer import Accepted, InboxWriter
from sync.sources import load_source
from sync.store import dead_letter, inbox, make_engine, one_of, write_transaction

__all__ = [
    "JSON_TYPE",
    "Accepted",
    "DrainReport",
    "Intake",
    "inline_connectors",
    "webform_connectors",
]

log = logging.getLogger("crmhub.intake")

JSON_TYPE = "application/json"
# A claimed row is left alone this long (the claimant may still be working on it).
CLAIM_LEASE = timedelta(seconds=60)
# Rows per claim: one ingest (one transaction) for a burst of deliveries.
BATCH_SIZE = 100  # deliveries per batch (SyncEngine.ingest maps them in-process)
# Seconds between two batches of one loop: room for other processes' writers on SQLite.
BATCH_GAP = 0.02
# After this many failed attempts (store errors, not bad payloads) a row is marked failed.
MAX_ATTEMPTS = 5


@dataclass(slots=True)
class DrainReport:
    processed: int = 0
    failed: int = 0
    skipped: int = 0
    ids: list[int] = field(default_factory=list)


class Intake:
    """Accept deliveries durably and process them through one shared `SyncEngine`.

    `only`: the connectors whose rows this intake processes (`crmhub serve`: those with
    `process = "inline"`); None processes every pending row (`crmhub forms drain`).
    """

    def __init__(
        self,
        settings: Settings,
        db: Engine,
        engine: SyncEngine | None = None,
        only: Collection[str] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.only = None if only is None else sorted(only)
        self.inbox = InboxStore(db)
        self._writer = InboxWriter(self.inbox.accepts)
        self._engine = engine
        self._processing_db: Engine | None = None
        self._lock = asyncio.Lock()
        self._again = False
        self._stopping = False

    @property
    def engine(self) -> SyncEngine:
        if self._engine is None:
            self._engine = SyncEngine(self.settings, self._durable_store())
        return self._engine

    def _durable_store(self) -> Engine:
        """The store as processing writes it. With the inbox in a file of its own, an ingest
        is fsynced before its rows are marked done: after a power loss, "done" (in the inbox
        file) must never be there without the records it stands for (in the store file)."""
        if not self.inbox.separate:
            return self.db
        self._processing_db = make_engine(self.db.url.render_as_string(hide_password=False))
        event.listen(self._processing_db, "connect", fsync_commits)
        return self._processing_db

    def stop(self) -> None:
        """Let processing finish the batch in hand and return (shutdown); the rest waits."""
        self._stopping = True

    def close(self) -> None:
        self._writer.close()
        if self._engine is not None:
            self._engine.close()
        if self._processing_db is not None:
            self._processing_db.dispose()
        self.inbox.close()

    # -- accept: the only step before the 2xx ------------------------------------------
    @staticmethod
    def _row(connector: str, delivery_id: str, content_type: str, body: str) -> dict[str, Any]:
        return {
            "connector": connector,
            "delivery_id": delivery_id,
            "received_at": datetime.now(UTC),
            "content_type": content_type,
            "body": body,
            "status": "pending",
            "attempts": 0,
        }

    async def accept(
        self, connector: str, delivery_id: str, content_type: str, body: str
    ) -> Accepted:
        """Commit the raw delivery (durably: see sync/inbox_store.py); a delivery id seen
        before returns the existing row, marked duplicate."""
        return await self._writer.write(self._row(connector, delivery_id, content_type, body))

    def record(self, connector: str, delivery_id: str, content_type: str, body: str) -> Accepted:
        """`accept` for callers without an event loop."""
        return self._writer.write_blocking(self._row(connector, delivery_id, content_type, body))

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
            while not self._stopping:
                self._again = False
                rows = await asyncio.to_thread(self._claim_batch, BATCH_SIZE)
                if rows:
                    await self._process_rows(rows, report)
                    # A gap between batches, for writers of other processes (SQLite).
                    await asyncio.sleep(BATCH_GAP)
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
        if self.only == []:
            return []
        mine = inbox.c.connector.in_(self.only) if self.only is not None else true()
        with write_transaction(self.inbox.engine) as conn:
            ids = list(
                conn.execute(
                    select(inbox.c.id)
                    .where(inbox.c.status == "pending", mine, self._lapsed(now))
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
        with write_transaction(self.inbox.engine) as conn:
            conn.execute(
                inbox.update()
                .where(one_of(conn, inbox.c.id, ids))
                .values(status="done", processed_at=datetime.now(UTC), error=None)
            )

    def _fail(self, rows: list[dict[str, Any]], reason: str, final: bool) -> None:
        """Back to pending (retried by the next drain), or, when `final`, failed and
        dead-lettered with the raw body."""
        if not rows:
            return
        ids = [int(r["id"]) for r in rows]
        status = "failed" if final else "pending"
        if final:
            with write_transaction(self.engine.db) as conn:
                _dead_letter(conn, rows, reason)
                if not self.inbox.separate:  # one database: one transaction
                    _mark(conn, ids, status, reason)
                    return
        # The letter is committed first: a crash in between letters the row again later,
        # and `_dead_letter` skips a row it already has.
        with write_transaction(self.inbox.engine) as conn:
            _mark(conn, ids, status, reason)

    def _count(self, status: str) -> int:
        with self.inbox.engine.connect() as conn:
            query = select(func.count()).select_from(inbox).where(inbox.c.status == status)
            return int(conn.execute(query).scalar_one())


def _mark(conn: Connection, ids: list[int], status: str, reason: str) -> None:
    conn.execute(
        inbox.update()
        .where(one_of(conn, inbox.c.id, ids))
        .values(status=status, error=reason[:2000])
    )


def _dead_letter(conn: Connection, rows: list[dict[str, Any]], reason: str) -> None:
    origins = {int(r["id"]): f"inbox:{r['id']} delivery {r['delivery_id']}"[:500] for r in rows}
    present = set(
        conn.execute(
            select(dead_letter.c.origin).where(
                one_of(conn, dead_letter.c.origin, list(origins.values()))
            )
        ).scalars()
    )
    now = datetime.now(UTC)
    letters = [
        {
            "run_id": None,
            "source": row["connector"],
            "scope": "record",
            "origin": origins[int(row["id"])],
            "field": None,
            "reason": reason[:2000],
            "raw": row["body"],
            "created_at": now,
        }
        for row in rows
        if origins[int(row["id"])] not in present
    ]
    if letters:
        conn.execute(dead_letter.insert(), letters)


def webform_connectors(settings: Settings, process: str) -> list[str]:
    """The webform connectors whose deliveries are processed by `process`: "inline" (`crmhub
    serve`), "worker" (`crmhub worker`) or "drain" (`crmhub forms drain`)."""
    names = []
    for name, table in settings.connectors.items():
        if table.get("type") != "webform":
            continue
        try:
            config = load_source(settings, name).config
        except CrmHubError:
            continue  # misconfigured: its endpoint answers 404, nothing of it is accepted
        if getattr(config, "process", "inline") == process:
            names.append(name)
    return names


def inline_connectors(settings: Settings) -> list[str]:
    """The webform connectors `crmhub serve` processes itself (`process = "inline"`)."""
    return webform_connectors(settings, "inline")


def _provider(settings: Settings, name: str, content_type: str) -> str:
    """The normaliser for a row: the connector's provider for JSON webhooks; hosted HTML
    forms are flat fields whatever the provider."""
    if content_type != JSON_TYPE:
        return "generic"
    config = load_source(settings, name).config
    return str(getattr(config, "provider", "generic"))
