"""Consent end to end: a Mailchimp opt-out (fake Mailchimp over HTTP) and web-form consents
(JSON Lines) through the real pipeline; the golden record's consent, its source and date in
the store, the REST API and the steward page; and no re-subscribe pushed to Mailchimp."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

import sync.store
from crmhub.cli.app import app as cli_app
from crmhub.web import create_app
from sync.engine import SyncEngine
from sync.queries import golden_detail
from sync.store import make_engine, membership, outbox
from sync.users import add_user, create_token
from tests.conftest import make_settings
from tests.connectors.vendors import TOKEN, VENDORS, Running, running

PASSWORD = "correct horse battery"
OPT_OUT = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


@dataclass
class Setup:
    engine: SyncEngine
    db: Engine
    mailchimp: Running
    forms: Path

    async def sync(self, name: str) -> None:
        result = await self.engine.run(name)
        assert result.state == "succeeded", result.error

    def submit(self, sid: str, when: str, consent: str | None) -> None:
        fields: dict[str, Any] = {"name": "First1 Last1", "email": "person1@example.com"}
        if consent is not None:
            fields["consent"] = consent
        line = {"submission_id": sid, "form": "signup", "submitted_at": when, "fields": fields}
        with self.forms.open("a") as fh:
            fh.write(json.dumps(line) + "\n")

    def consent(self) -> dict[str, Any]:
        with self.db.connect() as conn:
            (golden_id,) = set(conn.execute(select(membership.c.golden_id)).scalars())
            detail = golden_detail(conn, golden_id)
        assert detail is not None
        return detail["consent"]


@pytest.fixture
def setup(tmp_path: Path, store_url: str) -> Iterator[Setup]:
    with running("mailchimp") as mailchimp:
        (person,) = mailchimp.state.add_people(1)
        mailchimp.state.touch([person.id], at=OPT_OUT, status="unsubscribed")
        forms = tmp_path / "forms.jsonl"
        forms.write_text("")
        settings = make_settings(
            tmp_path,
            store_url,
            {
                "mailchimp": {
                    **VENDORS["mailchimp"].config(mailchimp.url, TOKEN),
                    "rate_limit": 10_000,
                    "writeback": {"consent": True},
                },
                "signup": {"type": "jsonl", "path": str(forms)},
            },
        )
        settings.matching.method = "exact"
        db = make_engine(store_url)
        try:
            yield Setup(SyncEngine(settings, db), db, mailchimp, forms)
        finally:
            db.dispose()


async def test_only_a_later_explicit_consent_lifts_an_opt_out(setup: Setup) -> None:
    await setup.sync("mailchimp")
    mailchimp_out = {"status": "unsubscribed", "at": OPT_OUT.isoformat(), "source": "mailchimp"}
    assert setup.consent().items() >= mailchimp_out.items()

    # An opt-in given before the opt-out, and a later form without a consent box: no change.
    setup.submit("F-1", "2026-02-20T12:00:00Z", "yes")
    setup.submit("F-2", "2026-03-05T12:00:00Z", None)
    await setup.sync("signup")
    assert setup.consent().items() >= mailchimp_out.items()

    # A new explicit consent after the opt-out lifts it, with its own source and date.
    setup.submit("F-3", "2026-03-10T08:00:00Z", "yes")
    await setup.sync("signup")
    lifted = setup.consent()
    assert lifted["status"] == "subscribed"
    assert lifted["at"] == "2026-03-10T08:00:00+00:00"
    assert (lifted["source"], lifted["external_id"]) == ("signup", "F-3")
    # The re-consent is not pushed: Mailchimp keeps its unsubscribe (docs/connectors.md).
    await setup.sync("mailchimp")
    with setup.db.connect() as conn:
        assert conn.execute(select(outbox)).all() == []
    assert setup.mailchimp.state.people[1].status == "unsubscribed"

    # Mailchimp gives no time for an unsubscribe, so its last_changed stands in: a later edit
    # there restates the opt-out, and it wins again (restrictive when in doubt).
    setup.mailchimp.state.touch([1], at=datetime(2026, 3, 20, tzinfo=UTC), first="Ann")
    await setup.sync("mailchimp")
    assert setup.consent()["status"] == "unsubscribed"
    assert setup.consent()["at"] == "2026-03-20T00:00:00+00:00"


async def test_the_golden_page_api_and_cli_show_consent_with_source_and_date(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await setup.sync("mailchimp")
    setup.submit("F-9", "2026-04-01T07:15:00Z", "opted_in")
    await setup.sync("signup")
    with setup.db.connect() as conn:
        (golden_id,) = set(conn.execute(select(membership.c.golden_id)).scalars())
    add_user(setup.db, "viewer", PASSWORD, "viewer")
    token = create_token(setup.db, "viewer", "tests")
    app = create_app(setup.engine.settings, setup.db)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://crmhub") as client:
        api = await client.get(
            f"/api/v1/golden/{golden_id}", headers={"Authorization": f"Bearer {token}"}
        )
        assert api.status_code == 200
        body = api.json()
        assert body["consent"] == {
            "status": "subscribed",
            "at": "2026-04-01T07:15:00+00:00",
            "source": "signup",
            "external_id": "F-9",
            "record_id": body["lineage"]["consent"]["record_id"],
        }
        assert body["fields"]["consent_at"] == "2026-04-01T07:15:00+00:00"

        login = await client.post("/login", data={"name": "viewer", "password": PASSWORD})
        assert login.status_code == 303
        page = await client.get(f"/golden/{golden_id}")
        assert page.status_code == 200
    row = re.search(r'<tr class="consent">(.*?)</tr>', page.text, re.S)
    assert row is not None
    cells = re.sub(r"<[^>]+>", "|", row.group(1))
    assert "subscribed" in cells
    assert "— 2026-04-01 07:15" in cells
    assert "signup:F-9" in cells
    assert "consent_at" not in page.text  # shown on the consent row, not as a field of its own

    config = tmp_path / "cli.toml"
    config.write_text(f"[store]\nurl = {json.dumps(str(setup.db.url.render_as_string(False)))}\n")
    opened: list[Engine] = []

    def keep(*args: Any, **kwargs: Any) -> Engine:  # the CLI leaves disposal to process exit
        opened.append(make_engine(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(sync.store, "make_engine", keep)
    shown = CliRunner().invoke(
        cli_app, ["--config", str(config), "golden", "show", str(golden_id)], env={"COLUMNS": "160"}
    )
    for engine in opened:
        engine.dispose()
    assert shown.exit_code == 0, shown.output
    (line,) = [ln for ln in shown.stdout.splitlines() if " consent " in ln]
    assert "subscribed — 2026-04-01 07:15" in line
    assert "signup:F-9" in line


async def test_a_new_opt_out_reaches_a_tool_that_re_subscribed_after_our_push(
    tmp_path: Path, sqlite_url: str
) -> None:
    from sync.outbox import relay

    with running("mailchimp") as mailchimp, running("klaviyo") as klaviyo:
        tools = {"mailchimp": mailchimp, "klaviyo": klaviyo}
        table = {}
        for name, tool in tools.items():
            tool.state.add_people(1)
            table[name] = {
                **VENDORS[name].config(tool.url, TOKEN),
                "rate_limit": 10_000,
                "writeback": {"consent": True},
            }
        settings = make_settings(tmp_path, sqlite_url, table)
        settings.matching.method = "exact"
        db = make_engine(sqlite_url)
        engine = SyncEngine(settings, db)

        def pending() -> list[str]:
            with db.connect() as conn:
                return [r.connector for r in conn.execute(select(outbox)) if r.status == "pending"]

        try:
            for name in tools:
                await engine.run(name)
            mailchimp.state.touch([1], status="unsubscribed")
            await engine.run("mailchimp")
            assert pending() == ["klaviyo"]
            await relay(settings, db)
            assert klaviyo.state.people[1].status == "unsubscribed"

            # The person re-subscribes in Klaviyo (dated, after our push): golden lifts, and
            # nothing is pushed to Mailchimp.
            later = max(datetime.now(UTC), klaviyo.state.clock) + timedelta(minutes=1)
            klaviyo.state.touch([1], at=later, status="subscribed")
            await engine.run("klaviyo")
            assert pending() == []
            # Mailchimp restates its opt-out later (an edit moves last_changed, its only date
            # for an unsubscribe): Klaviyo, told once before, is told again.
            mailchimp.state.touch([1], at=later + timedelta(minutes=1), first="Ann")
            await engine.run("mailchimp")
            assert pending() == ["klaviyo"]
            await relay(settings, db)
            assert klaviyo.state.people[1].status == "unsubscribed"
            await engine.run("klaviyo")
            assert pending() == []  # its echo changes nothing
        finally:
            db.dispose()
