"""Prometheus metrics: counters a worker updates as runs finish, and gauges read on scrape.

Workers export the counters on their own port (`crmhub worker --metrics-port`); `crmhub serve`
exports the store and queue gauges at `/metrics`, which any replica can answer because they
come from PostgreSQL/SQLite and Redis, not from process memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime

import redis
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select

from crmhub.settings import Settings
from sync.store import sync_run

__all__ = ["RECORDS", "RUNS", "RUN_SECONDS", "StoreCollector", "queue_name", "record_run"]

log = logging.getLogger("crmhub.metrics")

RUNS = Counter(
    "crmhub_sync_runs", "Background sync runs ended, by final state", ["connector", "state"]
)
RECORDS = Counter(
    "crmhub_sync_records",
    "Records handled by background runs: pulled, staged (new or changed), merged",
    ["connector", "stage"],
)
RUN_SECONDS = Histogram(
    "crmhub_sync_run_seconds",
    "Duration of background sync runs",
    ["connector"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)


def queue_name(settings: Settings) -> str:
    return f"{settings.queue.namespace}crmhub:queue"


def record_run(connector: str, state: str, seconds: float, counts: dict[str, int]) -> None:
    RUNS.labels(connector, state).inc()
    RUN_SECONDS.labels(connector).observe(seconds)
    RECORDS.labels(connector, "pulled").inc(counts.get("pulled", 0))
    RECORDS.labels(connector, "staged").inc(counts.get("new", 0) + counts.get("changed", 0))
    RECORDS.labels(connector, "merged").inc(counts.get("records_merged", 0))


class StoreCollector(Collector):
    """Run states and last successes from the store, queue depth from Redis, per scrape."""

    def __init__(self, settings: Settings, db: Engine) -> None:
        self.settings = settings
        self.db = db

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily(
            "crmhub_runs_by_state", "Sync runs recorded in the store, by state", labels=["state"]
        )
        last = GaugeMetricFamily(
            "crmhub_last_success_timestamp_seconds",
            "When each connector's latest successful run finished (Unix time)",
            labels=["connector"],
        )
        with self.db.connect() as conn:
            for state, count in conn.execute(
                select(sync_run.c.state, func.count()).group_by(sync_run.c.state)
            ):
                states.add_metric([state], count)
            for connector, finished in conn.execute(
                select(sync_run.c.connector, func.max(sync_run.c.finished_at))
                .where(sync_run.c.state == "succeeded")
                .group_by(sync_run.c.connector)
            ):
                if isinstance(finished, datetime):
                    last.add_metric([connector], finished.timestamp())
        yield states
        yield last
        up = GaugeMetricFamily("crmhub_queue_up", "1 if the job queue's Redis answered")
        depth = GaugeMetricFamily("crmhub_queue_depth", "Jobs waiting in the queue")
        try:
            client = redis.Redis.from_url(self.settings.queue.redis_url, socket_timeout=2)
            try:
                depth.add_metric([], float(client.zcard(queue_name(self.settings))))  # type: ignore[arg-type]
            finally:
                client.close()
            up.add_metric([], 1)
        except (redis.RedisError, OSError) as exc:
            log.warning("queue unreachable for metrics", extra={"error": type(exc).__name__})
            up.add_metric([], 0)
        yield up
        yield depth
