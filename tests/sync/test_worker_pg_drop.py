"""PostgreSQL drops a worker's connection in the middle of a page (real `crmhub worker`).

The backend is terminated with `pg_terminate_backend` from another connection, as a failover or
an administrator would: the page's transaction rolls back whole, the job retries within seconds
and resumes from the last committed page, and the store ends as after an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from arq.connections import ArqRedis
from sqlalchemy import func, select

from crmhub.settings import load_settings
from sync.jobs import enqueue_sync
from sync.store import make_engine, membership, source_record
from tests.conftest import PG_ADMIN_URL
from tests.sync.worker_kit import (
    REDIS_URL,
    Workers,
    assert_same_store,
    reference_dump,
    run_rows,
    staged,
    store_dump,
    wait_for,
    write_config,
)

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.timeout(400),
]

ROWS = 2000
PAGE = 50

# The page writer, caught where it cannot commit: the test holds the connector's cursor row
# (`FOR UPDATE`), so a page's transaction, having written its records, waits at its checkpoint.
# Killing a backend seen in its transaction a moment earlier could land just after its commit
# (a CI run where the dead pooled connection was simply replaced and the run pulled all).
_HOLD_CURSOR = "SELECT 1 FROM connector_state WHERE connector = %s FOR UPDATE"
_WAITING_ON_US = """
SELECT pid FROM pg_stat_activity
WHERE datname = %s AND backend_xid IS NOT NULL AND %s = ANY(pg_blocking_pids(pid))
LIMIT 1
"""


async def terminate_page_writer(database: str) -> int:
    """Terminate a worker's backend in the middle of a page's transaction; its pid."""
    with psycopg.connect(PG_ADMIN_URL, dbname=database) as holder:
        assert holder.execute(_HOLD_CURSOR, ["leads"]).fetchall(), "no cursor committed yet"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            deadline = time.monotonic() + 60
            while (
                row := admin.execute(_WAITING_ON_US, [database, holder.info.backend_pid]).fetchone()
            ) is None:
                assert time.monotonic() < deadline, "no page waited at its checkpoint in 60 s"
                await asyncio.sleep(0.01)
            killed = admin.execute("SELECT pg_terminate_backend(%s)", [row[0]]).fetchone()
            assert killed is not None
            assert killed[0], f"backend {row[0]} not terminated"
        holder.rollback()
    return int(row[0])


async def test_dropped_connection_mid_page_retries_the_page_and_loses_nothing(
    tmp_path: Path,
    pg_url: str,
    namespace: str,
    queue: ArqRedis,
    workers: Callable[[Path], Workers],
) -> None:
    config = write_config(tmp_path, pg_url, namespace, REDIS_URL, rows=ROWS, page=PAGE, max_tries=3)
    settings = load_settings(config)
    db = make_engine(pg_url)
    pool = workers(config)
    pool.start()
    run_id = await enqueue_sync(queue, settings, db, "leads")
    await wait_for("a quarter of the rows", lambda: staged(db) >= ROWS // 4, 120, pool)

    killed = await terminate_page_writer(pg_url.rsplit("/", 1)[1])
    # Taken at once, in one snapshot: the retry waits at least half a second.
    with db.connect() as conn:
        at_kill, merged = conn.execute(
            select(
                select(func.count()).select_from(source_record).scalar_subquery(),
                select(func.count()).select_from(membership).scalar_subquery(),
            )
        ).one()
    # No partial page: the cut-off page rolled back whole, with its cursor; every staged
    # contact is in a golden record.
    assert at_kill % PAGE == 0
    assert merged == at_kill

    rows = await wait_for(
        "the run to finish",
        lambda: (r := run_rows(db)) and r[-1].state in ("succeeded", "failed") and r,
        300,
        pool,
    )
    # One run, retried in place: the same row, resumed after the last committed page.
    assert [(r.id, r.state, r.error) for r in rows] == [(run_id, "succeeded", None)]
    assert rows[0].counts["pulled"] == ROWS - at_kill
    retried = pool.log_lines("sync retrying")
    assert len(retried) == 1, pool.logs()
    assert f"run_id={run_id}" in retried[0]
    assert staged(db) == ROWS
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(source_record)).scalar_one() == ROWS
    assert_same_store(store_dump(db), (await reference_dump(config, tmp_path))[0])
    db.dispose()
    print(f"\nterminated backend {killed} with {at_kill}/{ROWS} rows committed")
