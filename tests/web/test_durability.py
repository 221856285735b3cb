"""A crash after the 2xx loses nothing: the delivery is in the inbox before the answer, and
the drain (at startup, or `crmhub forms drain`) processes what was left pending."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import httpx
from typer.testing import CliRunner

from crmhub.cli.app import app as cli
from sync.intake import Intake
from sync.store import inbox, write_transaction
from tests.conftest import REPO
from tests.web.conftest import (
    SECRET,
    activities,
    fixture,
    golden_of,
    inbox_engine,
    inbox_rows,
    live,
    records,
    signed,
    wait_until,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path, store_url: str) -> str:
    path = tmp_path / "crmhub.toml"
    path.write_text(
        f'[store]\nurl = "{store_url}"\n'
        f'[connectors.typeform]\ntype = "webform"\nprovider = "typeform"\nsecret = "{SECRET}"\n'
    )
    return str(path)


def test_sigkill_after_the_2xx_then_drain_processes_the_delivery(tmp_path, store_url, db):
    config, port = _config(tmp_path, store_url), _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.web.crash_server", config, str(port)], cwd=REPO, env=env
    )
    try:
        url = f"http://127.0.0.1:{port}/hooks/forms/typeform"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
        body = json.dumps(fixture("typeform_form_response.json")).encode()
        response = httpx.post(url, content=body, headers=signed("typeform", body), timeout=5)
        assert response.status_code == 200
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    # Acknowledged, killed mid-processing: the row is there, claimed, nothing ingested.
    (row,) = inbox_rows(db)
    assert row["status"] == "pending"
    assert records(db, "typeform", "contact") == []
    # The claim of the dead process lapses; the drain picks the row up.
    with inbox_engine(db) as engine, write_transaction(engine) as conn:
        conn.execute(inbox.update().values(claimed_at=datetime.now(UTC) - timedelta(minutes=5)))
    result = CliRunner().invoke(cli, ["--config", config, "forms", "drain", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["processed"] == 1
    assert inbox_rows(db)[0]["status"] == "done"
    (contact,) = records(db, "typeform", "contact")
    assert golden_of(db, contact["id"])["emails"] == ["laura.diaz@example.com"]
    assert len(activities(db, "typeform")) == 1


def test_server_start_drains_pending_deliveries(settings, app, db):
    body = json.dumps(fixture("generic_submission.json"))
    intake = Intake(settings, db)
    accepted = intake.record("generic", "generic:gen-0001", "application/json", body)
    intake.close()
    assert inbox_rows(db)[0]["status"] == "pending"
    with live(app):
        wait_until(lambda: inbox_rows(db)[0]["status"] == "done", timeout=5)
    assert len(activities(db, "generic")) == 1
    assert accepted.duplicate is False


async def test_drain_leaves_a_freshly_claimed_row_to_its_claimant(settings, db):
    body = json.dumps(fixture("generic_submission.json"))
    intake = Intake(settings, db)
    try:
        intake.record("generic", "generic:gen-0001", "application/json", body)
        with inbox_engine(db) as engine, write_transaction(engine) as conn:
            conn.execute(inbox.update().values(claimed_at=datetime.now(UTC)))
        first = await intake.drain()
        assert (first.processed, inbox_rows(db)[0]["status"]) == (0, "pending")
        with inbox_engine(db) as engine, write_transaction(engine) as conn:
            conn.execute(inbox.update().values(claimed_at=datetime.now(UTC) - timedelta(hours=1)))
        second = await intake.drain()
        assert second.processed == 1
        again = await intake.drain()  # done rows are never processed again
        assert again.processed == 0
    finally:
        intake.close()
    assert len(activities(db, "generic")) == 1


def test_end_to_end_submission_is_a_golden_record_within_a_second(app, db):
    body = json.dumps(
        {
            "submission_id": "e2e-1",
            "form": "demo",
            "fields": {"name": "Kai Roe", "email": "kai@roe.example"},
        }
    ).encode()
    with live(app) as server:
        url = f"{server.url}/hooks/forms/generic"
        started = time.monotonic()
        response = httpx.post(url, content=body, headers=signed("generic", body))
        assert response.status_code == 200

        def landed() -> bool:
            contacts = records(db, "generic", "contact")
            return (
                bool(contacts)
                and golden_of(db, contacts[0]["id"]) is not None
                and bool(activities(db, "generic"))
            )

        wait_until(landed, timeout=5)
        elapsed = time.monotonic() - started
        hosted = httpx.post(
            f"{server.url}/f/contact",
            data={"name": "Ivy Moss", "email": "ivy@moss.example"},
            headers={"origin": "https://www.example.com"},
        )
        assert hosted.status_code == 303
        wait_until(lambda: len(activities(db, "contact")) == 1, timeout=1.0)
    # Receipt to processed, as the server recorded it (the client's own jitter left out).
    row = next(r for r in inbox_rows(db) if r["connector"] == "generic")
    server_side = (row["processed_at"] - row["received_at"]).total_seconds()
    assert server_side < 1.0, f"processed {server_side:.3f}s after receipt"
    assert elapsed < 2.0, f"visible {elapsed:.3f}s after the post"
    (contact,) = records(db, "generic", "contact")
    assert golden_of(db, contact["id"])["emails"] == ["kai@roe.example"]


async def test_process_drain_mode_only_accepts_and_the_drain_processes(tmp_path, store_url, db):
    from crmhub.web import create_app
    from tests.conftest import make_settings
    from tests.web.conftest import connectors

    tables = connectors()
    tables["generic"]["process"] = "drain"
    settings = make_settings(tmp_path, store_url, tables)
    app = create_app(settings, db)
    body = json.dumps(fixture("generic_submission.json")).encode()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://crmhub") as client:
        response = await client.post(
            "/hooks/forms/generic", content=body, headers=signed("generic", body)
        )
    assert response.status_code == 200
    assert inbox_rows(db)[0]["status"] == "pending"  # answered, not processed here
    assert activities(db, "generic") == []
    intake = Intake(settings, db)
    try:
        assert (await intake.drain()).processed == 1
    finally:
        intake.close()
    assert len(activities(db, "generic")) == 1
