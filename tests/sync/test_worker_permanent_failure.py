"""A connector whose credentials are refused (401), queued next to healthy ones for a real
`crmhub worker`: it fails once per run with an error that says what to fix, is not retried, and
blocks nobody. Fake vendors are real HTTP servers on 127.0.0.1 (tests/fakes).

The runs are queued with `crmhub sync --enqueue`, not by a schedule's tick: a tick is up to a
minute away, and scheduled runs are queued by the same `enqueue_sync` (tests/sync/test_jobs.py
tests the ticks).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis

from bench.synthetic import write_leads_csv
from crmhub.settings import load_settings
from sync.jobs import JOB_DRAIN_TICK, JOB_ENQUEUE_DUE, JOB_RELAY, JOB_TRAIN
from sync.metrics import queue_name
from sync.store import make_engine
from tests.connectors.vendors import TOKEN, running
from tests.sync.worker_kit import Workers, run_rows, wait_for, write_tables_config

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.timeout(400),
]


def _cli(config: Path, *args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMHUB_")}
    done = subprocess.run(
        [sys.executable, "-m", "crmhub", "--config", str(config), *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return json.loads(done.stdout)


async def test_refused_credentials_fail_once_per_run_and_block_nobody(
    tmp_path: Path,
    pg_url: str,
    namespace: str,
    queue: ArqRedis,
    workers: Callable[[Path], Workers],
) -> None:
    with running("hubspot") as revoked, running("hubspot") as healthy:
        revoked.state.add_people(5)
        healthy.state.add_people(25)
        tables = {
            "crm": {
                **revoked.vendor.config(revoked.url, "revoked-token-123"),
                "rate_limit": 10_000,
            },
            "hs": {**healthy.vendor.config(healthy.url, TOKEN), "rate_limit": 10_000},
            "leads": {"type": "csv", "path": str(write_leads_csv(tmp_path / "leads.csv", 40))},
        }
        # One job at a time, so the failing connector sits in front of the others; a retry
        # would come back within seconds of the failure.
        queue_keys = {"max_jobs": 1, "max_tries": 5, "retry_backoff": 1, "lease_seconds": 2}
        config = write_tables_config(tmp_path, pg_url, namespace, tables, **queue_keys)
        db = make_engine(pg_url)
        pool = workers(config)
        pool.start()
        queued = _cli(config, "sync", "--enqueue")  # every connector, "crm" first
        assert [q["connector"] for q in queued if q["queued"]] == ["crm", "hs", "leads"]

        def settled() -> list[Any]:
            rows = run_rows(db)
            done = {r.connector for r in rows if r.state in ("succeeded", "failed")}
            return rows if done == set(tables) else []

        await wait_for("the queued runs", settled, 120, pool)
        # The next run of it (the next tick, say) fails again, once.
        assert _cli(config, "sync", "crm", "--enqueue")[0]["queued"]

        def crm_runs() -> list[str]:
            return [r.state for r in run_rows(db) if r.connector == "crm"]

        await wait_for("the second run", lambda: crm_runs() == ["failed", "failed"], 60, pool)
        await asyncio.sleep(8)  # time for a retry to show if there were one (1 s backoff)

    rows = run_rows(db)
    states = {r.connector: r for r in rows}  # the latest run of each
    # One row per run, no retry rows: crm, hs, leads, crm.
    assert [r.connector for r in rows] == ["crm", "hs", "leads", "crm"]
    assert states["hs"].state == "succeeded"
    assert states["hs"].counts["pulled"] == 25
    assert states["leads"].state == "succeeded"
    assert states["leads"].counts["pulled"] == 40
    failed = states["crm"]
    assert failed.state == "failed"
    # The error says what to fix, names the connector's credential, never its value.
    assert "HTTP 401" in failed.error
    assert "check the 'token' setting of connector 'crm'" in failed.error
    assert "revoked-token-123" not in failed.error
    # The vendor saw one refused request per run: no retry with the same bad token.
    assert revoked.state.statuses == [401, 401]
    # Nothing deferred: no sync job waits in the queue (the workers' own cron ticks may).
    waiting = [j.decode() for j in await queue.zrange(queue_name(load_settings(config)), 0, -1)]
    ticks = (JOB_ENQUEUE_DUE, JOB_RELAY, JOB_TRAIN, JOB_DRAIN_TICK)
    assert [j for j in waiting if not any(tick in j for tick in ticks)] == []
    assert pool.log_lines("sync retrying") == []
    logged = pool.log_lines("sync failed")  # once per run, by type: no message, no secret
    assert len(logged) == 2
    assert all("connector=crm" in line and "error_type=AuthError" in line for line in logged)

    # What an operator sees: the failure once, in `crmhub runs` and `crmhub worker --check`.
    listed = _cli(config, "runs", "--connector", "crm")
    assert [(r["connector"], r["state"]) for r in listed] == [("crm", "failed")] * 2
    assert all("HTTP 401" in r["error"] and r["seconds"] is not None for r in listed)
    health = _cli(config, "worker", "--check")
    assert health["ok"]
    by_name = {c["connector"]: c for c in health["connectors"]}
    assert by_name["crm"]["latest_state"] == "failed"
    assert by_name["crm"]["last_success"] is None
    assert "HTTP 401" in by_name["crm"]["latest_error"]
    assert by_name["hs"]["latest_state"] == by_name["leads"]["latest_state"] == "succeeded"
    db.dispose()
