"""Worker faults on the real Redis and PostgreSQL: SIGKILL, SIGTERM, two workers, Redis restart.

Workers are real `crmhub worker` processes; the test process only queues runs and watches the
store. Each test has its own Redis key prefix and PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from arq.connections import ArqRedis, create_pool
from sqlalchemy import Engine, select, text

from bench.synthetic import write_leads_csv
from crmhub.settings import load_settings
from sync.engine import SyncEngine
from sync.jobs import JOB_SYNC, enqueue_sync, redis_settings
from sync.locks import lease_key
from sync.metrics import queue_name
from sync.store import make_engine, sync_run
from tests.conftest import PG_ADMIN_URL, _pg_url, service_missing
from tests.sync.test_jobs import REDIS_URL

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

ROWS = 2000
PAGE = 50


@pytest.fixture
def reference_pg_url(pg_template: str) -> Iterator[str]:
    """A second database, for the uninterrupted run to compare with."""
    name = f"crmhub_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield _pg_url(name)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Workers:
    """`crmhub worker` processes for one config; all stopped at the end of the test."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRMHUB_")}
        with (self.config.parent / f"worker-{len(self.procs)}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "crmhub", "-v", "--config", str(self.config), "worker"],
                env=env,
                stdout=log,
                stderr=log,
            )
        self.procs.append(proc)
        return proc

    def by_pid(self, pid: int) -> subprocess.Popen[bytes]:
        return next(p for p in self.procs if p.pid == pid)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(
            f.read_text(errors="replace")[-3000:]
            for f in sorted(self.config.parent.glob("worker-*.log"))
        )


def write_config(
    folder: Path, store_url: str, namespace: str, redis_url: str, **extra: Any
) -> Path:
    csv_path = folder / "leads.csv"
    if not csv_path.exists():
        write_leads_csv(csv_path, ROWS)
    queue = {"lease_seconds": 2, "job_timeout": 120, "max_jobs": 2, **extra}
    lines = [
        f'[store]\nurl = "{store_url}"',
        f'[queue]\nredis_url = "{redis_url}"\nnamespace = "{namespace}"',
        *(f"{k} = {v}" for k, v in queue.items()),
        f'[connectors.leads]\ntype = "csv"\npath = "{csv_path}"\npage_size = {PAGE}',
    ]
    config = folder / "crmhub.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


@pytest.fixture
def namespace() -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=3)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        service_missing("Redis", exc)
    ns = f"test-{uuid.uuid4().hex[:10]}:"
    yield ns
    for pattern in (f"{ns}*", f"arq:*{ns}*"):
        for key in client.scan_iter(match=pattern):
            client.delete(key)
    client.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[Path], Workers]]:
    made: list[Workers] = []

    def make(config: Path) -> Workers:
        made.append(Workers(config))
        return made[-1]

    yield make
    for w in made:
        w.stop_all()


@pytest.fixture
async def queue(namespace: str) -> AsyncIterator[ArqRedis]:
    settings = load_settings_for(REDIS_URL, namespace)
    pool = await create_pool(redis_settings(settings, retries=0))
    yield pool
    await pool.aclose()


def load_settings_for(redis_url: str, namespace: str) -> Any:
    from crmhub.settings import Settings

    return Settings(queue={"redis_url": redis_url, "namespace": namespace})  # type: ignore[arg-type]


def staged(db: Engine) -> int:
    with db.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM source_record")).scalar_one())


def run_rows(db: Engine) -> list[Any]:
    with db.connect() as conn:
        return list(conn.execute(select(sync_run).order_by(sync_run.c.id)))


def snapshot(db: Engine) -> dict[str, list[Any]]:
    """Everything a sync writes, without surrogate ids.

    PostgreSQL does not hand back sequence values of a transaction that died with its worker,
    so ids differ from an uninterrupted run; what they point at must not.
    """
    with db.connect() as conn:
        q = conn.execute
        ext = {
            rid: f"{source}/{external_id}"
            for rid, source, external_id in q(
                text("SELECT id, source, external_id FROM source_record")
            )
        }
        members: dict[int, list[tuple[str, str]]] = {}
        for rid, gid, method in q(text("SELECT record_id, golden_id, method FROM membership")):
            members.setdefault(gid, []).append((ext[rid], method))
        goldens = sorted(
            (
                tuple(sorted(members[gid])),
                json.dumps(fields, sort_keys=True),
                json.dumps({k: ext[v] for k, v in (lineage or {}).items()}, sort_keys=True),
            )
            for gid, fields, lineage in q(
                text("SELECT id, fields, lineage FROM golden_record WHERE merged_into IS NULL")
            )
            if gid in members
        )
        return {
            "records": sorted(
                q(
                    text(
                        "SELECT source, kind, external_id, content_hash, data::text "
                        "FROM source_record"
                    )
                ).all()
            ),
            "goldens": goldens,
            "keys": sorted(
                (ext[rid], kind, value)
                for rid, kind, value in q(
                    text("SELECT record_id, key_kind, key_value FROM match_key")
                )
            ),
            "letters": sorted(
                q(text("SELECT source, scope, origin, field, reason FROM dead_letter")).all()
            ),
            "cursor": sorted(
                q(text("SELECT connector, stream, cursor::text FROM connector_state")).all()
            ),
        }


async def wait_for(
    what: str, check: Callable[[], Any], seconds: float, workers: Workers | None = None
) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.1)
    logs = workers.logs() if workers else ""
    raise AssertionError(f"timed out after {seconds}s waiting for {what}\n{logs}")


async def reference(tmp_path: Path, url: str) -> dict[str, list[Any]]:
    config = write_config(tmp_path, url, "unused:", REDIS_URL)
    settings = load_settings(config)
    db = make_engine(url)
    engine = SyncEngine(settings, db)
    await engine.run("leads")
    engine.close()
    snap = snapshot(db)
    db.dispose()
    return snap


async def test_sigkilled_worker_is_taken_over_after_the_lease_expires(
    tmp_path: Path,
    pg_url: str,
    reference_pg_url: str,
    namespace: str,
    queue: ArqRedis,
    workers: Callable[[Path], Workers],
) -> None:
    config = write_config(tmp_path, pg_url, namespace, REDIS_URL)
    settings = load_settings(config)
    db = make_engine(pg_url)
    pool = workers(config)
    pool.start()
    pool.start()
    await enqueue_sync(queue, settings, db, "leads")
    await wait_for("a quarter of the rows", lambda: staged(db) >= ROWS // 4, 120, pool)
    holder = (await queue.get(lease_key(namespace, "leads"))).decode()
    victim = pool.by_pid(int(holder.split(":")[1]))
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    killed_at = time.monotonic()
    at_kill = staged(db)
    assert at_kill < ROWS, "the run finished before the kill; make it longer"

    rows = await wait_for(
        "the survivor to finish",
        lambda: (r := run_rows(db)) and r[-1].state == "succeeded" and r,
        120,
        pool,
    )
    takeover = time.monotonic() - killed_at
    # The dead worker's run shows as interrupted; the survivor resumed from its last page.
    assert [r.state for r in rows] == ["interrupted", "succeeded"]
    assert rows[1].counts["pulled"] <= ROWS - at_kill + PAGE
    # Recovery waited for the 2 s lease, not arq's in-progress TTL (job_timeout + 10 = 130 s).
    assert takeover < 60
    assert snapshot(db) == await reference(tmp_path, reference_pg_url)
    db.dispose()
    print(f"takeover after SIGKILL: {takeover:.1f}s (staged at kill: {at_kill}/{ROWS})")


async def test_sigterm_commits_the_current_page_and_leaves_the_run_to_resume(
    tmp_path: Path,
    pg_url: str,
    reference_pg_url: str,
    namespace: str,
    queue: ArqRedis,
    workers: Callable[[Path], Workers],
) -> None:
    config = write_config(tmp_path, pg_url, namespace, REDIS_URL)
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
        120,
        pool,
    )
    assert [r.state for r in rows] == ["interrupted", "succeeded"]
    assert rows[1].counts["pulled"] == ROWS - at_stop  # resumed exactly after the last page
    assert snapshot(db) == await reference(tmp_path, reference_pg_url)
    db.dispose()


async def test_two_workers_never_run_one_connector_at_once(
    tmp_path: Path,
    pg_url: str,
    namespace: str,
    queue: ArqRedis,
    workers: Callable[[Path], Workers],
) -> None:
    config = write_config(tmp_path, pg_url, namespace, REDIS_URL, max_jobs=4)
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

    def settled() -> bool:
        rows = run_rows(db)
        return bool(rows) and all(r.state == "succeeded" for r in rows)

    # Requests refused by the lock stay queued and are run later: every run ends succeeded.
    await wait_for("every run to end", settled, 180, pool)
    rows = [r for r in run_rows(db) if r.state == "succeeded"]
    assert refused > 0  # some requests found a run already queued or running
    assert len(rows) >= 2
    spans = sorted((r.started_at, r.finished_at) for r in rows)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, f"two runs of one connector overlapped: {spans}"
    assert staged(db) == ROWS
    db.dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server without persistence, so a restart loses every key."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
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
        config = write_config(tmp_path, pg_url, "", server.url, max_jobs=1)
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

        await wait_for("every queued run after the restart", done, 120, pool)
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
