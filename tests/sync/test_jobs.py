"""Background jobs on the real Redis: queueing, run states, retry policy, leases, schedules."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq import Retry
from arq.connections import ArqRedis, create_pool
from sqlalchemy import Engine, func, select

from bench.synthetic import write_leads_csv
from crmhub.errors import ConfigError
from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.jobs import (
    enqueue_due_syncs,
    enqueue_sync,
    in_progress_key,
    job_key,
    redis_settings,
    retry_delay,
    sync_connector,
    worker_settings,
)
from sync.locks import Lease, LeaseLost, lease_key
from sync.metrics import queue_name
from sync.migrate import upgrade
from sync.schedule import due_connectors, schedules
from sync.store import make_engine, source_record, sync_run
from sync.worker import reconcile, run_worker
from tests.connectors.vendors import TOKEN, running
from tests.fakes.server import Fault
from tests.sync.worker_kit import REDIS_URL, free_port


def settings_for(
    tmp_path: Path, ns: str, connectors: dict[str, dict[str, Any]], **queue: Any
) -> Settings:
    settings = Settings(
        store={"url": f"sqlite:///{tmp_path / 'store.db'}"},  # type: ignore[arg-type]
        queue={"redis_url": REDIS_URL, "namespace": ns, "retry_backoff": 5, **queue},  # type: ignore[arg-type]
        connectors=connectors,
    )
    settings.source_path = tmp_path / "crmhub.toml"
    return settings


@pytest.fixture
async def redis(namespace: str, tmp_path: Path) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(redis_settings(settings_for(tmp_path, namespace, {}), retries=0))
    yield pool
    await pool.aclose()


def store(settings: Settings) -> Engine:
    db = make_engine(settings.store.url, settings.base_dir)
    upgrade(db)
    return db


def runs(db: Engine) -> list[Any]:
    with db.connect() as conn:
        return list(conn.execute(select(sync_run).order_by(sync_run.c.id)))


def leads(tmp_path: Path, rows: int = 40) -> dict[str, Any]:
    return {"type": "csv", "path": str(write_leads_csv(tmp_path / "leads.csv", rows))}


async def test_enqueued_run_goes_queued_then_succeeded_and_the_id_is_reusable(
    tmp_path: Path, namespace: str, redis: ArqRedis
) -> None:
    settings = settings_for(tmp_path, namespace, {"leads": leads(tmp_path)})
    db = store(settings)
    run_id = await enqueue_sync(redis, settings, db, "leads")
    assert run_id is not None
    # Same connector again while queued: refused, and no second row is left behind.
    assert await enqueue_sync(redis, settings, db, "leads") is None
    assert [(r.id, r.state) for r in runs(db)] == [(run_id, "queued")]
    assert await redis.zcard(queue_name(settings)) == 1

    await run_worker(settings, burst=True, handle_signals=False, poll_delay=0.05)

    [row] = runs(db)
    assert (row.id, row.state, row.error) == (run_id, "succeeded", None)
    assert row.counts["pulled"] == 40
    assert row.finished_at is not None
    # No result is kept, so the deterministic job id can be queued again at once (arq #430).
    assert not await redis.exists(job_key(settings, "leads"))
    assert await enqueue_sync(redis, settings, db, "leads") is not None


async def test_rate_limited_run_retries_no_sooner_than_retry_after(
    tmp_path: Path, namespace: str, redis: ArqRedis
) -> None:
    with running("hubspot") as vendor:
        vendor.state.add_people(30)
        # Longer than the HTTP layer waits itself: the error escapes the run to the job queue.
        vendor.state.faults.append(Fault(429, retry_after="300", path="contacts"))
        table = {**vendor.vendor.config(vendor.url, TOKEN), "rate_limit": 10_000}
        settings = settings_for(tmp_path, namespace, {"hs": table})
        db = store(settings)
        engine = SyncEngine(settings, db)
        run_id = await enqueue_sync(redis, settings, db, "hs")
        ctx = {"settings": settings, "db": db, "engine": engine, "redis": redis, "job_try": 1}
        with pytest.raises(Retry) as caught:
            await sync_connector(ctx, "hs", False, run_id)
        assert caught.value.defer_score is not None
        assert caught.value.defer_score >= 300_000
        [row] = runs(db)
        assert row.state == "retrying"
        assert "retry 1 in 300s" in row.error
        # The lease was released: the retry (or another worker) can take the connector.
        assert not await redis.exists(lease_key(namespace, "hs"))

        result = await sync_connector({**ctx, "job_try": 2}, "hs", False, run_id)
        assert result == {"connector": "hs", "run_id": run_id, "state": "succeeded"}
        [row] = runs(db)  # the same run row, not a new one per attempt
        assert (row.state, row.counts["pulled"]) == ("succeeded", 30)
        engine.close()


async def test_bad_credentials_fail_once_and_are_not_retried(
    tmp_path: Path, namespace: str, redis: ArqRedis
) -> None:
    with running("hubspot") as vendor:
        vendor.state.add_people(5)
        table = {**vendor.vendor.config(vendor.url, "wrong-token"), "rate_limit": 10_000}
        settings = settings_for(tmp_path, namespace, {"hs": table, "leads": leads(tmp_path)})
        db = store(settings)
        ids = [await enqueue_sync(redis, settings, db, n) for n in ("hs", "leads")]
        await run_worker(settings, burst=True, handle_signals=False, poll_delay=0.05)
    states = {r.connector: r for r in runs(db)}
    assert [r.id for r in runs(db)] == ids  # one row each: no retry rows
    assert states["hs"].state == "failed"
    assert "401" in states["hs"].error or "credential" in states["hs"].error.lower()
    assert "wrong-token" not in states["hs"].error
    assert states["leads"].state == "succeeded"  # the failing connector blocked nothing
    assert await redis.zcard(queue_name(settings)) == 0


async def test_last_try_of_a_transient_error_is_recorded_as_failed(
    tmp_path: Path, namespace: str, redis: ArqRedis
) -> None:
    with running("hubspot") as vendor:
        vendor.state.faults.append(Fault(429, retry_after="300", path="contacts"))
        table = {**vendor.vendor.config(vendor.url, TOKEN), "rate_limit": 10_000}
        settings = settings_for(tmp_path, namespace, {"hs": table}, max_tries=2)
        db = store(settings)
        engine = SyncEngine(settings, db)
        run_id = await enqueue_sync(redis, settings, db, "hs")
        ctx = {"settings": settings, "db": db, "engine": engine, "redis": redis, "job_try": 2}
        result = await sync_connector(ctx, "hs", False, run_id)
        engine.close()
    assert result["state"] == "failed"
    [row] = runs(db)
    assert row.state == "failed"
    assert "429" in row.error


async def test_config_error_is_recorded_not_retried(
    tmp_path: Path, namespace: str, redis: ArqRedis
) -> None:
    table = {"type": "csv", "path": "x.csv", "page_sise": 10}
    settings = settings_for(tmp_path, namespace, {"typo": table})
    db = store(settings)
    ctx = {"settings": settings, "db": db, "engine": SyncEngine(settings, db), "redis": redis}
    result = await sync_connector(ctx, "typo", False, None)
    [row] = runs(db)
    assert result["state"] == row.state == "failed"
    assert "connectors.typo.page_sise" in row.error


async def test_a_run_past_job_timeout_is_interrupted_and_resumed(
    tmp_path: Path, namespace: str, redis: ArqRedis
) -> None:
    """arq cancels a job after `[queue] job_timeout`: the run is `interrupted`, a queued row
    is left for it, and the reconciler queues it again; the next attempt finishes the work."""
    with running("activecampaign") as vendor:
        vendor.state.add_people(30)
        # The first page comes at once, the second hangs well past the job's timeout.
        vendor.state.faults += [Fault(path="contacts"), Fault(delay=20, path="contacts")]
        table = {**vendor.vendor.config(vendor.url, TOKEN), "rate_limit": 10_000, "page_size": 10}
        settings = settings_for(tmp_path, namespace, {"ac": table}, job_timeout=4, lease_seconds=1)
        db = store(settings)
        await enqueue_sync(redis, settings, db, "ac")
        await run_worker(settings, burst=True, handle_signals=False, poll_delay=0.05)
        first = runs(db)[0]
        assert first.state == "interrupted"
        assert (first.finished_at - first.started_at).total_seconds() < 15  # cut at 4 s
        # The worker's reconciler may already have queued it again; if not, a pass does.
        await asyncio.sleep(1.1)
        await reconcile(settings, db, redis)
        await run_worker(settings, burst=True, handle_signals=False, poll_delay=0.05)
    rows = runs(db)
    assert [r.state for r in rows] == ["interrupted", "succeeded"]
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(source_record)).scalar_one() == 30


def test_retry_delay_doubles_and_honours_retry_after(tmp_path: Path) -> None:
    from crmhub.errors import RateLimitedError, TransientError

    settings = settings_for(tmp_path, "", {}, retry_backoff=10)
    assert [retry_delay(settings, t, TransientError("x")) for t in (1, 2, 3)] == [10, 20, 40]
    assert retry_delay(settings, 1, RateLimitedError("slow", retry_after=90)) == 90
    assert retry_delay(settings, 1, RateLimitedError("slow", retry_after=None)) == 10


# -- leases --------------------------------------------------------------------------------
async def test_lease_is_exclusive_renewable_and_expires(redis: ArqRedis, namespace: str) -> None:
    key = lease_key(namespace, "c")
    a, b = Lease(redis, key, 0.5), Lease(redis, key, 0.5)
    assert await a.acquire()
    assert not await b.acquire()
    assert await a.holder() == a.owner
    await asyncio.sleep(0.3)
    assert await a.renew()
    await asyncio.sleep(0.3)  # 0.6 s after acquiring, alive thanks to the renewal
    assert not await b.acquire()
    await asyncio.sleep(0.6)  # not renewed: expired, as after a worker's death
    assert await b.acquire()
    assert not await a.renew()  # a never extends a lease it lost...
    await a.release()  # ...nor deletes it
    assert await b.holder() == b.owner


async def test_held_lease_is_renewed_and_a_stolen_one_stops_the_body(
    redis: ArqRedis, namespace: str
) -> None:
    key = lease_key(namespace, "c")
    lease = Lease(redis, key, 0.3)
    assert await lease.acquire()
    async with lease.held():
        await asyncio.sleep(0.8)  # well past the TTL: kept alive by renewals
        assert await lease.holder() == lease.owner
    assert not await redis.exists(key)  # released at the end

    assert await lease.acquire()

    async def stolen_midway() -> None:
        async with lease.held():
            await redis.set(key, "someone-else")
            await asyncio.sleep(2)

    with pytest.raises(LeaseLost):
        await stolen_midway()
    assert await redis.get(key) == b"someone-else"


async def test_a_locked_connector_is_deferred_not_run(
    tmp_path: Path, namespace: str, redis: ArqRedis
) -> None:
    settings = settings_for(tmp_path, namespace, {"leads": leads(tmp_path)}, lease_seconds=7)
    db = store(settings)
    other = Lease(redis, lease_key(namespace, "leads"), 30)
    assert await other.acquire()
    run_id = await enqueue_sync(redis, settings, db, "leads")
    ctx = {"settings": settings, "db": db, "engine": SyncEngine(settings, db), "redis": redis}
    with pytest.raises(Retry) as caught:
        await sync_connector({**ctx, "job_try": 1}, "leads", False, run_id)
    assert caught.value.defer_score == 7000
    assert [(r.id, r.state) for r in runs(db)] == [(run_id, "queued")]
    # Out of tries while still locked: not failed, left queued for the reconciler.
    result = await sync_connector({**ctx, "job_try": 5}, "leads", False, run_id)
    assert result["state"] == "queued"
    assert [(r.id, r.state) for r in runs(db)] == [(run_id, "queued")]


# -- schedules -------------------------------------------------------------------------------
def test_schedules_use_cron_semantics_and_reject_bad_expressions(tmp_path: Path) -> None:
    tables = {
        "quarter": {"type": "csv", "path": "a.csv", "schedule": "*/15 * * * *"},
        "weekday9": {"type": "csv", "path": "b.csv", "schedule": "0 9 * * 1-5"},
        "manual": {"type": "csv", "path": "c.csv"},
        "off": {"type": "csv", "path": "d.csv", "schedule": "* * * * *", "enabled": False},
    }
    settings = settings_for(tmp_path, "", tables)
    assert set(schedules(settings)) == {"quarter", "weekday9"}
    monday_9 = datetime(2026, 11, 23, 9, 0, 30, tzinfo=UTC)
    assert due_connectors(settings, monday_9) == ["quarter", "weekday9"]
    assert due_connectors(settings, monday_9.replace(minute=7)) == []
    assert due_connectors(settings, monday_9.replace(day=22)) == ["quarter"]  # a Sunday
    bad = settings_for(tmp_path, "", {"x": {"type": "csv", "path": "a", "schedule": "61 * * *"}})
    with pytest.raises(ConfigError, match=r"\[connectors\.x\] schedule"):
        schedules(bad)


async def test_cron_tick_queues_due_connectors_once(
    tmp_path: Path, namespace: str, redis: ArqRedis
) -> None:
    tables = {
        "hourly": {**leads(tmp_path), "schedule": "0 * * * *"},
        "daily": {**leads(tmp_path), "schedule": "30 6 * * *"},
    }
    settings = settings_for(tmp_path, namespace, tables)
    db = store(settings)
    ctx = {"settings": settings, "db": db, "redis": redis}
    tick = int(datetime(2026, 11, 24, 12, 0, tzinfo=UTC).timestamp() * 1000)
    assert await enqueue_due_syncs({**ctx, "score": tick}) == ["hourly"]
    # A second worker's tick for the same minute (arq #196) queues nothing more.
    assert await enqueue_due_syncs({**ctx, "score": tick}) == []
    assert [(r.connector, r.state) for r in runs(db)] == [("hourly", "queued")]


async def test_cron_ticks_of_two_installations_on_one_redis_do_not_collide(
    tmp_path: Path, namespace: str, redis: ArqRedis
) -> None:
    """arq ids a unique cron job `NAME:TIMESTAMP` in every queue alike; two installations
    (namespaces) on one Redis must each get their own tick, not one of them both."""
    from arq.worker import Worker

    tick = datetime(2031, 1, 1, 12, 0, tzinfo=UTC)  # in the future: the jobs wait, deferred
    queued = []
    for ns in (f"{namespace}a:", f"{namespace}b:"):
        settings = settings_for(tmp_path, ns, {})
        worker = Worker(**worker_settings(settings), redis_pool=redis, burst=True)
        await worker.run_cron(tick - timedelta(seconds=5), delay=0.5)  # plans the next tick
        await worker.run_cron(tick - timedelta(seconds=0.5), delay=0.5)  # queues it
        jobs = await redis.zrange(queue_name(settings), 0, -1)
        queued.append(sorted(j.decode() for j in jobs))
    ms = int(tick.timestamp() * 1000)
    assert queued == [
        [f"{namespace}a:enqueue_due_syncs:{ms}"],
        [f"{namespace}b:enqueue_due_syncs:{ms}"],
    ]


# -- reconciler ------------------------------------------------------------------------------
async def test_reconciler_requeues_runs_that_redis_lost_and_frees_dead_workers_jobs(
    tmp_path: Path, namespace: str, redis: ArqRedis
) -> None:
    settings = settings_for(
        tmp_path, namespace, {"a": leads(tmp_path), "b": leads(tmp_path)}, lease_seconds=1
    )
    db = store(settings)
    lost = await enqueue_sync(redis, settings, db, "a")
    # Redis forgets the job (restart without persistence); the store still says queued.
    await redis.delete(job_key(settings, "a"))
    await redis.zrem(queue_name(settings), f"{namespace}sync:a")
    # "b" was picked by a worker that died: arq's in-progress marker outlives it, no lease.
    await enqueue_sync(redis, settings, db, "b")
    in_progress_ms = int((settings.queue.job_timeout + 10) * 1000)
    await redis.psetex(in_progress_key(settings, "b"), in_progress_ms - 1000, b"1")
    await asyncio.sleep(1.1)  # older than one lease period

    # A job of "b" still running in this very process (say it lost its lease and is finishing
    # its last page) is alive whatever Redis says: not freed.
    assert await reconcile(settings, db, redis, busy={"b"}) == {"freed": [], "requeued": ["a"]}
    assert await redis.exists(job_key(settings, "a"))
    assert await redis.exists(in_progress_key(settings, "b"))
    assert await reconcile(settings, db, redis) == {"freed": ["b"], "requeued": []}
    assert not await redis.exists(in_progress_key(settings, "b"))
    # Idempotent: a second pass changes nothing.
    assert await reconcile(settings, db, redis) == {"freed": [], "requeued": []}

    await run_worker(settings, burst=True, handle_signals=False, poll_delay=0.05)
    assert sorted((r.connector, r.state) for r in runs(db)) == [
        ("a", "succeeded"),
        ("b", "succeeded"),
    ]
    assert runs(db)[0].id == lost


# -- CLI and metrics ---------------------------------------------------------------------------
def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMHUB_")}
    return subprocess.run(
        [sys.executable, "-m", "crmhub", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def _write_config(tmp_path: Path, namespace: str) -> Path:
    write_leads_csv(tmp_path / "leads.csv", 20)
    config = tmp_path / "crmhub.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "store.db"}"\n'
        f'[queue]\nredis_url = "{REDIS_URL}"\nnamespace = "{namespace}"\n'
        f'[connectors.leads]\ntype = "csv"\npath = "leads.csv"\nschedule = "*/5 * * * *"\n',
        encoding="utf-8",
    )
    return config


def test_cli_enqueue_runs_and_check(tmp_path: Path, namespace: str) -> None:
    config = _write_config(tmp_path, namespace)
    queued = _cli(config, "sync", "--enqueue", "--json")
    assert queued.returncode == 0, queued.stderr
    [item] = json.loads(queued.stdout)
    assert item["queued"]
    assert item["connector"] == "leads"
    again = _cli(config, "sync", "leads", "--enqueue")
    assert "already queued or running" in again.stdout
    listed = json.loads(_cli(config, "runs", "--json").stdout)
    assert [(r["id"], r["state"]) for r in listed] == [(item["run_id"], "queued")]

    check = _cli(config, "worker", "--check", "--json")
    assert check.returncode == 1  # no worker alive yet
    report = json.loads(check.stdout)
    assert report["redis_ok"]
    assert report["workers"] == {}
    assert report["queued"] == 1
    assert report["connectors"][0]["latest_state"] == "queued"

    port = free_port()
    command = [sys.executable, "-m", "crmhub", "--config", str(config), "worker"]
    worker = subprocess.Popen(
        [*command, "--metrics-port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("CRMHUB_")},
    )
    try:
        report = {}
        for _ in range(120):
            report = json.loads(_cli(config, "worker", "--check", "--json").stdout)
            if report["workers"] and report["connectors"][0]["last_success"]:
                break
        assert report["ok"]
        assert len(report["workers"]) == 1
        assert report["connectors"][0]["latest_state"] == "succeeded"
        # The worker's own counters, on its metrics port.
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert 'crmhub_sync_runs_total{connector="leads",state="succeeded"} 1.0' in text
        assert 'crmhub_sync_records_total{connector="leads",stage="pulled"} 20.0' in text
        assert 'crmhub_sync_records_total{connector="leads",stage="staged"} 20.0' in text
        assert 'crmhub_sync_run_seconds_count{connector="leads"} 1.0' in text
    finally:
        worker.terminate()
        assert worker.wait(timeout=30) == 0


async def test_metrics_endpoint_reports_runs_and_queue(
    tmp_path: Path, namespace: str, redis: ArqRedis
) -> None:
    from crmhub.web.app import create_app

    settings = settings_for(tmp_path, namespace, {"leads": leads(tmp_path)})
    db = store(settings)
    await run_worker_once(settings, db, redis)
    await enqueue_sync(redis, settings, db, "leads")  # one waiting in the queue
    app = create_app(settings, db)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        response = await c.get("/metrics")
    assert response.status_code == 200
    text = response.text
    assert 'crmhub_runs_by_state{state="succeeded"} 1.0' in text
    assert 'crmhub_runs_by_state{state="queued"} 1.0' in text
    assert 'crmhub_last_success_timestamp_seconds{connector="leads"}' in text
    assert "crmhub_queue_up 1.0" in text
    assert "crmhub_queue_depth 1.0" in text
    assert 'crmhub_sync_records_total{connector="leads",stage="pulled"}' in text


async def run_worker_once(settings: Settings, db: Engine, redis: ArqRedis) -> None:
    await enqueue_sync(redis, settings, db, "leads")
    await run_worker(settings, burst=True, handle_signals=False, poll_delay=0.05)


@pytest.mark.postgres
def test_database_conflicts_and_dropped_connections_count_as_transient(pg_url: str) -> None:
    import psycopg
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from sync.jobs import is_transient_db_error
    from tests.conftest import PG_ADMIN_URL

    db = make_engine(pg_url)

    def error_of(sql: str) -> DBAPIError:
        with db.connect() as conn, pytest.raises(DBAPIError) as caught:
            conn.execute(text(sql))
        return caught.value

    raise_as = "DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '{}'; END $$"
    assert is_transient_db_error(error_of(raise_as.format("deadlock_detected")))
    assert is_transient_db_error(error_of(raise_as.format("serialization_failure")))
    assert not is_transient_db_error(error_of(raise_as.format("unique_violation")))
    assert not is_transient_db_error(error_of("SELECT no_such_column FROM sync_run"))
    # The backend terminated under a live connection (failover, pg_terminate_backend).
    with db.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(DBAPIError) as caught:
            conn.execute(text("SELECT 1"))
    assert is_transient_db_error(caught.value)
    db.dispose()


@pytest.mark.postgres
async def test_overlapping_runs_of_one_connector_wait_for_each_others_pages(
    tmp_path: Path, pg_url: str
) -> None:
    """A worker that lost its lease may still commit a page while the next holder writes the
    same one: the page transactions of one connector take turns (`locks.fence`), the later
    one finds the records staged, and neither run fails on a duplicate."""
    settings = settings_for(tmp_path, "", {"leads": {**leads(tmp_path, 600), "page_size": 100}})
    settings.store.url = pg_url
    db = make_engine(pg_url)
    first, second = SyncEngine(settings, db), SyncEngine(settings, db)
    try:
        results = await asyncio.gather(first.run("leads"), second.run("leads"))
    finally:
        first.close()
        second.close()
    assert [r.state for r in results] == ["succeeded", "succeeded"]
    assert sum(r.counts.new for r in results) == 600  # each record staged by one run only
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(source_record)).scalar_one() == 600
    db.dispose()
