"""Write-back end to end: four fake marketing tools over real HTTP, the store, the outbox.

An opt-out captured in one tool reaches the other three in one cycle (sync, relay); field
changes and erasures propagate; echoes of our own pushes enqueue nothing; faults (a crash
between the vendor's 2xx and marking the row sent, 429/5xx storms, a contact gone at the
vendor) lose no push and retry nothing forever.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

import connectors.http as http
from crmhub.settings import Settings
from sync.engine import SyncEngine
from sync.outbox import LEASE, disclosures, outbox_counts, relay, requeue_failed
from sync.store import make_engine, membership, outbox, source_record, write_transaction
from sync.writeback import enqueue_erasure, resend_erasure
from tests.conftest import make_settings
from tests.connectors.vendors import TOKEN, VENDORS, Running, running

KINDS = ("activecampaign", "hubspot", "klaviyo", "mailchimp")
PEOPLE = 6


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = functools.partial(http.request_retry, initial=0.01, max_wait=0.05)
    monkeypatch.setattr(http, "request_retry", fast)


@dataclass
class Hub:
    settings: Settings
    db: Engine
    engine: SyncEngine
    tools: dict[str, Running]

    async def sync(self, *names: str) -> None:
        for name in names or KINDS:
            result = await self.engine.run(name)
            assert result.state == "succeeded", result.error

    def rows(self, **where: Any) -> list[Any]:
        query = select(outbox).order_by(outbox.c.id)
        for key, value in where.items():
            query = query.where(outbox.c[key] == value)
        with self.db.connect() as conn:
            return list(conn.execute(query).all())

    def golden_of(self, email: str) -> int:
        with self.db.connect() as conn:
            for golden_id, data in conn.execute(
                select(membership.c.golden_id, source_record.c.data).join(
                    source_record, source_record.c.id == membership.c.record_id
                )
            ):
                if email in (data.get("emails") or []):
                    return int(golden_id)
        raise AssertionError(f"no golden record for {email}")


def _hub(tmp_path: Path, store_url: str, stack: ExitStack, **writeback: Any) -> Hub:
    tools = {kind: stack.enter_context(running(kind)) for kind in KINDS}
    table: dict[str, dict[str, Any]] = {}
    for kind, tool in tools.items():
        tool.state.add_people(PEOPLE)
        table[kind] = {
            **VENDORS[kind].config(tool.url, TOKEN),
            "rate_limit": 10_000,
            "writeback": writeback or {"consent": True, "erasure": True, "fields": ["first_name"]},
        }
    settings = make_settings(tmp_path, store_url, table)
    settings.matching.method = "exact"
    db = make_engine(store_url)
    stack.callback(db.dispose)
    return Hub(settings, db, SyncEngine(settings, db), tools)


@pytest.fixture
def hub(tmp_path: Path, store_url: str) -> Iterator[Hub]:
    with ExitStack() as stack:
        yield _hub(tmp_path, store_url, stack)


@pytest.fixture
def lite_hub(tmp_path: Path, sqlite_url: str) -> Iterator[Hub]:
    with ExitStack() as stack:
        yield _hub(tmp_path, sqlite_url, stack)


def _status(hub: Hub, n: int) -> dict[str, str]:
    return {kind: tool.state.people[n].status for kind, tool in hub.tools.items()}


async def test_an_opt_out_in_one_tool_reaches_the_other_three_in_one_cycle(hub: Hub) -> None:
    await hub.sync()
    assert hub.rows() == []  # everyone agrees: nothing to push
    hub.tools["mailchimp"].state.touch([2], status="unsubscribed")
    await hub.sync("mailchimp")
    pending = hub.rows(status="pending")
    assert sorted(r.connector for r in pending) == ["activecampaign", "hubspot", "klaviyo"]
    assert {r.action for r in pending} == {"consent"}

    report = await relay(hub.settings, hub.db)
    assert (report.sent, report.failed, report.retried) == (3, 0, 0)
    assert set(_status(hub, 2).values()) == {"unsubscribed"}
    assert set(_status(hub, 3).values()) == {"subscribed"}

    # The echo: every tool now reports the opt-out we pushed; nothing new is enqueued.
    await hub.sync()
    await hub.sync()
    assert len(hub.rows()) == 3
    assert (await relay(hub.settings, hub.db)).claimed == 0


async def test_a_field_change_propagates_and_its_echo_does_not_loop(lite_hub: Hub) -> None:
    hub = lite_hub
    await hub.sync()
    hub.tools["klaviyo"].state.touch([3], first="Joanna")
    await hub.sync("klaviyo")
    pending = hub.rows(status="pending", action="fields")
    assert sorted(r.connector for r in pending) == ["activecampaign", "hubspot", "mailchimp"]
    assert all(r.payload["fields"] == {"first_name": "Joanna"} for r in pending)
    await relay(hub.settings, hub.db)
    assert {t.state.people[3].first for t in hub.tools.values()} == {"Joanna"}
    # Read back everywhere (newer timestamps in three tools): no change, no loop.
    await hub.sync()
    await hub.sync()
    assert len(hub.rows()) == 3
    assert sum(1 for t in hub.tools.values() for w in t.state.writes if w[0] == "update") == 3


async def test_relay_killed_after_the_vendors_200_repeats_the_push_harmlessly(
    lite_hub: Hub,
) -> None:
    hub = lite_hub
    await hub.sync()
    hub.tools["hubspot"].state.touch([4], status="unsubscribed")
    await hub.sync("hubspot")
    assert len(hub.rows(status="pending")) == 3

    crashed: list[int] = []

    class Killed(Exception):
        pass

    def crash(row_id: int) -> None:
        crashed.append(row_id)
        raise Killed(f"killed after pushing row {row_id}")

    with pytest.raises(Killed):
        await relay(hub.settings, hub.db, after_push=crash)
    (first,) = (r for r in hub.rows() if r.id == crashed[0])
    assert first.status == "pending"  # the vendor has it; the store does not know yet
    # The dead relay's batch stays leased (no second relay pushes it concurrently) ...
    assert (await relay(hub.settings, hub.db)).claimed == 0
    # ... until the lease ends: then the push repeats and the rest goes out.
    later = datetime.now(UTC) + LEASE + timedelta(seconds=1)
    report = await relay(hub.settings, hub.db, now=lambda: later)
    assert report.failed == 0
    with hub.db.connect() as conn:
        assert outbox_counts(conn) == {"pending": 0, "sent": 3, "failed": 0}
    assert set(_status(hub, 4).values()) == {"unsubscribed"}
    # The crashed row's vendor saw the push twice (its state absorbed the repeat); rows of
    # other tools in flight at the kill may have repeated too, none was lost.
    marker = {
        "activecampaign": "/contacts/4/contactLists",
        "hubspot": "unsubscribe-all",
        "klaviyo": "bulk-delete-jobs",
        "mailchimp": "/members/",
    }
    for kind, tool in hub.tools.items():
        calls = sum(marker[kind] in path for path in tool.state.requests)
        if kind == "hubspot":
            assert calls == 0  # the source of the opt-out is not told it
        elif kind == first.connector:
            assert calls == 2
        else:
            assert calls in (1, 2)


async def test_429_and_5xx_storms_lose_no_push(lite_hub: Hub) -> None:
    hub = lite_hub
    await hub.sync()
    for tool in hub.tools.values():
        tool.state.fault_rate = 0.6
    for n in (1, 2, 3, 4, 5):
        hub.tools["activecampaign"].state.touch([n], status="unsubscribed")
    for tool in hub.tools.values():
        tool.state.fault_rate = 0.0
    await hub.sync("activecampaign")
    assert len(hub.rows(status="pending")) == 15
    for tool in hub.tools.values():
        tool.state.fault_rate = 0.6
    clock = datetime.now(UTC)
    for _ in range(30):
        await relay(hub.settings, hub.db, now=lambda at=clock: at)  # type: ignore[misc]
        if not hub.rows(status="pending"):
            break
        clock += timedelta(hours=2)  # past any backoff
    with hub.db.connect() as conn:
        assert outbox_counts(conn) == {"pending": 0, "sent": 15, "failed": 0}
    for n in (1, 2, 3, 4, 5):
        assert set(_status(hub, n).values()) == {"unsubscribed"}
    faults = sum(s in (429, 503) for t in hub.tools.values() for s in t.state.statuses)
    assert faults > 10  # the storm really happened


async def test_a_contact_gone_at_the_vendor_fails_once_and_is_not_retried(lite_hub: Hub) -> None:
    hub = lite_hub
    await hub.sync()
    del hub.tools["activecampaign"].state.people[6]  # gone, and no deleted feed to tell us
    hub.tools["mailchimp"].state.touch([6], status="unsubscribed")
    await hub.sync("mailchimp")
    report = await relay(hub.settings, hub.db)
    assert (report.sent, report.failed) == (2, 1)
    (failed,) = hub.rows(status="failed")
    assert failed.connector == "activecampaign"
    assert "contact gone at the vendor (404)" in failed.last_error
    later = datetime.now(UTC) + timedelta(days=1)
    assert (await relay(hub.settings, hub.db, now=lambda: later)).claimed == 0
    with hub.db.connect() as conn:
        shown = disclosures(conn, failed.golden_id)
    assert {(d["connector"], d["status"]) for d in shown} == {
        ("hubspot", "sent"),
        ("klaviyo", "sent"),
        ("activecampaign", "failed"),
    }
    # The contact comes back at the vendor; the steward re-queues; it goes out.
    hub.tools["activecampaign"].state.add_people(1)
    with write_transaction(hub.db) as conn:
        assert requeue_failed(conn, connector="activecampaign") == 1
    assert (await relay(hub.settings, hub.db)).sent == 1


async def test_an_erasure_reaches_all_four_and_is_re_sent_when_the_person_reappears(
    hub: Hub,
) -> None:
    await hub.sync()
    golden = hub.golden_of("person6@example.com")
    with write_transaction(hub.db) as conn:
        assert enqueue_erasure(conn, golden) == 4
        assert enqueue_erasure(conn, golden) == 0  # already pending: no duplicate
    report = await relay(hub.settings, hub.db)
    assert (report.sent, report.failed) == (4, 0)
    for tool in hub.tools.values():
        assert 6 not in tool.state.people
        assert "person6@example.com" in tool.state.erased
    sent = hub.rows(action="erase")
    assert all(r.payload == {"scrubbed": True} for r in sent)  # no PII kept once delivered
    # A re-sync of every tool brings nobody back and asks for nothing new.
    await hub.sync()
    assert len(hub.rows()) == 4
    assert all(t.state.by_email("person6@example.com") is None for t in hub.tools.values())
    # The person is re-imported into HubSpot; the suppression check (steward branch)
    # calls resend_erasure for the reappearing record, and the erasure goes out again.
    again = hub.tools["hubspot"].state.add_people(1)[0]
    again.email = "person6@example.com"
    with write_transaction(hub.db) as conn:
        assert resend_erasure(conn, "hubspot", email=again.email, external_id=str(again.id))
    assert (await relay(hub.settings, hub.db)).sent == 1
    assert hub.tools["hubspot"].state.by_email("person6@example.com") is None


async def test_connectors_without_writeback_get_nothing(tmp_path: Path, sqlite_url: str) -> None:
    with ExitStack() as stack:
        hub = _hub(tmp_path, sqlite_url, stack, consent=False)
        await hub.sync()
        hub.tools["mailchimp"].state.touch([1], status="unsubscribed")
        await hub.sync("mailchimp")
        assert hub.rows() == []


def test_cli_sync_pushes_and_outbox_lists_without_addresses(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    with running("mailchimp") as mc, running("hubspot") as hs:
        for tool in (mc, hs):
            tool.state.add_people(3)
        mc.state.touch([1], status="unsubscribed")
        lines = [f'[store]\nurl = "sqlite:///{tmp_path / "crm.db"}"\n[matching]\nmethod = "exact"']
        for name, tool in (("mc", mc), ("hs", hs)):
            lines.append(f"[connectors.{name}]")
            for key, value in VENDORS[tool.vendor.kind].config(tool.url, TOKEN).items():
                lines.append(f"{key} = {json.dumps(value)}")
            lines.append("writeback = { consent = true }")
        config = tmp_path / "crmhub.toml"
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRMHUB_")}

        def cli(*args: str) -> Any:
            done = subprocess.run(
                [sys.executable, "-m", "crmhub", "--config", str(config), *args, "--json"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        synced = cli("sync")
        assert synced["outbox"]["sent"] == 1  # the Mailchimp opt-out, pushed to HubSpot
        assert hs.state.people[1].status == "unsubscribed"
        listed = cli("outbox")
        assert listed["counts"] == {"pending": 0, "sent": 1, "failed": 0}
        assert listed["rows"][0]["connector"] == "hs"
        assert "person1@example.com" not in json.dumps(listed)
        assert cli("outbox", "relay")["claimed"] == 0


async def test_the_relay_paces_itself_under_the_accounts_rate_budget(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The vendor enforces 10 requests/s; the budget is 10/s: no 429, and no faster."""
    with running("mailchimp") as mc, running("hubspot") as hs:
        for tool in (mc, hs):
            tool.state.add_people(25)
        table = {}
        for name, tool, rate in (("mc", mc, 10_000), ("hs", hs, 10)):
            table[name] = {
                **VENDORS[tool.vendor.kind].config(tool.url, TOKEN),
                "rate_limit": rate,
                "writeback": {"consent": True},
            }
        settings = make_settings(tmp_path, sqlite_url, table)
        settings.matching.method = "exact"
        db = make_engine(sqlite_url)
        engine = SyncEngine(settings, db)
        await engine.run("hs")
        await engine.run("mc")
        mc.state.touch(list(range(1, 21)), status="unsubscribed")
        await engine.run("mc")
        hs.state.enforce_rate = 10
        hs.state.statuses.clear()
        started = datetime.now(UTC)
        report = await relay(settings, db)
        seconds = (datetime.now(UTC) - started).total_seconds()
        db.dispose()
    assert report.sent == 20
    assert 429 not in hs.state.statuses
    assert seconds >= 1.5  # 20 requests at 10/s with a burst of one


async def test_refused_credentials_keep_the_push_queued(lite_hub: Hub) -> None:
    from tests.fakes.server import Fault

    hub = lite_hub
    await hub.sync()
    hub.tools["hubspot"].state.faults.append(Fault(401, path="unsubscribe-all"))
    hub.tools["mailchimp"].state.touch([1], status="unsubscribed")
    await hub.sync("mailchimp")
    report = await relay(hub.settings, hub.db)
    assert (report.sent, report.retried, report.failed) == (2, 1, 0)
    (waiting,) = hub.rows(status="pending")
    assert "credentials were refused" in waiting.last_error
    later = datetime.now(UTC) + timedelta(hours=1)
    assert (await relay(hub.settings, hub.db, now=lambda: later)).sent == 1
    assert hub.tools["hubspot"].state.people[1].status == "unsubscribed"


async def test_forget_tells_every_tool_and_a_re_pull_re_sends_the_erasure(hub: Hub) -> None:
    """The whole loop through the real entry points: `forget` enqueues the erasures in its
    own transaction, and a later pull that meets the person again re-sends one (the engine's
    suppression check), without re-creating them."""
    from sync.erasure import forget

    await hub.sync()
    forget(hub.db, "person6@example.com", "admin")
    assert (await relay(hub.settings, hub.db)).sent == 4
    again = hub.tools["hubspot"].state.add_people(1)[0]
    again.email = "person6@example.com"
    result = await hub.engine.run("hubspot", full=True)
    assert result.counts.suppressed == 1
    assert (await relay(hub.settings, hub.db)).sent == 1
    assert hub.tools["hubspot"].state.by_email("person6@example.com") is None
    with pytest.raises(AssertionError, match="no golden record"):
        hub.golden_of("person6@example.com")


async def test_the_workers_cron_job_relays_the_outbox(hub: Hub) -> None:
    """The arq cron job (`relay_outbox`) is the same relay: a worker delivers what waits."""
    from sync.jobs import JOB_RELAY, relay_outbox, worker_settings

    assert JOB_RELAY in {c.name for c in worker_settings(hub.settings)["cron_jobs"]}
    await hub.sync()
    with write_transaction(hub.db) as conn:
        assert enqueue_erasure(conn, hub.golden_of("person6@example.com")) == 4
    report = await relay_outbox({"settings": hub.settings, "db": hub.db})
    assert (report["sent"], report["failed"]) == (4, 0)
    again = await relay_outbox({"settings": hub.settings, "db": hub.db})
    assert (again["claimed"], again["sent"]) == (0, 0)  # delivered once, nothing left
