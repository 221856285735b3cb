"""Worker faults on the real Redis and PostgreSQL: SIGKILL, SIGTERM, two workers, Redis restart.

Workers are real `crmhub worker` processes; the test process only queues runs and watches the
store. Each test has its own Redis key prefix and PostgreSQL database. "The final store equals
an uninterrupted run" is checked against a canonical dump (`worker_kit.store_dump`) of a
reference run on SQLite, which dumps the same as PostgreSQL (asserted below) at half the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import itertools
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from arq.connections import ArqRedis, create_pool
from sqlalchemy import Engine

from bench.synthetic import write_leads_csv
from crmhub.settings import Settings, load_settings
from sync.engine import SyncEngine
from sync.jobs import JOB_SYNC, enqueue_sync, redis_settings
from sync.locks import lease_key
from sync.metrics import queue_name
from sync.store import make_engine
from tests.conftest import service_missing
from tests.sync.worker_kit import (
    REDIS_URL,
    Dump,
    Workers,
    assert_same_store,
    free_port,
    reference_dump,
    run_rows,
    staged,
    store_dump,
    wait_for,
    write_config,
)

# Generous limits: on a loaded 2-core CI machine one run of 2,000 rows can take a minute.
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.timeout(400),
]

ROWS = 2000
PAGE = 50
# The SIGKILL fault: a 100k-record run, in the CSV connector's default 2,000-row pages.
BIG_ROWS = 100_000
BIG_PAGE = 2000
LEASE = 10


async def test_store_dump_is_the_same_on_sqlite_and_postgresql(tmp_path: Path, pg_url: str) -> None:
    """What lets the other tests take their reference run on the faster SQLite (the
    probabilistic matcher here; the 100k test compares the exact one across back ends)."""
    config = write_config(tmp_path, pg_url, "unused:", REDIS_URL, rows=ROWS // 2, page=PAGE)
    db = make_engine(pg_url)
    engine = SyncEngine(load_settings(config), db)
    await engine.run("leads")
    engine.close()
    reference, _ = await reference_dump(config, tmp_path)
    assert staged(db) == ROWS // 2
    assert_same_store(store_dump(db), reference)
    db.dispose()


@pytest.mark.timeout(1200)
async def test_sigkilled_worker_is_taken_over_after_the_lease_expires_at_100k(
    tmp_path: Path,
    pg_url: str,
    namespace: str,
    queue: ArqRedis,
    workers: Callable[[Path], Workers],
) -> None:
    # A 10 s lease: 2,000-row pages on a loaded 2-core machine starve the event loop for up
    # to 3 s at times, and a 2 s lease would then be lost (and taken over) without any kill.
    config = write_config(
        tmp_path,
        pg_url,
        namespace,
        REDIS_URL,
        rows=BIG_ROWS,
        page=BIG_PAGE,
        matching="exact",
        lease_seconds=LEASE,
    )
    settings = load_settings(config)
    db = make_engine(pg_url)
    # The uninterrupted reference run goes on in this process meanwhile (it mostly waits).
    reference = asyncio.create_task(reference_dump(config, tmp_path))
    try:
        await _kill_mid_run_and_compare(config, settings, db, namespace, queue, workers, reference)
    finally:
        if not reference.done():
            reference.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reference
        db.dispose()


async def _kill_mid_run_and_compare(
    config: Path,
    settings: Settings,
    db: Engine,
    namespace: str,
    queue: ArqRedis,
    workers: Callable[[Path], Workers],
    reference: asyncio.Task[tuple[Dump, float]],
) -> None:
    pool = workers(config)
    pool.start()
    pool.start()
    started = time.monotonic()
    await enqueue_sync(queue, settings, db, "leads")
    await wait_for("a quarter of the rows", lambda: staged(db) >= BIG_ROWS // 4, 600, pool)
    holder = (await queue.get(lease_key(namespace, "leads"))).decode()
    victim = pool.by_pid(int(holder.split(":")[1]))
    ttl_ms = await queue.pttl(lease_key(namespace, "leads"))  # renewed every LEASE / 3
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    killed_at = time.monotonic()
    at_kill = staged(db)
    assert at_kill < BIG_ROWS, "the run finished before the kill; make it longer"
    assert at_kill % BIG_PAGE == 0  # whole pages only: the page being written died with it

    async def survivor_holds_the_lease() -> bool:
        value = await queue.get(lease_key(namespace, "leads"))
        return value is not None and value.decode() != holder

    while not await survivor_holds_the_lease():
        assert time.monotonic() - killed_at < 120, pool.logs()
        await asyncio.sleep(0.1)
    takeover = time.monotonic() - killed_at
    rows = await wait_for(
        "the survivor to finish",
        lambda: (r := run_rows(db)) and r[-1].state == "succeeded" and r,
        900,
        pool,
    )
    interrupted_run = time.monotonic() - started
    # The dead worker's run shows as interrupted; the survivor resumed from its last page.
    assert [r.state for r in rows] == ["interrupted", "succeeded"]
    assert rows[1].counts["pulled"] <= BIG_ROWS - at_kill + BIG_PAGE
    # Taken over once the lease expired (the reconciler frees the dead worker's job), not after
    # arq's in-progress TTL (job_timeout + 10 = 610 s).
    assert ttl_ms / 1000 - 0.5 <= takeover < LEASE + 60
    t = time.monotonic()
    got = store_dump(db)
    dump_seconds = time.monotonic() - t
    t = time.monotonic()
    want, reference_seconds = await reference
    waited = time.monotonic() - t
    assert staged(db) == BIG_ROWS
    assert_same_store(got, want)
    print(
        f"\n100k SIGKILL: staged at kill {at_kill} after {killed_at - started:.1f}s, takeover "
        f"{takeover:.1f}s, interrupted run {interrupted_run:.1f}s, dump {dump_seconds:.1f}s, "
        f"reference run + dump {reference_seconds:.1f}s (alongside; {waited:.1f}s waited after)"
    )


async def test_sigterm_commits_the_current_page_and_leaves_the_run_to_resume(
    tmp_path: Path,
    pg_url: str,
    namespace: str,
    queue: ArqRedis,
    workers: Callable[[Path], Workers],
) -> None:
    config = write_config(tmp_path, pg_url, namespace, REDIS_URL, rows=ROWS, page=PAGE)
    settings = load_settings(config)
    db = make_engine(pg_url)
    pool = workers(config)
    first = pool.start()
    await enqueue_sync(queue, settings, db, "leads")
    await wait_for("some pages", lambda: staged(db) >= ROWS // 4, 120, pool)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    at_stop = staged(db)
    assert 0 < at_stop < ROWS
    assert at_stop % PAGE == 0  # whole pages only: the page under way committed, nothing half
    rows = run_rows(db)
    assert [r.state for r in rows] == ["interrupted", "queued"]
    assert not await queue.exists(lease_key(namespace, "leads"))  # released on the way out

    pool.start()
    rows = await wait_for(
        "the resumed run",
        lambda: (r := run_rows(db)) and r[-1].state == "succeeded" and r,
        300,
        pool,
    )
    assert [r.state for r in rows] == ["interrupted", "succeeded"]
    assert rows[1].counts["pulled"] == ROWS - at_stop  # resumed exactly after the last page
    # The workers' logs (-v) say what ran, with ids and counts; never who was in the file.
    logs = pool.logs(whole=True)
    assert "sync finished" in logs
    with (tmp_path / "leads.csv").open(encoding="utf-8") as fh:
        people = list(csv.DictReader(fh))
    leaked = [v for p in people for v in (p["email"], p["phone"]) if v and v in logs]
    assert leaked == []
    assert_same_store(store_dump(db), (await reference_dump(config, tmp_path))[0])
    db.dispose()


async def test_two_workers_never_run_one_connector_at_once(
    tmp_path: Path,
    pg_url: str,
    namespace: str,
    queue: ArqRedis,
    workers: Callable[[Path], Workers],
) -> None:
    config = write_config(tmp_path, pg_url, namespace, REDIS_URL, rows=ROWS, page=PAGE, max_jobs=4)
    settings = load_settings(config)
    db = make_engine(pg_url)
    pool = workers(config)
    pool.start()
    pool.start()
    # Requests keep arriving while a run is going: the normal path (deterministic job id)
    # plus duplicate jobs under other ids, as a double-fired cron would queue (arq #196).
    refused = 0
    for i in range(20):
        if await enqueue_sync(queue, settings, db, "leads") is None:
            refused += 1
        if i % 5 == 0:
            await queue.enqueue_job(
                JOB_SYNC,
                "leads",
                False,
                None,
                _job_id=f"{namespace}dup:{i}",
                _queue_name=queue_name(settings),
            )
        await asyncio.sleep(0.25)

    async def settled() -> bool:
        # A job the lease refused waits in the queue (deferred) with no run row of its own
        # while it shares the row it claimed: the queue must hold no sync job either.
        jobs = await queue.zrange(queue_name(settings), 0, -1)
        ours = (namespace + "sync:", namespace + "dup:")
        rows = run_rows(db)
        return (
            not any(j.decode().startswith(ours) for j in jobs)
            and bool(rows)
            and all(r.state == "succeeded" for r in rows)
        )

    # Requests refused by the lock stay queued and are run later: every run ends succeeded.
    await wait_for("every run to end", settled, 300, pool)
    rows = [r for r in run_rows(db) if r.state == "succeeded"]
    assert refused > 0  # some requests found a run already queued or running
    assert len(rows) >= 2
    spans = sorted((r.started_at, r.finished_at) for r in rows)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, f"two runs of one connector overlapped: {spans}"
    assert staged(db) == ROWS
    db.dispose()


class RedisServer:
    """A private redis-server without persistence, so a restart loses every key."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)


async def test_redis_restart_loses_no_queued_run_and_doubles_none(
    tmp_path: Path,
    pg_url: str,
    workers: Callable[[Path], Workers],
) -> None:
    if shutil.which("redis-server") is None:
        service_missing("redis-server binary", "not on PATH")
    server = RedisServer(tmp_path)
    server.start()
    try:
        write_leads_csv(tmp_path / "small.csv", 30)
        config = write_config(tmp_path, pg_url, "", server.url, rows=ROWS, page=PAGE, max_jobs=1)
        with config.open("a", encoding="utf-8") as fh:
            for name in ("a", "b"):
                fh.write(f'[connectors.{name}]\ntype = "csv"\npath = "{tmp_path / "small.csv"}"\n')
        settings = load_settings(config)
        db = make_engine(pg_url)
        pool = workers(config)
        pool.start()
        redis = await create_pool(redis_settings(settings, retries=0))
        for name in ("leads", "a", "b"):
            assert await enqueue_sync(redis, settings, db, name) is not None
        await redis.aclose()
        # One worker slot: "leads" runs, "a" and "b" wait in the queue. Then Redis dies empty.
        await wait_for("the slow run to start", lambda: staged(db) >= PAGE, 120, pool)
        server.kill()
        await asyncio.sleep(1)
        server.start()

        def done() -> bool:
            latest = {r.connector: r.state for r in run_rows(db)}
            return latest == {"leads": "succeeded", "a": "succeeded", "b": "succeeded"}

        await wait_for("every queued run after the restart", done, 300, pool)
        rows = run_rows(db)
        ran = [(r.connector, r.state) for r in rows]
        # Each queued run happened exactly once; the run cut off by the restart resumed.
        assert ran.count(("a", "succeeded")) == 1
        assert ran.count(("b", "succeeded")) == 1
        assert ran.count(("leads", "succeeded")) == 1
        assert all(state in ("succeeded", "interrupted") for _, state in ran)
        assert staged(db) == ROWS + 60  # a and b read one file, staged once per source
        db.dispose()
    finally:
        if server.proc and server.proc.poll() is None:
            server.kill()
