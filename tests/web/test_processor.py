"""`crmhub serve` maps and matches in a processor process next to the web server: what it
accepts lands in the golden records, rows accepted elsewhere too, and the processor never
outlives the server, even a killed one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from crmhub.web import create_app
from sync.intake import Intake
from tests.conftest import REPO
from tests.web.conftest import (
    SECRET,
    activities,
    fixture,
    golden_of,
    inbox_rows,
    live,
    records,
    signed,
    wait_until,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not collected it yet.
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_deliveries_are_processed_by_the_processor_process(settings, db):
    app = create_app(settings, db, processing="process")
    body = json.dumps(fixture("generic_submission.json")).encode()
    with live(app) as server:
        processor = app.state.processor
        assert processor.pid != os.getpid()
        response = httpx.post(
            f"{server.url}/hooks/forms/generic", content=body, headers=signed("generic", body)
        )
        assert response.json()["status"] == "accepted"
        # Accepted by another process (here: this test), no kick: found by polling.
        other = Intake(settings, db)
        try:
            other.record(
                "generic",
                "generic:elsewhere",
                "application/json",
                json.dumps({"submission_id": "elsewhere", "fields": {"email": "e@x.example"}}),
            )
        finally:
            other.close()
        wait_until(lambda: [r["status"] for r in inbox_rows(db)] == ["done", "done"], timeout=20)
        # Warm: a delivery is a matched contact well within a second of its receipt.
        body = json.dumps({"submission_id": "warm", "fields": {"email": "w@x.example"}}).encode()
        httpx.post(
            f"{server.url}/hooks/forms/generic", content=body, headers=signed("generic", body)
        )
        wait_until(lambda: all(r["status"] == "done" for r in inbox_rows(db)), timeout=5)
    warm = next(r for r in inbox_rows(db) if r["delivery_id"] == "generic:warm")
    server_side = (warm["processed_at"] - warm["received_at"]).total_seconds()
    assert server_side < 1.0, f"processed {server_side:.3f}s after receipt"
    assert not _alive(processor.pid)  # stopped with the app
    contacts = records(db, "generic", "contact")
    assert all(golden_of(db, c["id"]) is not None for c in contacts)
    assert len(activities(db, "generic")) == 3


def test_a_processor_that_died_is_started_again(settings, db, monkeypatch):
    monkeypatch.setattr("sync.intake_process.RESTART_SECONDS", 0.0)
    app = create_app(settings, db, processing="process")

    def post(submission: str) -> None:
        body = json.dumps({"submission_id": submission, "fields": {"email": "k@x.example"}})
        response = httpx.post(
            f"{server.url}/hooks/forms/generic",
            content=body.encode(),
            headers=signed("generic", body.encode()),
        )
        assert response.json()["status"] == "accepted"

    with live(app) as server:
        first = app.state.processor.pid
        post("before")
        wait_until(lambda: len(activities(db, "generic")) == 1, timeout=20)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: not _alive(first), timeout=5)
        post("after")  # its kick finds the pipe broken: a new processor
        wait_until(lambda: len(activities(db, "generic")) == 2, timeout=20)
        assert app.state.processor.pid != first


def test_drain_mode_connectors_are_left_to_the_drain(tmp_path, store_url, db):
    from tests.conftest import make_settings
    from tests.web.conftest import connectors

    tables = connectors()
    tables["typeform"]["process"] = "drain"
    settings = make_settings(tmp_path, store_url, tables)
    app = create_app(settings, db, processing="process")
    inline = json.dumps(fixture("generic_submission.json")).encode()
    drained = json.dumps(fixture("typeform_form_response.json")).encode()
    with live(app) as server:
        for name, body in (("typeform", drained), ("generic", inline)):
            response = httpx.post(
                f"{server.url}/hooks/forms/{name}", content=body, headers=signed(name, body)
            )
            assert response.json()["status"] == "accepted"
        wait_until(lambda: len(activities(db, "generic")) == 1, timeout=20)
        time.sleep(1.5)  # past the processor's poll interval: it still leaves the row alone
    statuses = {r["connector"]: r["status"] for r in inbox_rows(db)}
    assert statuses == {"generic": "done", "typeform": "pending"}
    assert activities(db, "typeform") == []


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_the_processor_exits_when_serve_is_killed(tmp_path, store_url, db):
    config = tmp_path / "crmhub.toml"
    config.write_text(
        f'[store]\nurl = "{store_url}"\n'
        f'[connectors.generic]\ntype = "webform"\nsecret = "{SECRET}"\n'
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = subprocess.Popen(
        [sys.executable, "-m", "crmhub", "--config", str(config), "serve", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _up(port), timeout=30)
        body = json.dumps(fixture("generic_submission.json")).encode()
        response = httpx.post(
            f"http://127.0.0.1:{port}/hooks/forms/generic",
            content=body,
            headers=signed("generic", body),
        )
        assert response.status_code == 200
        wait_until(lambda: len(activities(db, "generic")) == 1, timeout=20)
        # The processor, and multiprocessing's resource tracker.
        children = _children(serve.pid)
        assert children
    finally:
        serve.send_signal(signal.SIGKILL)
        serve.wait(timeout=10)
    # Their pipes from the web process closed with the kill: they stop by themselves.
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in children):
        assert time.monotonic() < deadline, "a child outlived a killed crmhub serve"
        time.sleep(0.05)


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
