"""`GET /metrics`: Prometheus text format.

Store and queue gauges (run states, each connector's last success, queue depth) are read at
scrape time, so any `crmhub serve` replica answers the same; this process's own counters
(runs it executed) follow. Workers export their counters with `crmhub worker --metrics-port`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool

from sync.metrics import StoreCollector

__all__ = ["router"]

router = APIRouter(tags=["ops"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics: sync runs, last successes, queue depth, records processed."""

    def render() -> bytes:
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(StoreCollector(request.app.state.settings, request.app.state.db))
        return generate_latest(scrape) + generate_latest(REGISTRY)

    return Response(await run_in_threadpool(render), media_type=CONTENT_TYPE_LATEST)
