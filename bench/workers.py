"""`python -m bench.workers --connectors 20 --rows 300 --workers 1 --workers 2`: queue throughput.

Queues one run for each of N CSV connectors (distinct files, so every run stages its rows) on
a fresh PostgreSQL database, starts W `crmhub worker` processes and times until every run has
succeeded. Reports runs/min and records/s per worker count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import redis
from arq.connections import create_pool
from sqlalchemy import func, select

from bench.synthetic import write_leads_csv
from crmhub.settings import load_settings
from sync.jobs import enqueue_sync, redis_settings
from sync.migrate import upgrade
from sync.store import make_engine, sync_run

PG_ADMIN = os.environ.get("CRMHUB_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CRMHUB_BENCH_REDIS", "redis://127.0.0.1:6379/0")


def _measure(folder: Path, connectors: int, rows: int, workers: int) -> dict[str, float]:
    db_name = f"crmhub_bench_{uuid.uuid4().hex[:8]}"
    ns = f"bench-{uuid.uuid4().hex[:8]}:"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db_name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/"
    url += db_name
    lines = [
        f'[store]\nurl = "{url}"',
        f'[queue]\nredis_url = "{REDIS_URL}"\nnamespace = "{ns}"\nmax_jobs = 4',
    ]
    for i in range(connectors):
        path = write_leads_csv(folder / f"c{i}.csv", rows, seed=i)
        lines.append(f'[connectors.c{i}]\ntype = "csv"\npath = "{path}"')
    config = folder / f"bench-{workers}.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = load_settings(config)
    db = make_engine(url)
    upgrade(db)
    procs: list[subprocess.Popen[bytes]] = []
    try:

        async def queue_all() -> None:
            pool = await create_pool(redis_settings(settings, retries=0))
            for name in settings.connectors:
                await enqueue_sync(pool, settings, db, name)
            await pool.aclose()

        asyncio.run(queue_all())
        started = time.perf_counter()
        for _ in range(workers):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "crmhub", "--config", str(config), "worker"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        while True:
            with db.connect() as conn:
                done = conn.execute(
                    select(func.count()).where(sync_run.c.state == "succeeded")
                ).scalar_one()
            if done >= connectors:
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - started  # includes worker start-up
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=60)
        db.dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        client = redis.Redis.from_url(REDIS_URL)
        for key in [*client.scan_iter(match=f"{ns}*"), *client.scan_iter(match=f"arq:*{ns}*")]:
            client.delete(key)
        client.close()
    return {
        "seconds": seconds,
        "runs_per_min": connectors / seconds * 60,
        "records_per_s": connectors * rows / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connectors", type=int, default=20)
    parser.add_argument("--rows", type=int, default=300, help="rows per connector")
    parser.add_argument("--workers", type=int, action="append", help="repeatable")
    args = parser.parse_args()
    print(f"{args.connectors} connectors x {args.rows} rows, PostgreSQL, max_jobs=4 per worker")
    print("| workers | seconds | runs/min | records/s |\n|---|---|---|---|")
    for workers in args.workers or [1, 2]:
        with tempfile.TemporaryDirectory() as tmp:
            r = _measure(Path(tmp), args.connectors, args.rows, workers)
        print(
            f"| {workers} | {r['seconds']:.1f} | {r['runs_per_min']:.1f} | "
            f"{r['records_per_s']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
