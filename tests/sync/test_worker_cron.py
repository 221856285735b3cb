"""Schedules fire in real `crmhub worker` processes, and a tick never doubles a slow run.

Two workers, connectors scheduled every minute (`* * * * *`): a slow one, already running when
the minute turns, and a quick one. The tick at the minute queues the quick one, which runs on
the spare slot; it cannot queue the slow one a second time (its job id is taken while it runs,
and its lease would stop a copy anyway). The slow source is a fake ActiveCampaign on
127.0.0.1 whose contact pages each answer after a delay until the minute has passed.

The test waits for a real minute boundary: it takes 30 to 120 s, mostly asleep.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis

from bench.synthetic import write_leads_csv
from crmhub.settings import load_settings
from sync.jobs import enqueue_sync
from sync.locks import lease_key
from sync.store import make_engine
from tests.connectors.vendors import TOKEN, running
from tests.fakes.server import Fault
from tests.sync.worker_kit import Workers, run_rows, wait_for, write_tables_config

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.timeout(300),
]

# Time the workers have to start and take the slow run before the minute turns.
HEAD_START = 20
PAGE_DELAY = 4.0  # seconds per slow contact page (well below the HTTP client's 30 s timeout)
PEOPLE = 600


def _config(folder: Path, pg_url: str, namespace: str, slow_url: str) -> Path:
    quick = write_leads_csv(folder / "quick.csv", 30)
    tables: dict[str, dict[str, Any]] = {
        "slow": {
            "type": "activecampaign",
            "base_url": slow_url,
            "api_token": TOKEN,
            "rate_limit": 10_000,
            "page_size": 20,
            "schedule": "* * * * *",
        },
        "quick": {"type": "csv", "path": str(quick), "schedule": "* * * * *"},
    }
    return write_tables_config(folder, pg_url, namespace, tables, lease_seconds=5, max_jobs=2)


async def test_a_tick_queues_what_is_due_and_never_doubles_a_slow_run(
    tmp_path: Path,
    pg_url: str,
    namespace: str,
    queue: ArqRedis,
    workers: Callable[[Path], Workers],
) -> None:
    with running("activecampaign") as slow:
        slow.state.add_people(PEOPLE)  # 30 pages of 20: 120 s at PAGE_DELAY, if never cleared
        # Every contact page is slow until the test clears the faults, past the minute.
        slow.state.faults.extend(Fault(delay=PAGE_DELAY, path="contacts") for _ in range(40))
        config = _config(tmp_path, pg_url, namespace, slow.url)
        settings = load_settings(config)
        db = make_engine(pg_url)
        # The tick under test is the first minute boundary after the workers start: if the
        # next one is too close for the head start, wait past it (its tick would run `quick`
        # early, an extra run).
        now = datetime.now(UTC)
        minute = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        if minute - now < timedelta(seconds=HEAD_START + 5):
            await asyncio.sleep((minute - now).total_seconds() + 1)
            minute += timedelta(minutes=1)
        pool = workers(config)
        pool.start()
        pool.start()
        # The slow run starts now, by hand; from here on only the workers' ticks queue runs.
        assert await enqueue_sync(queue, settings, db, "slow") is not None
        await wait_for(
            "a worker to take the slow run",
            lambda: [r.state for r in run_rows(db)] == ["running"],
            HEAD_START,
            pool,
        )
        assert await queue.exists(lease_key(namespace, "slow"))
        assert datetime.now(UTC) < minute, "the workers took too long to start"

        # Past the minute (and its tick), the slow source answers at full speed again.
        await asyncio.sleep((minute - datetime.now(UTC)).total_seconds() + PAGE_DELAY + 2)
        slow.state.faults.clear()

        def settled() -> bool:
            latest = {r.connector: r.state for r in run_rows(db)}
            return latest == {"slow": "succeeded", "quick": "succeeded"}

        await wait_for("both runs to succeed", settled, 120, pool)
        rows = run_rows(db)

    # Exactly one run of each in the minute after the tick: the tick queued `quick`, and `slow`
    # was not queued again while it ran (the refused request leaves no row behind). On a busy
    # machine the runs may settle after the next tick, which rightly queues more runs: only
    # runs started before it are this tick's.
    next_tick = minute + timedelta(seconds=60)
    first = [r for r in rows if r.started_at is not None and r.started_at < next_tick]
    assert sorted(r.connector for r in first) == ["quick", "slow"], rows
    runs = {r.connector: r for r in first}
    assert runs["slow"].started_at < minute < runs["slow"].finished_at
    assert runs["slow"].counts["pulled"] == PEOPLE
    assert minute <= runs["quick"].started_at < minute + timedelta(seconds=30)
    assert runs["quick"].counts["pulled"] == 30
    # No run of a connector ever overlapped another of the same connector.
    for name in ("slow", "quick"):
        spans = sorted(
            (r.started_at, r.finished_at or datetime.max.replace(tzinfo=UTC))
            for r in rows
            if r.connector == name and r.started_at is not None
        )
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans)), rows
    # Each tick ran once for both workers (arq's unique cron job id per minute and namespace):
    # one "sync queued" line per run a tick queued (the first slow run was queued by hand).
    assert len(pool.log_lines("sync queued")) == len(rows) - 1, pool.logs()
    db.dispose()
