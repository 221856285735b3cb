"""arq job functions and the worker settings built from config.

arq only decides when and where a run happens; the run itself is `SyncEngine.run`, the same
code `crmhub sync` runs in-process. The store's `sync_run` table is the system of record
(arq may lose jobs with Redis, see RELIABILITY.md §1.1), so:

- every request is first a `sync_run` row in state `queued`, then an arq job with the
  deterministic id `sync:NAME`: a connector is never queued twice, and a request arq lost
  is queued again by the worker's reconciler (`sync.worker`);
- a job holds the connector's lease (`sync.locks`) for the whole run: never two runs of one
  connector at once, and a dead worker's lease expires so another worker takes over;
- transient errors retry with backoff (at least the source's Retry-After), up to `max_tries`;
  permanent ones (bad credentials, invalid config) are recorded once and not retried.

Run states: queued -> running -> succeeded | failed | retrying (-> running ...) | interrupted
(worker stopped or killed; the next run resumes from the last committed page).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from arq import Retry, cron
from arq.connections import ArqRedis, RedisSettings
from arq.constants import in_progress_key_prefix, job_key_prefix
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import DBAPIError

from crmhub.errors import ConfigError, CrmHubError, RateLimitedError, TransientError
from crmhub.settings import Settings
from sync.intake_jobs import DRAIN_CRON_SECONDS, JOB_DRAIN_INBOX, drain_inbox
from sync.locks import Lease, LeaseLost, lease_key
from sync.metrics import queue_name, record_run
from sync.outbox import relay
from sync.schedule import due_connectors
from sync.store import sync_run, write_transaction
from sync.writeback import plan_from_settings

__all__ = [
    "JOB_ENQUEUE_DUE",
    "JOB_SYNC",
    "enqueue_due_syncs",
    "enqueue_sync",
    "job_id",
    "queue_configured",
    "redis_settings",
    "retry_delay",
    "sync_connector",
    "worker_settings",
]

log = logging.getLogger("crmhub.jobs")

JOB_SYNC = "sync_connector"
JOB_ENQUEUE_DUE = "enqueue_due_syncs"
JOB_RELAY = "relay_outbox"
# The cron tick that drains the webhook inbox (a job name of its own beside `drain_inbox`).
JOB_DRAIN_TICK = JOB_DRAIN_INBOX + "_tick"
# Rows a job may continue; any other state means that attempt is over and a new row starts.
_CONTINUABLE = ("queued", "retrying")


def job_id(settings: Settings, name: str) -> str:
    return f"{settings.queue.namespace}sync:{name}"


def queue_configured(settings: Settings) -> bool:
    """Whether `[queue] redis_url` is set (in the file or CRMHUB_QUEUE__REDIS_URL): then
    workers may be running, and in-process syncs take the connector's lease too."""
    return "redis_url" in settings.queue.model_fields_set


def redis_settings(settings: Settings, retries: int = 10) -> RedisSettings:
    rs = RedisSettings.from_dsn(settings.queue.redis_url)
    rs.conn_retries = retries  # by default, ride out a Redis restart at startup
    rs.conn_timeout = 2
    return rs


def is_transient_db_error(exc: DBAPIError) -> bool:
    """Deadlock, serialization failure, dropped connection, SQLite busy: the page's
    transaction rolled back whole, so running again from the cursor is safe."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return (
        exc.connection_invalidated
        or sqlstate in ("40P01", "40001", "57P01", "08006", "08003")
        or "database is locked" in str(exc.orig)
    )


def retry_delay(settings: Settings, job_try: int, exc: BaseException) -> float:
    """Exponential backoff from `retry_backoff`, never sooner than the source's Retry-After.

    Database conflicts (two runs merging into the same golden records) retry within seconds,
    with jitter so the two runs do not collide again.
    """
    if isinstance(exc, DBAPIError):
        return round(random.uniform(0.5, 2.0) * job_try, 2)
    backoff = float(settings.queue.retry_backoff * 2 ** max(0, job_try - 1))
    after: float | None = None
    if isinstance(exc, RateLimitedError):
        after = exc.context.get("retry_after")
    return max(backoff, float(after or 0))


# -- sync_run rows ------------------------------------------------------------------------
def _insert_queued(db: Engine, name: str, full: bool) -> int:
    with write_transaction(db) as conn:
        return int(
            conn.execute(
                sync_run.insert().returning(sync_run.c.id),
                {
                    "connector": name,
                    "state": "queued",
                    "full_refresh": int(full),
                    "started_at": datetime.now(UTC),
                    "counts": {},
                },
            ).scalar_one()
        )


def _set_state(db: Engine, run_id: int, state: str, error: str | None) -> None:
    values: dict[str, Any] = {"state": state, "error": error}
    if state in ("failed", "succeeded", "interrupted"):
        values["finished_at"] = datetime.now(UTC)
    with write_transaction(db) as conn:
        conn.execute(update(sync_run).where(sync_run.c.id == run_id).values(**values))


def _claim_row(db: Engine, run_id: int | None, name: str, full: bool) -> int:
    """The run row this attempt continues: its own if still queued/retrying, else the
    connector's latest queued one (left by an interrupted attempt), else a new one."""
    with db.connect() as conn:
        if run_id is not None:
            row = conn.execute(
                select(sync_run.c.state, sync_run.c.connector).where(sync_run.c.id == run_id)
            ).first()
            if row is not None and row.connector == name and row.state in _CONTINUABLE:
                return run_id
        latest = conn.execute(
            select(func.max(sync_run.c.id)).where(
                sync_run.c.connector == name, sync_run.c.state.in_(_CONTINUABLE)
            )
        ).scalar()
    return int(latest) if latest is not None else _insert_queued(db, name, full)


async def enqueue_sync(
    redis: ArqRedis, settings: Settings, db: Engine, name: str, *, full: bool = False
) -> int | None:
    """Record a queued run of `name` and queue its job; None if one is already queued/running."""
    run_id = _insert_queued(db, name, full)
    job = await redis.enqueue_job(
        JOB_SYNC,
        name,
        full,
        run_id,
        _job_id=job_id(settings, name),
        _queue_name=queue_name(settings),
    )
    if job is None:
        with write_transaction(db) as conn:
            conn.execute(delete(sync_run).where(sync_run.c.id == run_id))
        return None
    log.info("sync queued", extra={"connector": name, "run_id": run_id})
    return run_id


# -- job functions ------------------------------------------------------------------------
async def sync_connector(
    ctx: dict[str, Any], name: str, full: bool = False, run_id: int | None = None
) -> dict[str, Any]:
    """One connector run under its lease. Arguments are ids only: never tokens or PII."""
    # Connectors with a job in this process: the reconciler never frees those (a job that
    # lost its lease may still be finishing its last page).
    running: Counter[str] = ctx.setdefault("running", Counter())
    running[name] += 1
    try:
        return await _sync_connector(ctx, name, full, run_id)
    finally:
        running[name] -= 1
        if running[name] <= 0:
            del running[name]


async def _sync_connector(
    ctx: dict[str, Any], name: str, full: bool, run_id: int | None
) -> dict[str, Any]:
    settings: Settings = ctx["settings"]
    db: Engine = ctx["db"]
    job_try: int = ctx.get("job_try", 1)
    last_try = job_try >= settings.queue.max_tries
    run_id = _claim_row(db, run_id, name, full)
    lease = Lease(
        ctx["redis"], lease_key(settings.queue.namespace, name), settings.queue.lease_seconds
    )
    if not await lease.acquire():
        holder = await lease.holder()
        log.info("connector locked elsewhere", extra={"connector": name, "holder": holder})
        if last_try:
            # Out of tries but not failed: the row stays queued and the reconciler queues it
            # again under the connector's own job id once the running job has ended.
            return {"connector": name, "run_id": run_id, "state": "queued"}
        raise Retry(defer=settings.queue.lease_seconds)
    started = time.perf_counter()
    try:
        async with lease.held():
            result = await ctx["engine"].run(name, full=full, run_id=run_id)
    except ConfigError as exc:
        # Raised before the engine touches the row: record it here. Not retried.
        _set_state(db, run_id, "failed", str(exc))
        record_run(name, "failed", time.perf_counter() - started, {})
        log.warning("sync config error", extra={"connector": name, "run_id": run_id})
        return {"connector": name, "run_id": run_id, "state": "failed", "error": str(exc)}
    except (TransientError, httpx.TransportError, DBAPIError) as exc:
        if isinstance(exc, DBAPIError) and not is_transient_db_error(exc):
            raise
        record_run(name, "failed" if last_try else "retrying", time.perf_counter() - started, {})
        if last_try and isinstance(exc, DBAPIError):
            # A conflict with another run is no fault of this connector, and every committed
            # page moved its cursor on: stay queued, the reconciler runs it again.
            _insert_queued(db, name, full)
            return {"connector": name, "run_id": run_id, "state": "queued"}
        if last_try:
            return {"connector": name, "run_id": run_id, "state": "failed"}
        delay = retry_delay(settings, job_try, exc)
        reason = f"database: {type(exc.orig).__name__}" if isinstance(exc, DBAPIError) else exc
        _set_state(db, run_id, "retrying", f"{reason} (retry {job_try} in {delay:.0f}s)")
        log.info("sync retrying", extra={"connector": name, "run_id": run_id, "delay": delay})
        raise Retry(defer=delay) from exc
    except CrmHubError as exc:
        # Permanent (bad credentials, a gone resource...): the engine recorded it; no retry.
        record_run(name, "failed", time.perf_counter() - started, {})
        return {"connector": name, "run_id": run_id, "state": "failed", "error": str(exc)}
    except LeaseLost:
        # Redis lost the lease or another worker took over. Leave a queued row so the run
        # resumes from our last committed page even if Redis lost the job too (reconciler).
        record_run(name, "interrupted", time.perf_counter() - started, {})
        _insert_queued(db, name, full)
        return {"connector": name, "run_id": run_id, "state": "interrupted"}
    except asyncio.CancelledError:
        # Worker shutdown (SIGTERM) or job timeout: the current page committed, the run is
        # `interrupted`; a queued row marks it for resumption and arq keeps the job.
        record_run(name, "interrupted", time.perf_counter() - started, {})
        _insert_queued(db, name, full)
        raise
    record_run(name, result.state, result.seconds, result.as_dict()["counts"])
    return {"connector": name, "run_id": run_id, "state": result.state}


async def enqueue_due_syncs(ctx: dict[str, Any]) -> list[str]:
    """Cron tick (every minute): queue the connectors whose schedule fires this minute."""
    settings: Settings = ctx["settings"]
    score = ctx.get("score")
    # The tick's scheduled time, not when it happened to start.
    at = datetime.fromtimestamp(score / 1000, UTC) if score else datetime.now(UTC)
    queued = []
    for name in due_connectors(settings, at + timedelta(seconds=1)):
        if await enqueue_sync(ctx["redis"], settings, ctx["db"], name) is not None:
            queued.append(name)
    return queued


async def relay_outbox(ctx: dict[str, Any]) -> dict[str, Any]:
    """Cron tick (every minute): deliver due write-back pushes (opt-outs, erasures, fields).

    At least once and idempotent per vendor; rows claimed by a relay that died are taken
    again when their lease lapses. Nothing to do unless a connector has `writeback` set.
    """
    settings: Settings = ctx["settings"]
    if not plan_from_settings(settings).targets:
        return {}
    report = await relay(settings, ctx["db"], ctx.get("client"))
    if report.claimed:
        log.info(
            "outbox relayed",
            extra={"sent": report.sent, "failed": report.failed, "retried": report.retried},
        )
    return report.as_dict()


# -- learning from steward labels (sync/model_params.py) ------------------------------------
JOB_TRAIN = "train_matcher"


async def train_matcher(ctx: dict[str, Any]) -> dict[str, Any]:
    """Cron tick (every minute): retrain the matcher from steward labels when
    `[matching] train_schedule` fires; a no-op when unset or nothing changed."""
    from sync.model_params import scheduled_training

    score = ctx.get("score")
    at = datetime.fromtimestamp(score / 1000, UTC) if score else datetime.now(UTC)
    return await asyncio.to_thread(
        scheduled_training, ctx["settings"], ctx["db"], at + timedelta(seconds=1)
    )


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `arq.worker.Worker`, from the `[queue]` table."""
    q = settings.queue
    return {
        "functions": [_sync_function(settings), _drain_function()],
        # arq names a unique cron job's id `NAME:TIMESTAMP`, the same in every queue: without
        # the namespace, one installation's tick would swallow another's on a shared Redis.
        "cron_jobs": [
            cron(
                enqueue_due_syncs,
                name=q.namespace + JOB_ENQUEUE_DUE,
                second=0,
                microsecond=0,
                unique=True,
            ),
            cron(relay_outbox, name=q.namespace + JOB_RELAY, second=30, microsecond=0, unique=True),
            cron(
                train_matcher, name=q.namespace + JOB_TRAIN, second=45, microsecond=0, unique=True
            ),
            # Deliveries of `process = "worker"` webforms a kick missed (sync/intake_jobs.py).
            cron(
                drain_inbox,
                name=q.namespace + JOB_DRAIN_TICK,
                second=set(DRAIN_CRON_SECONDS),
                microsecond=0,
                unique=True,
            ),
        ],
        "queue_name": queue_name(settings),
        "redis_settings": redis_settings(settings),
        "job_timeout": q.job_timeout,
        "max_tries": q.max_tries,
        "max_jobs": q.max_jobs,
        # A fixed job id must be reusable as soon as the run ends (arq #430): keep no result.
        "keep_result": 0,
        "health_check_interval": q.health_check_interval,
        "timezone": UTC,
    }


def _sync_function(settings: Settings) -> Any:
    from arq.worker import func

    return func(sync_connector, name=JOB_SYNC, timeout=settings.queue.job_timeout)


def _drain_function() -> Any:
    from arq.worker import func

    return func(drain_inbox, name=JOB_DRAIN_INBOX)


def in_progress_key(settings: Settings, name: str) -> str:
    return in_progress_key_prefix + job_id(settings, name)


def job_key(settings: Settings, name: str) -> str:
    return job_key_prefix + job_id(settings, name)
