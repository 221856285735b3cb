"""`process = "worker"`: `crmhub serve` accepts and queues one arq job; a real `crmhub worker`
maps and matches. Redis is only the doorbell: a delivery accepted while it is down is found
by the worker's cron tick."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import redis

from crmhub.settings import Settings, load_settings
from crmhub.web import create_app
from sync.intake_jobs import drain_inbox, drain_job_id
from sync.store import make_engine
from tests.sync.worker_kit import REDIS_URL, Workers
from tests.web.conftest import (
    SECRET,
    activities,
    golden_of,
    inbox_rows,
    live,
    records,
    signed,
    wait_until,
)


def _config(tmp_path: Path, store_url: str, redis_url: str, namespace: str) -> Path:
    path = tmp_path / "crmhub.toml"
    path.write_text(
        f'[store]\nurl = "{store_url}"\n'
        f'[queue]\nredis_url = "{redis_url}"\nnamespace = "{namespace}"\n'
        "[connectors.generic]\n"
        f'type = "webform"\nsecret = "{SECRET}"\nprocess = "worker"\n'
    )
    return path


def _post(url: str, n: int) -> list[str]:
    statuses = []
    for i in range(n):
        body = json.dumps(
            {"submission_id": f"w-{i}", "fields": {"name": f"Wu {i} Lee", "email": f"w{i}@x.ex"}}
        ).encode()
        response = httpx.post(
            f"{url}/hooks/forms/generic", content=body, headers=signed("generic", body)
        )
        assert response.status_code == 200, response.text
        statuses.append(response.json()["status"])
    return statuses


def test_serve_queues_one_job_and_a_worker_processes(tmp_path, store_url, db, namespace):
    config = _config(tmp_path, store_url, REDIS_URL, namespace)
    settings = load_settings(str(config))
    queue = redis.Redis.from_url(REDIS_URL)
    with live(create_app(settings, db)) as server:
        assert _post(server.url, 20) == ["accepted"] * 20
        job = f"arq:job:{drain_job_id(settings)}"
        wait_until(lambda: bool(queue.exists(job)))
    # Twenty deliveries, one queued job; nothing processed by the web process.
    assert queue.zcard(f"{namespace}crmhub:queue") == 1
    assert {r["status"] for r in inbox_rows(db)} == {"pending"}
    assert activities(db, "generic") == []
    workers = Workers(config)
    try:
        workers.start()
        wait_until(lambda: {r["status"] for r in inbox_rows(db)} == {"done"}, timeout=60)
    finally:
        workers.stop_all()
    assert len(activities(db, "generic")) == 20
    contacts = records(db, "generic", "contact")
    assert len(contacts) == 20
    assert all(golden_of(db, c["id"]) is not None for c in contacts)
    assert all(r["attempts"] == 1 for r in inbox_rows(db))


async def test_a_delivery_accepted_with_redis_down_is_drained_by_the_tick(tmp_path, store_url, db):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = _config(tmp_path, store_url, f"redis://127.0.0.1:{port}/0", "down:")
    settings: Settings = load_settings(str(config))
    with live(create_app(settings, db)) as server:
        assert _post(server.url, 1) == ["accepted"]  # the 2xx does not wait for Redis
    assert [r["status"] for r in inbox_rows(db)] == ["pending"]
    # What the worker's cron tick runs (its arq context: settings and the store).
    worker_db = make_engine(store_url)
    try:
        report = await drain_inbox({"settings": settings, "db": worker_db})
    finally:
        worker_db.dispose()
    assert report["processed"] == 1
    assert [r["status"] for r in inbox_rows(db)] == ["done"]
    assert len(activities(db, "generic")) == 1
