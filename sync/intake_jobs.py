"""Form deliveries processed by `crmhub worker` (webform connectors with `process = "worker"`).

`crmhub serve` commits each delivery to the inbox and answers, as always; then, instead of
processing it itself, it queues the arq job `drain_inbox` under one fixed job id, so a burst of
deliveries is one queued job, not one each (`DrainQueue.kick`). A worker runs the job:
`Intake.process_pending` for those connectors, batch after batch, until none is pending.

Redis is only the doorbell, never the data: a delivery whose kick was lost (Redis down, or it
came while the last job was finishing) is still `pending` in the inbox, and a cron tick of the
same job every 15 s (at seconds 7, 22, 37, 52) picks it up. Claims keep two drains (a cron
tick and a kicked job, two workers) from processing a row twice (sync/intake.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from arq.connections import ArqRedis, create_pool
from redis.exceptions import RedisError

from crmhub.settings import Settings
from sync.intake import DrainReport, Intake, webform_connectors
from sync.metrics import queue_name

__all__ = ["JOB_DRAIN_INBOX", "DrainQueue", "drain_inbox", "drain_job_id"]

log = logging.getLogger("crmhub.intake")

JOB_DRAIN_INBOX = "drain_inbox"
DRAIN_CRON_SECONDS = frozenset({7, 22, 37, 52})  # off the other ticks (0, 30, 45)
# A web process that cannot reach Redis says so at most this often (not once per delivery).
WARN_EVERY = 60.0


def drain_job_id(settings: Settings) -> str:
    return f"{settings.queue.namespace}intake:drain"


async def drain_inbox(ctx: dict[str, Any]) -> dict[str, int]:
    """The worker's job (kicked by `crmhub serve`, and a cron tick): process what is pending
    for connectors with `process = "worker"`."""
    settings: Settings = ctx["settings"]
    names = webform_connectors(settings, "worker")
    if not names:
        return {"processed": 0}
    # Its own Intake: on SQLite it fsyncs its ingest before marking rows done.
    intake = Intake(settings, ctx["db"], only=names)
    try:
        report: DrainReport = await intake.drain()
    finally:
        intake.close()
    if report.processed or report.skipped:
        log.info(
            "inbox drained by worker",
            extra={"processed": report.processed, "skipped": report.skipped},
        )
    return {"processed": report.processed, "skipped": report.skipped, "failed": report.failed}


class DrainQueue:
    """The web process's side: queue `drain_inbox` after an accepted delivery."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pool: ArqRedis | None = None
        self._warned_at = 0.0

    async def kick(self) -> bool:
        """Queue the job unless one is queued already; False (logged) if Redis failed. The
        delivery is in the inbox either way: the cron tick finds it."""
        from sync.jobs import redis_settings

        try:
            if self._pool is None:
                self._pool = await create_pool(redis_settings(self._settings, retries=0))
            await self._pool.enqueue_job(
                JOB_DRAIN_INBOX,
                _job_id=drain_job_id(self._settings),
                _queue_name=queue_name(self._settings),
            )
        except (RedisError, OSError) as exc:
            if time.monotonic() - self._warned_at > WARN_EVERY:
                self._warned_at = time.monotonic()
                log.warning(
                    "could not queue the inbox drain; the worker's cron tick will pick it up",
                    extra={"error_type": type(exc).__name__},
                )
            return False
        return True

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.aclose()
