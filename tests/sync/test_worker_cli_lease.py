"""`crmhub sync NAME` with a queue configured takes the connector's lease, as a worker's job does:
it never overlaps a worker's run of the same connector, and says so when it has to skip it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from bench.synthetic import write_leads_csv
from sync.locks import lease_key
from tests.connectors.vendors import TOKEN, running
from tests.fakes.server import Fault
from tests.sync.worker_kit import REDIS_URL

pytestmark = [pytest.mark.redis, pytest.mark.timeout(300)]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CRMHUB_")}


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crmhub", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )


def _config(tmp_path: Path, redis_url: str | None, namespace: str = "", **table: object) -> Path:
    """A store on SQLite and one connector `leads`: a small CSV, or the `table` given."""
    if not table:
        table = {"type": "csv", "path": str(write_leads_csv(tmp_path / "leads.csv", 20))}
    queue = (
        f'[queue]\nredis_url = "{redis_url}"\nnamespace = "{namespace}"\nlease_seconds = 2\n'
        if redis_url
        else ""
    )
    connector = "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
    config = tmp_path / "crmhub.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "store.db"}"\n{queue}'
        f"[connectors.leads]\n{connector}",
        encoding="utf-8",
    )
    return config


def _wait(what: str, check: object, seconds: float) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check() if callable(check) else check
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


def _runs(config: Path) -> list[dict[str, object]]:
    listed = _cli(config, "runs", "--json")
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout))


def test_in_process_sync_refuses_while_a_worker_holds_the_connector_and_locks_it_itself(
    tmp_path: Path, namespace: str
) -> None:
    with running("hubspot") as vendor:
        vendor.state.add_people(12)
        # The worker's first request hangs for 15 s: its run (and lease) outlasts the refusals.
        vendor.state.faults.append(Fault(delay=15, path="contacts"))
        table = {**vendor.vendor.config(vendor.url, TOKEN), "rate_limit": 10_000}
        config = _config(tmp_path, REDIS_URL, namespace, **table)
        client = redis.Redis.from_url(REDIS_URL)
        key = lease_key(namespace, "leads")
        worker = subprocess.Popen(
            [sys.executable, "-m", "crmhub", "--config", str(config), "worker"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_env(),
        )
        try:
            assert _cli(config, "sync", "leads", "--enqueue").returncode == 0
            holder = _wait("the worker to take the lease", lambda: client.get(key), 60)
            assert f":{worker.pid}:" in holder.decode()  # type: ignore[attr-defined]

            refused = _cli(config, "sync", "leads")
            assert refused.returncode == 4, refused.stderr
            message = " ".join(refused.stderr.split())
            assert "leads: a worker is syncing it right now" in message
            assert f":{worker.pid}:" in message  # which worker, for the operator
            assert "crmhub sync leads --enqueue" in message  # what to do instead
            as_json = _cli(config, "sync", "leads", "--json")
            assert as_json.returncode == 4
            [result] = json.loads(as_json.stdout)["runs"]
            assert result["state"] == "locked"
            # Nothing was run or recorded for the refused syncs: only the worker's run exists.
            assert [r["state"] for r in _runs(config)] == ["running"]
            _wait(
                "the worker's run to end",
                lambda: [r["state"] for r in _runs(config)] == ["succeeded"],
                120,
            )
        finally:
            worker.terminate()
            assert worker.wait(timeout=30) == 0

        # With the worker's run over, the in-process sync takes the same lease for its run
        # (which hangs 3 s on its first request, long enough to be seen).
        vendor.state.faults.append(Fault(delay=3, path="contacts"))
        sync = subprocess.Popen(
            [sys.executable, "-m", "crmhub", "--config", str(config), "sync", "leads", "--full"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        mark = f":{sync.pid}:".encode()
        _wait("the in-process sync to hold the lease", lambda: mark in (client.get(key) or b""), 60)
        _, stderr = sync.communicate(timeout=120)
    assert sync.returncode == 0, stderr
    assert client.get(key) is None  # released at the end
    assert [r["state"] for r in _runs(config)] == ["succeeded", "succeeded"]
    client.close()


def test_in_process_sync_stops_when_the_configured_queue_is_unreachable(tmp_path: Path) -> None:
    config = _config(tmp_path, "redis://127.0.0.1:1/0")
    result = _cli(config, "sync", "leads")
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "cannot reach the queue's Redis ([queue] redis_url)" in message
    assert "remove redis_url from [queue] if no `crmhub worker` uses this store" in message
    assert _runs(config) == []  # refused before anything ran


def test_a_queue_counts_as_configured_only_with_a_redis_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only then may workers run, and only then does `crmhub sync` need (and take) leases."""
    from crmhub.settings import load_settings
    from sync.jobs import queue_configured

    config = tmp_path / "crmhub.toml"
    for text, expected in (
        ("", False),
        ('[queue]\nnamespace = "x:"\nlease_seconds = 5\n', False),
        ('[queue]\nredis_url = "redis://10.1.2.3:6379/0"\n', True),
    ):
        config.write_text(text, encoding="utf-8")
        assert queue_configured(load_settings(config)) is expected, text
    config.write_text("", encoding="utf-8")
    monkeypatch.setenv("CRMHUB_QUEUE__REDIS_URL", "redis://127.0.0.1:6379/0")
    assert queue_configured(load_settings(config))


def test_workers_and_enqueueing_need_the_queue_configured(tmp_path: Path) -> None:
    config = _config(tmp_path, None)
    for args in (("worker",), ("worker", "--check"), ("sync", "leads", "--enqueue")):
        result = _cli(config, *args)
        assert result.returncode == 1, args
        message = " ".join(result.stderr.split())
        assert "needs [queue] redis_url in the config (or CRMHUB_QUEUE__REDIS_URL)" in message


def test_in_process_sync_that_loses_its_lease_stops_and_says_so(
    tmp_path: Path, namespace: str
) -> None:
    with running("hubspot") as vendor:
        vendor.state.add_people(5)
        vendor.state.faults.append(Fault(delay=6, path="contacts"))
        table = {**vendor.vendor.config(vendor.url, TOKEN), "rate_limit": 10_000}
        config = _config(tmp_path, REDIS_URL, namespace, **table)
        client = redis.Redis.from_url(REDIS_URL)
        key = lease_key(namespace, "leads")
        sync = subprocess.Popen(
            [sys.executable, "-m", "crmhub", "--config", str(config), "sync", "leads"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        mark = f":{sync.pid}:".encode()
        _wait("the sync to hold the lease", lambda: mark in (client.get(key) or b""), 60)
        client.set(key, b"another-host:1:taken-over", px=60_000)  # as after an expiry
        _, stderr = sync.communicate(timeout=60)
    assert sync.returncode == 1
    message = " ".join(stderr.split())
    assert "leads: lost the connector's lock mid-run" in message
    assert "run it again to resume" in message
    assert client.get(key) == b"another-host:1:taken-over"  # never deleted someone else's lease
    assert [r["state"] for r in _runs(config)] == ["interrupted"]
    client.delete(key)
    client.close()
