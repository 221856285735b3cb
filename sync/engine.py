"""One connector run: pull -> map -> stage -> match -> merge -> checkpoint.

Each page a connector yields is applied in one write transaction together with its cursor,
so a crash anywhere replays at most the uncommitted page, and staging makes the replay a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, select

from connectors import Connector
from crmhub.errors import CrmHubError
from crmhub.records import Activity, Contact, Cursor, Page, RawRecord
from crmhub.settings import Settings
from dedupe import ExactMatcher, Matcher, build_matcher
from dedupe.matcher import email_key
from sync.frequencies import StoreFrequencies
from sync.golden import MatchInput, match_and_merge, recompute_goldens
from sync.mapping_step import MappedRecord, PageMapper, Rejected
from sync.sources import Source, load_source
from sync.staging import Staged, StageItem, chunks, stage
from sync.state import load_cursor, save_cursor
from sync.store import (
    activity,
    activity_participant,
    bulk_insert,
    dead_letter,
    match_key,
    membership,
    one_of,
    source_record,
    sync_run,
    write_transaction,
)

__all__ = ["PageReport", "RunCounts", "RunResult", "SyncEngine"]

log = logging.getLogger("crmhub.sync")


@dataclass(slots=True)
class RunCounts:
    pulled: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    dead_letters: int = 0
    field_issues: int = 0
    contacts: int = 0
    activities: int = 0
    activities_linked: int = 0
    deleted: int = 0
    goldens_created: int = 0
    records_merged: int = 0
    goldens_merged: int = 0
    reviews_queued: int = 0

    def add(self, other: RunCounts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(slots=True)
class RunResult:
    run_id: int
    connector: str
    state: str
    counts: RunCounts
    seconds: float
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "connector": self.connector,
            "state": self.state,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "counts": asdict(self.counts),
        }


@dataclass(slots=True)
class PageReport:
    """Sent to the progress callback after each committed page."""

    connector: str
    stream: str
    counts: RunCounts
    total_hint: int | None


class SyncEngine:
    """Runs connectors against one store. Safe to reuse for many runs."""

    def __init__(self, settings: Settings, db: Engine, matcher: Matcher | None = None) -> None:
        self.settings = settings
        self.db = db
        m = settings.matching
        if matcher is None:
            matcher = (
                ExactMatcher()
                if m.method == "exact"
                else build_matcher(m.auto_merge, m.review, m.default_region)
            )
        self.matcher = matcher
        self.frequencies = StoreFrequencies()
        self._analyzed_at = 0
        self.mapper = PageMapper(m.default_region)

    async def run(
        self,
        name: str,
        *,
        full: bool = False,
        progress: Callable[[PageReport], None] | None = None,
        client: httpx.AsyncClient | None = None,
        run_id: int | None = None,
    ) -> RunResult:
        """Sync connector `name` to the store; returns the run's counts and state.

        Config errors raise before a run is recorded. Connector errors end the run as
        `failed` (recorded with the error) and are re-raised for the caller to report.
        `run_id` continues a run row recorded earlier (a queued background job).
        """
        source = load_source(self.settings, name)
        run_id = self._start_run(name, full, run_id)
        started = time.perf_counter()
        counts = RunCounts()
        log.info("sync started", extra={"connector": name, "run_id": run_id, "full": full})
        own_client = client is None
        client = client or httpx.AsyncClient(timeout=httpx.Timeout(30.0))
        try:
            connector = source.connector(self.settings, client)
            # Contacts first, so activities in the same run link to them.
            for stream in sorted(connector.streams, key=lambda s: s != "contacts"):
                with self.db.connect() as conn:
                    cursor = None if full else load_cursor(conn, name, stream)
                await self._pipeline(source, connector, stream, cursor, run_id, counts, progress)
        except (CrmHubError, httpx.HTTPError, OSError) as exc:
            self._finish_run(run_id, "failed", counts, _describe(exc))
            log.warning(
                "sync failed",
                extra={"connector": name, "run_id": run_id, "error_type": type(exc).__name__},
            )
            raise
        except BaseException:
            # Cancelled or killed: the committed pages stand, the run shows as interrupted.
            self._finish_run(run_id, "interrupted", counts, "interrupted")
            raise
        finally:
            if own_client:
                await client.aclose()
        self._finish_run(run_id, "succeeded", counts, None)
        seconds = time.perf_counter() - started
        log.info("sync finished", extra={"connector": name, "run_id": run_id, **asdict(counts)})
        return RunResult(run_id, name, "succeeded", counts, seconds)

    async def _pipeline(
        self,
        source: Source,
        connector: Connector[Any],
        stream: str,
        cursor: Cursor | None,
        run_id: int,
        counts: RunCounts,
        progress: Callable[[PageReport], None] | None,
    ) -> None:
        """Pull and map page N+1 while page N is written; commit pages strictly in order."""
        queue: asyncio.Queue[tuple[Page, asyncio.Task[list[MappedRecord | Rejected]]] | None]
        queue = asyncio.Queue(maxsize=2)

        async def produce() -> None:
            cancelled = False
            try:
                async for page in connector.pull(stream, cursor):  # type: ignore[arg-type]
                    task = asyncio.ensure_future(self.mapper.map(source.mapping, page.records))
                    await queue.put((page, task))
            except asyncio.CancelledError:
                # The consumer is gone (run cancelled): waiting to hand it the end marker
                # on a full queue would hang the shutdown.
                cancelled = True
                raise
            finally:
                if not cancelled:
                    await queue.put(None)

        producer = asyncio.create_task(produce())
        try:
            while (item := await queue.get()) is not None:
                page, mapping_task = item
                mapped = await mapping_task
                applying = asyncio.ensure_future(
                    asyncio.to_thread(self._apply_page, source, stream, page, mapped, run_id)
                )
                try:
                    page_counts = await asyncio.shield(applying)
                except asyncio.CancelledError:
                    # Graceful stop (SIGTERM): the page's transaction is under way in a thread;
                    # let it commit before the run is marked interrupted and the lock released.
                    with contextlib.suppress(Exception):
                        await applying
                    raise
                counts.add(page_counts)
                await asyncio.to_thread(self._refresh_statistics, counts.new)
                if progress is not None:
                    progress(PageReport(source.name, stream, counts, page.total_hint))
            await producer  # surfaces the connector's error, if any
        finally:
            if not producer.done():
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producer

    async def ingest(self, name: str, records: list[RawRecord]) -> RunCounts:
        """Apply records pushed to crmhub (webhooks, forms) as one page, without a pull.

        Map, stage, match and merge in one transaction; no cursor is involved. Staging makes a
        repeated delivery of the same record a no-op.
        """
        source = load_source(self.settings, name)
        page = Page(records, next_cursor=None)
        mapped = await self.mapper.map(source.mapping, records)
        return await asyncio.to_thread(self._apply_page, source, None, page, mapped, None)

    def close(self) -> None:
        """Stop the mapping helper process, if one was started."""
        self.mapper.close()

    def _refresh_statistics(self, staged: int) -> None:
        """ANALYZE on PostgreSQL as a bulk load grows the tables.

        Fresh tables have no statistics and the planner then filters the identity lookups
        row by row (seen: 20x slower loads); autovacuum catches up only later.
        """
        if self.db.dialect.name != "postgresql" or staged < max(1000, 2 * self._analyzed_at):
            return
        with self.db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(
                "ANALYZE source_record, match_key, membership, golden_record, activity_participant"
            )
        self._analyzed_at = staged

    # -- run bookkeeping ------------------------------------------------------------
    def _start_run(self, name: str, full: bool, run_id: int | None = None) -> int:
        now = datetime.now(UTC)
        with write_transaction(self.db) as conn:
            # A run still marked running was killed; it can no longer finish.
            conn.execute(
                sync_run.update()
                .where(sync_run.c.connector == name, sync_run.c.state == "running")
                .values(state="interrupted", finished_at=now, error="process ended mid-run")
            )
            if run_id is not None:
                # A queued (or retrying) run row written by `crmhub sync --enqueue` or the
                # scheduler: it starts now.
                conn.execute(
                    sync_run.update()
                    .where(sync_run.c.id == run_id)
                    .values(state="running", started_at=now, finished_at=None, error=None)
                )
                return run_id
            return int(
                conn.execute(
                    sync_run.insert().returning(sync_run.c.id),
                    {
                        "connector": name,
                        "state": "running",
                        "full_refresh": int(full),
                        "started_at": now,
                        "counts": {},
                    },
                ).scalar_one()
            )

    def _finish_run(self, run_id: int, state: str, counts: RunCounts, error: str | None) -> None:
        with write_transaction(self.db) as conn:
            conn.execute(
                sync_run.update()
                .where(sync_run.c.id == run_id)
                .values(
                    state=state, finished_at=datetime.now(UTC), counts=asdict(counts), error=error
                )
            )

    # -- one page, one transaction ---------------------------------------------------
    def _apply_page(
        self,
        source: Source,
        stream: str | None,
        page: Page,
        mapped: list[MappedRecord | Rejected],
        run_id: int | None,
    ) -> RunCounts:
        counts = RunCounts(pulled=len(page.records))
        now = datetime.now(UTC)
        letters: list[dict[str, Any]] = [
            _letter(run_id, source.name, "record", origin, None, reason, raw, now)
            for origin, reason, raw in page.rejects
        ]
        latest: dict[tuple[str, str], MappedRecord] = {}
        for item in mapped:
            if isinstance(item, Rejected):
                payload = page.records[item.index].payload
                letters.append(
                    _letter(
                        run_id, source.name, "record", item.origin, None, item.reason, payload, now
                    )
                )
            else:
                latest[(item.kind, item.external_id)] = item  # the last copy wins
        for item in latest.values():
            for field_name, reason in item.issues:
                letters.append(
                    _letter(
                        run_id, source.name, "field", item.origin, field_name, reason, None, now
                    )
                )
        deletions = [r.external_id for r in page.records if r.kind == "deletion"]
        contacts = [m for m in latest.values() if m.kind == "contact"]
        activities = [m for m in latest.values() if m.kind == "activity"]
        with write_transaction(self.db) as conn:
            self._apply_contacts(conn, source, page, contacts, counts)
            self._apply_activities(conn, source, page, activities, counts)
            if deletions:
                counts.deleted += self._apply_deletions(conn, source.name, deletions, now)
            if letters:
                bulk_insert(conn, dead_letter, letters)
            if stream is not None:  # pushed records have no cursor
                save_cursor(conn, source.name, stream, page.next_cursor)
        counts.dead_letters = sum(1 for x in letters if x["scope"] == "record")
        counts.field_issues = len(letters) - counts.dead_letters
        return counts

    @staticmethod
    def _stage(
        conn: Connection,
        source: Source,
        page: Page,
        kind: str,
        items: list[MappedRecord],
        counts: RunCounts,
    ) -> list[Staged]:
        staged = stage(
            conn,
            source.name,
            kind,
            [
                StageItem(
                    m.external_id,
                    m.content_hash,
                    page.records[m.index].payload,
                    m.data,
                    m.updated_at,
                )
                for m in items
            ],
        )
        for s in staged:
            setattr(counts, s.status, getattr(counts, s.status) + 1)
        return staged

    def _apply_contacts(
        self,
        conn: Connection,
        source: Source,
        page: Page,
        items: list[MappedRecord],
        counts: RunCounts,
    ) -> None:
        if not items:
            return
        staged = self._stage(conn, source, page, "contact", items, counts)
        counts.contacts += len(staged)
        inputs = [
            MatchInput(
                s.record_id,
                Contact.model_validate(s.item.data),
                s.item.data,
                s.item.source_updated_at,
                "new" if s.status == "new" else "changed",
            )
            for s in staged
            if s.status != "unchanged"
        ]
        outcome = match_and_merge(conn, self.matcher, inputs, frequencies=self.frequencies)
        counts.goldens_created += outcome.goldens_created
        counts.records_merged += outcome.records_merged
        counts.goldens_merged += outcome.goldens_merged
        counts.reviews_queued += outcome.reviews_queued

    def _apply_activities(
        self,
        conn: Connection,
        source: Source,
        page: Page,
        items: list[MappedRecord],
        counts: RunCounts,
    ) -> None:
        if not items:
            return
        staged = self._stage(conn, source, page, "activity", items, counts)
        counts.activities += len(staged)
        touched = [s for s in staged if s.status != "unchanged"]
        changed_ids = [s.record_id for s in touched if s.status == "changed"]
        for part in chunks(changed_ids):
            conn.execute(activity.delete().where(one_of(conn, activity.c.record_id, part)))
            conn.execute(
                activity_participant.delete().where(
                    one_of(conn, activity_participant.c.record_id, part)
                )
            )
        rows: list[dict[str, Any]] = []
        participants: list[dict[str, Any]] = []
        for s in touched:
            act = Activity.model_validate(s.item.data)
            rows.append(
                {
                    "record_id": s.record_id,
                    "type": act.type,
                    "occurred_at": act.occurred_at,
                    "subject": (act.subject or "")[:500],
                }
            )
            participants.extend(
                {"record_id": s.record_id, "email_key": key}
                for key in dict.fromkeys(email_key(p) for p in act.participants)
            )
        if rows:
            bulk_insert(conn, activity, rows)
        if participants:
            bulk_insert(conn, activity_participant, participants)
        keys = {p["email_key"] for p in participants}
        known: set[str] = set()
        for part in chunks(sorted(keys)):
            known.update(
                conn.execute(
                    select(match_key.c.key_value).where(
                        match_key.c.key_kind == "email", one_of(conn, match_key.c.key_value, part)
                    )
                ).scalars()
            )
        linked = {p["record_id"] for p in participants if p["email_key"] in known}
        counts.activities_linked += len(linked)

    def _apply_deletions(
        self, conn: Connection, source: str, external_ids: list[str], now: datetime
    ) -> int:
        """The source no longer has these contacts: flag them, re-survive their goldens."""
        ids: list[int] = []
        for part in chunks(external_ids):
            ids.extend(
                conn.execute(
                    select(source_record.c.id).where(
                        source_record.c.source == source,
                        source_record.c.kind == "contact",
                        one_of(conn, source_record.c.external_id, part),
                        source_record.c.deleted == 0,
                    )
                ).scalars()
            )
        goldens: set[int] = set()
        for id_part in chunks(ids):
            conn.execute(
                source_record.update()
                .where(one_of(conn, source_record.c.id, id_part))
                .values(deleted=1, staged_at=now)
            )
            conn.execute(match_key.delete().where(one_of(conn, match_key.c.record_id, id_part)))
            goldens.update(
                conn.execute(
                    select(membership.c.golden_id).where(
                        one_of(conn, membership.c.record_id, id_part)
                    )
                ).scalars()
            )
        recompute_goldens(conn, goldens, now)
        return len(ids)

    def totals(self) -> dict[str, int]:
        """Store-wide figures for summaries."""
        from sync.queries import store_totals

        with self.db.connect() as conn:
            return store_totals(conn)


def _letter(
    run_id: int | None,
    source: str,
    scope: str,
    origin: str,
    field_name: str | None,
    reason: str,
    raw: Any,
    now: datetime,
) -> dict[str, Any]:
    text = raw if isinstance(raw, str) or raw is None else json.dumps(raw, default=str)
    return {
        "run_id": run_id,
        "source": source,
        "scope": scope,
        "origin": origin[:500],
        "field": field_name,
        "reason": reason,
        "raw": text,
        "created_at": now,
    }


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
