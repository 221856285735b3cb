"""One connector run: pull -> map -> stage -> match -> merge -> checkpoint.

Each page a connector yields is applied in one write transaction together with its cursor,
so a crash anywhere replays at most the uncommitted page, and staging makes the replay a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, select

from connectors import Connector
from connectors.base import merged_into
from crmhub.errors import CrmHubError
from crmhub.records import Contact, Cursor, Page, RawRecord
from crmhub.settings import Settings
from dedupe import ExactMatcher, Matcher, build_matcher
from dedupe.matcher import FellegiSunterMatcher
from sync import borderline, first_load, writeback
from sync.activities import index_activities
from sync.aliases import apply_aliases
from sync.collector import bulk_collection
from sync.configure import configure
from sync.constraints import recheck as recheck_constraints
from sync.deletions import FullScan, HeldDeletions, apply_inferred
from sync.erasure import is_suppressed
from sync.first_load import Deferral
from sync.frequencies import StoreFrequencies
from sync.golden import CandidateCache, MatchInput, match_and_merge, recompute_goldens
from sync.locks import fence
from sync.mapping_step import MappedRecord, PageMapper, Rejected
from sync.model_params import use_active_params
from sync.sources import Source, load_source
from sync.staging import Staged, StageItem, chunks, stage
from sync.state import load_cursor, save_cursor
from sync.store import (
    bulk_insert,
    contact_form,
    dead_letter,
    json_text,
    match_key,
    membership,
    one_of,
    source_record,
    suppression,
    sync_run,
    write_transaction,
)

__all__ = ["PageReport", "RunCounts", "RunResult", "SyncEngine"]

log = logging.getLogger("crmhub.sync")

# Pushed deliveries (`ingest`, one small batch each) look for newly trained matcher
# parameters, and for a first load left to cluster, at most this often; a pull run always
# looks at its start.
PARAMS_CHECK_SECONDS = 10.0
# Pulling runs ahead of the writer by up to READ_AHEAD records, or PAGES_AHEAD pages whatever
# their size: with one page in flight the mapping helper idled while each page was read and
# sent to it (file connectors' pages hold 10,000 records; a 200k-row CSV into SQLite went
# from 16k to 19-20k rows/s). WRITE_BATCH: records written in one transaction, at most.
READ_AHEAD = 8000
PAGES_AHEAD = 2
WRITE_BATCH = 2000


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
    reviews_settled: int = 0  # open ones closed because their records came to be merged
    suppressed: int = 0
    aliased: int = 0  # contacts the source merged into others (sync/aliases.py)
    deletions_held: int = 0  # inferred deletions the guard refused (sync/deletions.py)

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
    held: HeldDeletions | None = None  # a full scan's deletions awaiting confirmation

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "connector": self.connector,
            "state": self.state,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "counts": asdict(self.counts),
            "held_deletions": self.held.as_dict() if self.held else None,
        }


@dataclass(slots=True)
class PageReport:
    """Sent to the progress callback after each committed page (and, with a `note`, when the
    run does something long that is not a page, such as a first load's batch)."""

    connector: str
    stream: str
    counts: RunCounts
    total_hint: int | None
    note: str = ""


class SyncEngine:
    """Runs connectors against one store. Safe to reuse for many runs."""

    def __init__(self, settings: Settings, db: Engine, matcher: Matcher | None = None) -> None:
        self.settings = settings
        self.db = db
        m = settings.matching
        self._own_matcher = matcher is None  # a matcher passed in keeps its own parameters
        if matcher is None:
            matcher = (
                ExactMatcher()
                if m.method == "exact"
                else build_matcher(m.auto_merge, m.review, m.default_region)
            )
        self.matcher = matcher
        self._params_checked = self._pending_checked = 0.0
        self._batch_due = False  # a page marked the store for a batch (`_mark_batch_if_due`)
        self._batched: int | None = None  # contacts the newest batch covered, as last read
        self._rechecked: int | None = None  # store size at the newest batch or recheck, as read
        self.use_trained_params()
        self.frequencies = StoreFrequencies()
        self.candidates = CandidateCache()
        self._analyzed_at = 0
        self.mapper = PageMapper(m.default_region, exact_keys=isinstance(matcher, ExactMatcher))
        configure(db, settings)  # survivorship policy and write-back plan for this store

    async def run(
        self,
        name: str,
        *,
        full: bool = False,
        progress: Callable[[PageReport], None] | None = None,
        client: httpx.AsyncClient | None = None,
        run_id: int | None = None,
        allow_deletes: bool = False,
    ) -> RunResult:
        """Sync connector `name` to the store; returns the run's counts and state.

        Config errors raise before a run is recorded. Connector errors end the run as
        `failed` (recorded with the error) and are re-raised for the caller to report.
        `run_id` continues a run row recorded earlier (a queued background job).
        `allow_deletes` confirms deletions a full run infers above `max_delete_ratio`.
        """
        source = load_source(self.settings, name)
        with bulk_collection():
            return await self._run(source, full, progress, client, run_id, allow_deletes)

    async def _run(
        self,
        source: Source,
        full: bool,
        progress: Callable[[PageReport], None] | None,
        client: httpx.AsyncClient | None,
        run_id: int | None,
        allow_deletes: bool = False,
    ) -> RunResult:
        name = source.name
        self.use_trained_params()
        run_id = self._start_run(name, full, run_id)
        started = time.perf_counter()
        counts = RunCounts()
        log.info("sync started", extra={"connector": name, "run_id": run_id, "full": full})
        own_client = client is None
        client = client or httpx.AsyncClient(timeout=httpx.Timeout(30.0))
        held: HeldDeletions | None = None
        try:
            # A first load interrupted earlier is clustered before anything else is matched.
            await self._cluster_pending(counts, own=name)
            connector = source.connector(self.settings, client)
            limit = connector.max_delete_ratio if full else None
            scan = FullScan(datetime.now(UTC)) if limit is not None else None
            deferral = self._first_load()
            # Contacts first, so activities in the same run link to them.
            for stream in sorted(connector.streams, key=lambda s: s != "contacts"):
                with self.db.connect() as conn:
                    cursor = None if full else load_cursor(conn, name, stream)
                await self._pipeline(
                    source,
                    connector,
                    stream,
                    cursor,
                    run_id,
                    counts,
                    progress,
                    scan if stream == "contacts" else None,
                    deferral if stream == "contacts" else None,
                )
                deferred = deferral is not None and deferral.deferred
                if stream == "contacts" and (deferred or self._batch_due):
                    # Before the activities, which link to the contacts' golden records.
                    if progress is not None:
                        note = f"matching {counts.contacts:,} contacts in one batch"
                        progress(PageReport(name, stream, counts, None, note))
                    await self._cluster_pending(counts, own=name)
            if scan is not None and limit is not None:  # the scan completed: infer deletions
                deleted, held = await asyncio.to_thread(
                    apply_inferred,
                    self.db,
                    name,
                    scan,
                    limit=limit,
                    confirmed=allow_deletes,
                    delete=self._apply_deletions,
                    now=datetime.now(UTC),
                )
                counts.deleted += deleted
                counts.deletions_held = held.missing if held else 0
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
        self._finish_run(run_id, "succeeded", counts, held.message() if held else None)
        seconds = time.perf_counter() - started
        log.info("sync finished", extra={"connector": name, "run_id": run_id, **asdict(counts)})
        return RunResult(run_id, name, "succeeded", counts, seconds, held=held)

    async def _pipeline(
        self,
        source: Source,
        connector: Connector[Any],
        stream: str,
        cursor: Cursor | None,
        run_id: int,
        counts: RunCounts,
        progress: Callable[[PageReport], None] | None,
        scan: FullScan | None = None,
        deferral: Deferral | None = None,
    ) -> None:
        """Pull and map ahead while earlier pages are written; commit pages strictly in order.

        Pages already pulled and mapped when the writer is ready are written together (up to
        WRITE_BATCH records) where the connector allows it (`joins_pages`: vendor-sized pages),
        so small API pages do not each pay a whole transaction; the cursor stored is the last
        page's, in the same transaction as all their records.
        """
        queue: asyncio.Queue[tuple[Page, asyncio.Task[list[MappedRecord | Rejected]]] | None]
        queue = asyncio.Queue()
        room = asyncio.Condition()  # the producer waits while the queue is full
        queued = pages_queued = 0

        def has_room() -> bool:
            return queued < READ_AHEAD or pages_queued < PAGES_AHEAD

        async def produce() -> None:
            nonlocal queued, pages_queued
            cancelled = False
            try:
                async for page in connector.pull(stream, cursor):  # type: ignore[arg-type]
                    async with room:
                        await room.wait_for(has_room)
                        queued += len(page.records)
                        pages_queued += 1
                    # Once a first load stages without matching, its pages need no golden
                    # record of their own (`solo`): the batch makes them all.
                    staged_only = deferral is not None and deferral.deferred
                    mapping = self.mapper.map(
                        source.mapping, page.records, with_solo=not staged_only
                    )
                    task = asyncio.ensure_future(mapping)
                    queue.put_nowait((page, task))
            except asyncio.CancelledError:
                cancelled = True
                raise
            finally:
                if not cancelled:
                    queue.put_nowait(None)

        producer = asyncio.create_task(produce())
        try:
            ended = False
            while not ended and (item := await queue.get()) is not None:
                batch = [item]
                while connector.joins_pages and _batchable(batch) and not queue.empty():
                    following = queue.get_nowait()
                    if following is None:
                        ended = True
                        break
                    batch.append(following)
                pages = [(page, await task) for page, task in batch]
                async with room:
                    queued -= sum(len(p.records) for p, _ in pages)
                    pages_queued -= len(pages)
                    room.notify_all()
                page, mapped = _combined(pages)
                applying = asyncio.ensure_future(
                    asyncio.to_thread(
                        self._apply_page, source, stream, page, mapped, run_id, deferral
                    )
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
                if scan is not None:
                    scan.saw(page)
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
        if time.monotonic() - self._params_checked > PARAMS_CHECK_SECONDS:
            self.use_trained_params()
        if time.monotonic() - self._pending_checked > PARAMS_CHECK_SECONDS:
            await self._cluster_pending(RunCounts())  # an interrupted first load, if any
        page = Page(records, next_cursor=None)
        # In-process: pushed batches are small and their processing already has a process
        # of its own (`crmhub serve`'s processor); a mapping helper would be one more.
        mapped = await self.mapper.map(source.mapping, records, inline=True)
        counts = await asyncio.to_thread(self._apply_page, source, None, page, mapped, None)
        if self._batch_due:  # this page found the store due for a batch (`_mark_batch_if_due`)
            await self._cluster_pending(counts)
        return counts

    def _first_load(self) -> Deferral | None:
        """This run's first-load deferral, when the store has no golden record yet and the
        matcher is the settings' probabilistic one (sync/first_load.py)."""
        after = self.settings.matching.batch_first_load
        if not after or not self._own_matcher or isinstance(self.matcher, ExactMatcher):
            return None
        with self.db.connect() as conn:
            return None if first_load.has_goldens(conn) else Deferral(after)

    async def _cluster_pending(self, counts: RunCounts, own: str | None = None) -> None:
        """Cluster a pending first load (`own`'s, or one interrupted earlier), or a store
        that has reached a size no batch covered (`_mark_batch_if_due`)."""
        self._pending_checked = time.monotonic()
        self._batch_due = False
        if not first_load.is_pending(self.db):
            return
        stop = threading.Event()
        # A plain future (not a task): what the thread raises is raised here, as from
        # `asyncio.to_thread`, instead of out of the event loop.
        batch = asyncio.get_running_loop().run_in_executor(
            None, first_load.cluster_pending, self.db, self.settings, own, stop
        )
        try:
            done = await asyncio.shield(batch)
        except asyncio.CancelledError:
            # Ctrl-C, or a job cancelled: the batch's thread cannot be cancelled, and its
            # transaction holds the store (on SQLite the write lock) until it ends, so the run
            # could not even be marked interrupted. It stops at its next step and rolls back.
            stop.set()
            log.warning("stopping the first load's batch; it runs again at the next sync")
            with contextlib.suppress(BaseException):
                await batch
            raise
        if done is not None:
            counts.goldens_created += done.goldens_created
            counts.goldens_merged += done.goldens_merged
            counts.records_merged += done.records_merged
            counts.reviews_queued += done.reviews_queued
            counts.reviews_settled += done.reviews_settled
            self.frequencies.recount()  # its pages were not counted as they were staged

    def use_trained_params(self) -> None:
        """Newest parameters trained from steward labels (`crmhub dedupe train`), if any."""
        if self._own_matcher:
            use_active_params(self.db, self.matcher)
        self._params_checked = time.monotonic()

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
        deferral: Deferral | None = None,
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
        merges = {
            r.external_id: m for r in page.records if r.kind == "deletion" and (m := merged_into(r))
        }
        deletions = [
            r.external_id
            for r in page.records
            if r.kind == "deletion" and r.external_id not in merges
        ]
        contacts = [m for m in latest.values() if m.kind == "contact"]
        activities = [m for m in latest.values() if m.kind == "activity"]
        with write_transaction(self.db) as conn:
            fence(conn, source.name)  # a run that lost its lease may still be writing a page
            self._apply_contacts(conn, source, page, contacts, counts, run_id, deferral)
            self._apply_activities(conn, source, page, activities, counts)
            if merges:  # after the contacts: a survivor in this page is staged first
                counts.aliased += apply_aliases(conn, source.name, merges, now)
            if deletions:
                counts.deleted += self._apply_deletions(conn, source.name, deletions, now)
            if letters:
                bulk_insert(conn, dead_letter, letters)
            if stream is not None:  # pushed records have no cursor
                save_cursor(conn, source.name, stream, page.next_cursor)
        self.frequencies.page_committed()
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
        run_id: int | None = None,
    ) -> list[Staged]:
        staged = stage(
            conn,
            source.name,
            kind,
            [
                StageItem(
                    m.external_id,
                    m.content_hash,
                    m.payload_json or json_text(page.records[m.index].payload),
                    m.data_json or json_text(m.data),
                    m.updated_at,
                )
                for m in items
            ],
            run_id,
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
        run_id: int | None,
        deferral: Deferral | None = None,
    ) -> None:
        if not items:
            return
        items = self._without_erased(conn, source, items, counts)
        deferred = deferral is not None and deferral.due
        staged = self._stage(conn, source, page, "contact", items, counts, run_id)
        counts.contacts += len(staged)
        if deferral is not None:
            deferral.staged += len(staged)
        if deferred and deferral is not None:
            # A first load past `batch_first_load`: clustered in one batch at the end.
            first_load.mark_pending(conn, source.name, datetime.now(UTC))
            deferral.deferred = True
            return
        mapped = {m.external_id: m for m in items}
        inputs = [
            MatchInput(
                s.record_id,
                s.item.data_json,
                s.item.source_updated_at,
                "new" if s.status == "new" else "changed",
                source.name,
                mapped[s.item.external_id].keys,
                mapped[s.item.external_id].solo,
            )
            for s in staged
            if s.status != "unchanged"
        ]
        outcome = match_and_merge(
            conn, self.matcher, inputs, frequencies=self.frequencies, cache=self.candidates
        )
        self._mark_batch_if_due(conn, source)
        self._recheck_borderline_if_due(conn, counts)
        counts.reviews_queued += recheck_constraints(conn, self.matcher, inputs)
        counts.goldens_created += outcome.goldens_created
        counts.records_merged += outcome.records_merged
        counts.goldens_merged += outcome.goldens_merged
        counts.reviews_queued += outcome.reviews_queued
        counts.reviews_settled += outcome.reviews_settled

    def _mark_batch_if_due(self, conn: Connection, source: Source) -> None:
        """If the store has reached a size of the `recluster_growth` ladder that no batch has
        covered (a first load's, a growing store's or `crmhub rebuild`'s, as the audit log has
        them), mark it pending in this page's transaction (probabilistic matcher only). The
        contacts decided one at a time with a smaller store's size and counts are then
        clustered again with today's, in one batch (right after this page, or at the end of
        this run's contacts). Judged from the store's state, not from this page alone, so that
        a size passed by another writer's page (each process counts its own pages between
        recounts) or before this process started is batched too, and by one writer only."""
        if self._batch_due or not isinstance(self.matcher, FellegiSunterMatcher):
            return  # marked already (the batch comes after this page or this stream), or exact
        total = self.frequencies.total
        size = first_load.size_reached(total, self.settings.matching.recluster_growth)
        if size is None or (self._batched is not None and self._batched >= size):
            return
        self._batched = first_load.last_batch_size(conn)  # read only when a size seems due
        if self._batched >= size:
            return
        if first_load.any_pending(conn):
            # A batch is coming already (a first load's, at its end): it covers this size.
            # Another here would cluster a store half loaded, and again at each size it grows.
            return
        log.info("store due for a batch", extra={"contacts": total, "connector": source.name})
        first_load.mark_pending(conn, source.name, datetime.now(UTC))
        self._batch_due = True

    def _recheck_borderline_if_due(self, conn: Connection, counts: RunCounts) -> None:
        """Each `recheck_growth` the store grows since its last batch or recheck (as the audit
        log has them, read only when one seems due), decide its borderline merges and reviews
        again with its size and counts now, in this page's transaction (sync/borderline.py).
        Not when a batch is coming: it decides everything again."""
        growth = self.settings.matching.recheck_growth
        if self._batch_due or not isinstance(self.matcher, FellegiSunterMatcher):
            return
        total = self.frequencies.total
        if self._rechecked is not None and not borderline.due(total, self._rechecked, growth):
            return
        self._rechecked = first_load.last_batch_size(conn, rechecks=True)
        if not borderline.due(total, self._rechecked, growth) or first_load.any_pending(conn):
            return
        done = borderline.decide_again(conn, self.settings, total, datetime.now(UTC))
        self._rechecked = total
        counts.goldens_created += done.goldens_created
        counts.goldens_merged += done.goldens_merged
        counts.reviews_queued += done.reviews_queued
        counts.reviews_settled += done.reviews_settled

    @staticmethod
    def _without_erased(
        conn: Connection, source: Source, items: list[MappedRecord], counts: RunCounts
    ) -> list[MappedRecord]:
        """Erased people stay erased: their records are not staged again (nothing is kept
        of them, not even a dead letter)."""
        if conn.execute(select(suppression.c.hash).limit(1)).first() is None:
            return items  # no erasure yet: nothing to look up
        kept = []
        for m in items:
            contact = Contact.model_validate(m.data)
            if not is_suppressed(conn, source.name, m.external_id, contact):
                kept.append(m)
                continue
            # The tool still has them: tell it again (if it takes erasures).
            writeback.resend_erasure(
                conn, source.name, email=contact.primary_email, external_id=m.external_id
            )
        counts.suppressed += len(items) - len(kept)
        return kept

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
        participants = index_activities(
            conn,
            [(s.record_id, s.item.data) for s in touched],
            [s.record_id for s in touched if s.status == "changed"],
        )
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
            conn.execute(
                contact_form.delete().where(one_of(conn, contact_form.c.record_id, id_part))
            )
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


def _batchable(batch: list[tuple[Page, Any]]) -> bool:
    """May another page join this write? Not past WRITE_BATCH records, and never across a
    page with deletions (applied after the page's contacts, they must not overtake a later
    page's re-created contact)."""
    return sum(len(page.records) for page, _ in batch) < WRITE_BATCH and not any(
        r.kind == "deletion" for page, _ in batch for r in page.records
    )


def _combined(
    pages: list[tuple[Page, list[MappedRecord | Rejected]]],
) -> tuple[Page, list[MappedRecord | Rejected]]:
    """Consecutive pages as one: records in order, the last page's cursor."""
    if len(pages) == 1:
        return pages[0]
    records: list[RawRecord] = []
    rejects: list[tuple[str, str, str]] = []
    mapped: list[MappedRecord | Rejected] = []
    for page, items in pages:
        for item in items:
            item.index += len(records)  # positions in the combined page
        records += page.records
        rejects += page.rejects
        mapped += items
    last = pages[-1][0]
    return Page(records, last.next_cursor, rejects, last.total_hint), mapped


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
