"""`crmhub worker`: an arq worker that survives Redis restarts, plus its reconciler and health.

arq's worker exits when its Redis connection drops (arq #435, #498), so `run_worker` runs it in
a supervisor loop that reconnects with backoff. Beside it, a reconciler treats the store's
`sync_run` table as the truth (arq #300):

- a queued/retrying run whose arq job is gone (Redis restarted empty) is queued again under its
  deterministic job id, so it runs once: neither lost nor doubled;
- a job whose arq in-progress marker is still there while its connector lease has expired
  belongs to a dead worker: the marker is dropped, so another worker re-runs the job now
  instead of after arq's `job_timeout + 10` s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import warnings
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from arq.connections import ArqRedis, create_pool
from arq.worker import Worker
from redis.exceptions import RedisError
from sqlalchemy import Engine, func, select

from crmhub.errors import ConfigError
from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.jobs import (
    _CONTINUABLE,
    JOB_SYNC,
    in_progress_key,
    job_id,
    job_key,
    redis_settings,
    worker_settings,
)
from sync.locks import lease_key
from sync.metrics import queue_name
from sync.sources import configured_sources
from sync.store import make_engine, sync_run

__all__ = ["Health", "check_health", "health_key_prefix", "reconcile", "run_worker"]

log = logging.getLogger("crmhub.worker")


def health_key_prefix(settings: Settings) -> str:
    return f"{queue_name(settings)}:health-check:"


def open_db(settings: Settings) -> Engine:
    from sync.migrate import is_up_to_date

    db = make_engine(settings.store.url, settings.base_dir)
    if not is_up_to_date(db):
        raise ConfigError("the store schema is missing or old: run `crmhub init` first.")
    return db


async def reconcile(
    settings: Settings, db: Engine, redis: ArqRedis, busy: Collection[str] = ()
) -> dict[str, list[str]]:
    """One pass; returns the connectors whose job was freed or queued again.

    `busy`: connectors with a job running in this process, alive whatever their lease says.
    """
    q = settings.queue
    in_progress_ms = (q.job_timeout + 10) * 1000  # what arq sets (max job timeout + 10 s)
    freed: list[str] = []
    requeued: list[str] = []
    names = configured_sources(settings)
    for name in names:
        ttl = await redis.pttl(in_progress_key(settings, name))
        age_ms = in_progress_ms - ttl
        # The grace of one lease period covers the moment between arq marking a job in
        # progress and the job taking its lease.
        stale = ttl > 0 and age_ms > q.lease_seconds * 1000 and name not in busy
        if stale and not await redis.exists(lease_key(q.namespace, name)):
            await redis.delete(in_progress_key(settings, name))
            freed.append(name)
            log.warning("freed a dead worker's job", extra={"connector": name})
    cutoff = datetime.now(UTC) - timedelta(seconds=q.lease_seconds)
    with db.connect() as conn:
        latest = conn.execute(
            select(func.max(sync_run.c.id))
            .where(sync_run.c.state.in_(_CONTINUABLE), sync_run.c.connector.in_(names))
            .group_by(sync_run.c.connector)
        ).scalars()
        rows = conn.execute(select(sync_run).where(sync_run.c.id.in_(list(latest)))).all()
    for row in rows:
        if row.state == "queued" and row.started_at > cutoff:
            continue  # just written by an enqueuer that is about to queue the job
        if await redis.exists(job_key(settings, row.connector)):
            continue
        job = await redis.enqueue_job(
            JOB_SYNC,
            row.connector,
            bool(row.full_refresh),
            row.id,
            _job_id=job_id(settings, row.connector),
            _queue_name=queue_name(settings),
        )
        if job is not None:
            requeued.append(row.connector)
            log.warning("re-queued a lost run", extra={"connector": row.connector, "run": row.id})
    return {"freed": freed, "requeued": requeued}


async def _reconcile_forever(settings: Settings, db: Engine, busy: Collection[str]) -> None:
    interval = max(0.5, settings.queue.lease_seconds / 2)
    redis: ArqRedis | None = None
    try:
        while True:
            try:
                if redis is None:
                    redis = await create_pool(redis_settings(settings), retry=0)
                await reconcile(settings, db, redis, busy)
            except (RedisError, OSError) as exc:
                log.warning("reconciler: Redis unavailable", extra={"error": type(exc).__name__})
            await asyncio.sleep(interval)
    finally:
        if redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await redis.aclose()


async def run_worker(
    settings: Settings, *, burst: bool = False, handle_signals: bool = True, poll_delay: float = 0.5
) -> None:
    """Run until SIGTERM/SIGINT (or, with `burst`, until the queue is empty)."""
    db = open_db(settings)
    engine = SyncEngine(settings, db)
    stopping = asyncio.Event()
    running: Counter[str] = Counter()  # connector -> jobs of it running here (sync_connector)
    reconciler = asyncio.create_task(_reconcile_forever(settings, db, running))
    me = f"{socket.gethostname()}:{os.getpid()}"
    delay = 1.0
    try:
        while not stopping.is_set():
            worker = Worker(
                **worker_settings(settings),
                ctx={"settings": settings, "db": db, "engine": engine, "running": running},
                burst=burst,
                handle_signals=handle_signals,
                poll_delay=poll_delay,
                health_check_key=health_key_prefix(settings) + me,
            )
            worker.on_stop = lambda _sig: stopping.set()
            try:
                await worker.async_run()
                delay = 1.0
            except asyncio.CancelledError:
                if not stopping.is_set():
                    raise
            except (RedisError, OSError) as exc:
                log.warning("worker lost Redis; reconnecting", extra={"error": type(exc).__name__})
            finally:
                # arq's close() calls redis-py's deprecated close(); the warning is arq's.
                with contextlib.suppress(RedisError, OSError), warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    await worker.close()
            if burst:
                break
            if not stopping.is_set():
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
    finally:
        reconciler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reconciler
        engine.close()
        db.dispose()


@dataclass
class Health:
    redis_ok: bool
    workers: dict[str, str] = field(default_factory=dict)  # worker -> its last heartbeat line
    queued: int = 0
    locks: dict[str, str] = field(default_factory=dict)  # connector -> holder
    connectors: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.redis_ok and bool(self.workers)


async def check_health(settings: Settings, db: Engine) -> Health:
    """Live workers (their heartbeats), queue depth, held locks, each connector's last runs."""
    health = Health(redis_ok=False)
    names = configured_sources(settings)
    try:
        redis = await create_pool(redis_settings(settings, retries=0))
    except (RedisError, OSError) as exc:
        health.error = f"Redis unreachable: {type(exc).__name__}"
    else:
        try:
            health.redis_ok = True
            prefix = health_key_prefix(settings)
            async for key in redis.scan_iter(match=prefix + "*"):
                value = await redis.get(key)
                k = key.decode() if isinstance(key, bytes) else str(key)
                health.workers[k[len(prefix) :]] = value.decode() if value else ""
            health.queued = int(await redis.zcard(queue_name(settings)))
            for name in names:
                holder = await redis.get(lease_key(settings.queue.namespace, name))
                if holder:
                    health.locks[name] = holder.decode()
        finally:
            await redis.aclose()
    with db.connect() as conn:
        for name in names:
            last_ok = conn.execute(
                select(func.max(sync_run.c.finished_at)).where(
                    sync_run.c.connector == name, sync_run.c.state == "succeeded"
                )
            ).scalar()
            latest = conn.execute(
                select(sync_run.c.state, sync_run.c.error)
                .where(sync_run.c.connector == name)
                .order_by(sync_run.c.id.desc())
                .limit(1)
            ).first()
            health.connectors.append(
                {
                    "connector": name,
                    "schedule": settings.connectors[name].get("schedule"),
                    "last_success": last_ok.isoformat() if last_ok else None,
                    "latest_state": latest.state if latest else None,
                    "latest_error": latest.error if latest else None,
                    "locked_by": health.locks.get(name),
                }
            )
    return health
