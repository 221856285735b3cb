"""Deletions inferred from a full scan, under the max-delete-ratio guard: fake vendor over real
HTTP -> SyncEngine (and `crmhub sync` as a process) -> SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from typer.testing import CliRunner

from crmhub.cli.app import app
from crmhub.errors import AuthError, SettingsError
from crmhub.settings import load_settings
from sync.engine import SyncEngine
from sync.migrate import upgrade
from sync.queries import iter_xref, store_totals
from sync.sources import load_source
from sync.store import connector_state, make_engine, source_record, sync_run
from tests.conftest import make_settings
from tests.connectors.test_merges import engine_for
from tests.connectors.vendors import TOKEN, Running, running
from tests.fakes.server import Fault


def live_ids(db: Engine) -> set[str]:
    with db.connect() as conn:
        return {external for _, external, _ in iter_xref(conn)}


def deleted_count(db: Engine) -> int:
    with db.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(source_record).where(source_record.c.deleted == 1)
            ).scalar_one()
        )


async def test_vendor_side_deletes_are_applied_on_a_full_run_only(
    tmp_path: Path, vendor: Running, store_url: str
) -> None:
    state = vendor.state
    state.add_people(60)
    engine, db = engine_for(tmp_path, vendor, store_url)
    await engine.run("src")
    gone = [7, 8, 30]
    for pid in gone:
        state.erase(state.people[pid])  # permanently deleted: nothing left to read
    incremental = await engine.run("src")
    assert incremental.counts.deleted == 0  # an incremental run never infers deletions
    assert len(live_ids(db)) == 60
    full = await engine.run("src", full=True)
    assert full.state == "succeeded"
    assert full.held is None
    assert full.counts.deleted == 3
    assert full.counts.deletions_held == 0
    assert live_ids(db) == vendor.want(set(range(1, 61)) - set(gone))
    with db.connect() as conn:
        assert store_totals(conn)["contacts"] == 57
    assert (await engine.run("src", full=True)).counts.deleted == 0


async def test_a_mass_disappearance_is_held_until_confirmed(tmp_path: Path, store_url: str) -> None:
    with running("mailchimp") as vendor:
        state = vendor.state
        state.add_people(60)
        engine, db = engine_for(tmp_path, vendor, store_url)
        await engine.run("src")
        state.hidden = set(range(1, 61, 2))  # the source suddenly lists half of them
        held = await engine.run("src", full=True)
        assert held.state == "succeeded"
        assert held.counts.deleted == 0
        assert held.counts.deletions_held == 30
        assert held.held is not None
        assert (held.held.missing, held.held.stored, held.held.limit) == (30, 60, 0.1)
        message = held.held.message()
        assert "30 of the 60" in message
        assert "50.0%" in message
        assert "crmhub sync src --full --allow-deletes" in message
        assert "max_delete_ratio" in message
        assert held.as_dict()["held_deletions"]["ratio"] == 0.5
        assert len(live_ids(db)) == 60
        assert deleted_count(db) == 0
        with db.connect() as conn:
            row = conn.execute(select(sync_run).where(sync_run.c.id == held.run_id)).one()
        assert row.state == "succeeded"
        assert row.error == message
        # Raising the key to the share found applies them, as does confirming.
        looser, _ = engine_for(tmp_path, vendor, store_url, max_delete_ratio=0.5)
        applied = await looser.run("src", full=True)
        assert applied.counts.deleted == 30
        assert applied.held is None
        assert live_ids(db) == vendor.want(range(2, 61, 2))


async def test_confirming_applies_the_held_deletions(tmp_path: Path, store_url: str) -> None:
    with running("klaviyo") as vendor:
        vendor.state.add_people(40)
        engine, db = engine_for(tmp_path, vendor, store_url)
        await engine.run("src")
        vendor.state.hidden = set(range(1, 21))
        assert (await engine.run("src", full=True)).counts.deletions_held == 20
        confirmed = await engine.run("src", full=True, allow_deletes=True)
        assert confirmed.counts.deleted == 20
        assert confirmed.held is None
        assert live_ids(db) == vendor.want(range(21, 41))


async def test_a_failed_full_run_infers_nothing(
    tmp_path: Path, vendor: Running, sqlite_url: str
) -> None:
    state = vendor.state
    state.add_people(60)
    engine, db = engine_for(tmp_path, vendor, sqlite_url)
    await engine.run("src")
    for pid in (3, 4):
        state.erase(state.people[pid])
    state.faults += [Fault(), Fault(401)]  # the second request of the run: token revoked
    with pytest.raises(AuthError):
        await engine.run("src", full=True)
    assert len(live_ids(db)) == 60
    assert deleted_count(db) == 0
    assert (await engine.run("src", full=True)).counts.deleted == 2


async def test_a_scan_with_unreadable_records_infers_nothing(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A record the connector could not parse has no known id: it would look deleted."""
    with running("activecampaign") as vendor:
        state = vendor.state
        state.add_people(30)
        engine, _db = engine_for(tmp_path, vendor, sqlite_url)
        await engine.run("src")
        state.erase(state.people[5])
        state.touch([9], broken=True)
        result = await engine.run("src", full=True)
        assert result.counts.dead_letters == 1
        assert result.counts.deleted == 0
        assert result.held is None
        state.touch([9], broken=False)
        assert (await engine.run("src", full=True)).counts.deleted == 1


def test_max_delete_ratio_is_validated(tmp_path: Path) -> None:
    for bad in (1.5, -0.1, "lots"):
        table = {"type": "klaviyo", "api_key": "pk_x", "max_delete_ratio": bad}
        settings = make_settings(tmp_path, "sqlite://", {"src": table})
        with pytest.raises(SettingsError, match="max_delete_ratio"):
            load_source(settings, "src")


# -- `crmhub sync` as a process: exit code, message, confirmation, SIGKILL -----------------


def _config(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "crmhub.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path / "crm.db"}"\n'
        f'[connectors.src]\ntype = "hubspot"\nbase_url = "{url}"\n'
        'token = "${HS_TOKEN}"\nrate_limit = 10000\npage_size = 10\n',
        encoding="utf-8",
    )
    return config


def _crmhub(config: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMHUB_")}
    env.update(HS_TOKEN=TOKEN, COLUMNS="120")
    return subprocess.Popen(
        [sys.executable, "-m", "crmhub", "--config", str(config), "sync", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _first_sync(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The initial sync, in process (quicker than a `crmhub` process)."""
    monkeypatch.setenv("HS_TOKEN", TOKEN)
    settings = load_settings(config)
    db = make_engine(settings.store.url)
    upgrade(db)
    assert asyncio.run(SyncEngine(settings, db).run("src")).state == "succeeded"
    db.dispose()


def _done(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_cli_holds_a_mass_deletion_with_exit_code_5_until_confirmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running("hubspot") as vendor:
        vendor.state.add_people(40)
        config = _config(tmp_path, vendor.url)
        _first_sync(config, monkeypatch)
        vendor.state.hidden = set(range(1, 41, 2))
        code, _, err = _done(_crmhub(config, "src", "--full"))
        assert code == 5
        assert "deletions held" in err
        assert "20 of the 40" in err
        assert "50.0%" in err
        assert "crmhub sync src --full --allow-deletes" in err
        refused = CliRunner().invoke(app, ["--config", str(config), "sync", "--allow-deletes"])
        assert refused.exit_code == 1
        assert "add --full" in refused.output
        code, out, _ = _done(_crmhub(config, "src", "--full", "--allow-deletes", "--json"))
        assert code == 0
        (run,) = json.loads(out)["runs"]
        assert run["counts"]["deleted"] == 20
        assert run["held_deletions"] is None


def test_a_full_run_killed_mid_way_infers_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running("hubspot") as vendor:
        state = vendor.state
        state.add_people(60)
        config = _config(tmp_path, vendor.url)
        _first_sync(config, monkeypatch)
        for pid in (11, 12, 13):
            state.erase(state.people[pid])
        db = make_engine(f"sqlite:///{tmp_path / 'crm.db'}")
        with db.connect() as conn:
            before = conn.execute(select(func.max(connector_state.c.updated_at))).scalar()
        # Two pages, then the source answers every request 6 s late: the process is killed
        # while it waits, after a page was committed, long before the scan could complete.
        state.faults += [Fault(), Fault(), *(Fault(delay=6) for _ in range(10))]
        asked = len(state.requests)
        proc = _crmhub(config, "src", "--full", "--quiet")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with db.connect() as conn:
                moved = conn.execute(select(func.max(connector_state.c.updated_at))).scalar()
            if moved != before and len(state.requests) >= asked + 3:
                break
            time.sleep(0.05)
        else:
            proc.kill()
            pytest.fail("the full run committed no page")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        state.faults.clear()
        assert len(live_ids(db)) == 60
        assert deleted_count(db) == 0
        with db.connect() as conn:
            assert conn.execute(
                select(sync_run.c.state).order_by(sync_run.c.id)
            ).scalars().all() == [
                "succeeded",
                "running",  # killed: the next run marks it interrupted
            ]
        code, out, _ = _done(_crmhub(config, "src", "--full", "--json"))
        assert code == 0
        assert json.loads(out)["runs"][0]["counts"]["deleted"] == 3
        db.dispose()
