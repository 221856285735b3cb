"""Killing `crmhub sync` at any moment loses nothing and duplicates nothing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.synthetic import write_leads_csv

ROWS = 200_000


def _config(folder: Path, csv_path: Path) -> Path:
    folder.mkdir()
    config = folder / "crmhub.toml"
    # Exact matching: this test is about crash safety of the pipeline, and the synthetic leads
    # reuse a few dozen names, which the probabilistic matcher would (rightly) compare a lot.
    config.write_text(
        f'[matching]\nmethod = "exact"\n[connectors.leads]\ntype = "csv"\npath = "{csv_path}"\n',
        encoding="utf-8",
    )
    return config


def _sync(config: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMHUB_")}
    with (config.parent / "stderr.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "crmhub", "--config", str(config), "sync", "--quiet"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the sync's mapping helper)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _gone(pids: list[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() for p in pids):
            return True
        time.sleep(0.1)
    return False


def _staged(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM source_record").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # not created yet


def _state(db: Path) -> dict:
    with sqlite3.connect(db) as conn:
        q = conn.execute
        return {
            "records": q(
                "SELECT source, kind, external_id, content_hash, data FROM source_record "
                "ORDER BY id"
            ).fetchall(),
            "goldens": q(
                "SELECT id, fields, lineage, merged_into FROM golden_record ORDER BY id"
            ).fetchall(),
            "members": q(
                "SELECT record_id, golden_id, method FROM membership ORDER BY record_id"
            ).fetchall(),
            "keys": q(
                "SELECT record_id, key_kind, key_value FROM match_key ORDER BY 1, 2, 3"
            ).fetchall(),
            "letters": q(
                "SELECT source, scope, origin, field, reason FROM dead_letter "
                "ORDER BY origin, field"
            ).fetchall(),
            "cursor": q("SELECT connector, stream, cursor FROM connector_state").fetchall(),
        }


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_mid_sync_then_rerun_equals_an_uninterrupted_run(tmp_path):
    csv_path = write_leads_csv(tmp_path / "leads.csv", ROWS)
    # A few bad rows, so dead letters are part of what must not be lost or doubled.
    with csv_path.open("a", encoding="utf-8") as fh:
        fh.write("BAD-1,only,three\nBAD-2,,,,,,,,,\n")

    clean = _config(tmp_path / "clean", csv_path)
    assert _sync(clean).wait(timeout=500) == 3  # 3: dead letters present

    crashed = _config(tmp_path / "crashed", csv_path)
    db = crashed.parent / "crmhub.db"
    kills = 0
    for threshold in (ROWS // 4, (ROWS * 3) // 5):
        process = _sync(crashed)
        deadline = time.monotonic() + 300
        while _staged(db) < threshold and process.poll() is None:
            assert time.monotonic() < deadline, "sync made no progress"
            time.sleep(0.05)
        if process.poll() is None:
            helpers = _children(process.pid)
            assert helpers, "a sync this size maps on a helper process"
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            # The mapping helper ends with its sync instead of waiting forever.
            assert _gone(helpers, within=10), "the mapping helper outlived its sync"
    assert kills == 2, "the sync finished before it could be killed: raise ROWS"
    assert _sync(crashed).wait(timeout=500) == 3

    expected, actual = _state(clean.parent / "crmhub.db"), _state(db)
    assert len(actual["records"]) == ROWS  # both bad rows are dead letters, not records
    for part in expected:
        assert actual[part] == expected[part], part
    with sqlite3.connect(db) as conn:
        states = [r[0] for r in conn.execute("SELECT state FROM sync_run ORDER BY id")]
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert states == ["interrupted", "interrupted", "succeeded"]
