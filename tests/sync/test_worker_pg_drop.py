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
from sync.locks import fence_key
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

# The backend inside a page's transaction: it holds the connector's page fence (`sync.locks`)
# and has written (a transaction id). Matching the last statement's text could also pick a reader
# idle in its transaction (the likely cause of a CI run where the run went on and pulled all).
_PAGE_WRITER = """
SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE a.datname = %s AND a.backend_xid IS NOT NULL
  AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid::bigint = %s AND l.objid::bigint = %s
LIMIT 1
"""


def terminate_page_writer(admin: psycopg.Connection, database: str) -> int | None:
    key = fence_key("leads")
    high, low = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
    row = admin.execute(_PAGE_WRITER, [database, high, low]).fetchone()
    if row is None:
        return None
    killed = admin.execute("SELECT pg_terminate_backend(%s)", [row[0]]).fetchone()
    return int(row[0]) if killed and killed[0] else None


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

    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        deadline = time.monotonic() + 60
        while (killed := terminate_page_writer(admin, database)) is None:
            assert time.monotonic() < deadline, "no page transaction seen in 60 s"
            assert staged(db) < ROWS, "the run finished before a page could be cut off"
            await asyncio.sleep(0.01)
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
