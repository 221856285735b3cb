"""The Microsoft Graph connector against the fake Graph over loopback HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from crmhub.errors import AuthError
from sync.engine import SyncEngine
from sync.queries import golden_detail, search_golden
from sync.store import source_record
from tests.connectors.mail import close, engine_for, make_connector, totals
from tests.connectors.test_gmail import table as gmail_table
from tests.fakes import gmail, graph
from tests.fakes.server import FakeServer, Fault

DELTA = "/v1.0/me/mailFolders/{}/messages/delta"


@pytest.fixture
def fake() -> Iterator[tuple[graph.GraphState, str]]:
    state = graph.GraphState("unused")
    with FakeServer(graph.make_app(state)) as server:
        yield state, server.url


def table(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "graph",
        "base_url": url + "/v1.0",
        "token_url": url + "/common/oauth2/v2.0/token",
        "client_id": graph.CLIENT_ID,
        "client_secret": graph.CLIENT_SECRET,
        "refresh_token": graph.REFRESH,
        "internal_domains": ["crmhub.test"],
        "rate_limit": 10_000,
        **extra,
    }


def graph_engine(tmp_path: Path, sqlite_url: str, url: str, **extra: Any) -> SyncEngine:
    return engine_for(tmp_path, sqlite_url, o=table(url, **extra))


def connector(url: str, tmp_path: Path, **extra: Any) -> Any:
    return make_connector(table(url, **extra), tmp_path, "o")


async def test_delta_round_then_delta_link_only(fake: Any, tmp_path: Path, sqlite_url: str) -> None:
    state, url = fake
    oldest = state.add_message("inbox")
    for _ in range(24):
        state.add_message("inbox")
    for _ in range(5):
        state.add_message(
            "sentitems", sender=("Rep", graph.OWNER), to=[("Bo", "bo@client.example")]
        )
    engine = graph_engine(tmp_path, sqlite_url, url, page_size=10)
    first = await engine.run("o")
    assert first.counts.activities == 30
    assert first.counts.contacts == 26  # 25 senders + bo (the owner is not a contact)
    assert (await engine.run("o")).counts.pulled == 0
    state.requests.clear()
    state.add_message("inbox")
    state.delete("inbox", oldest["id"])
    third = await engine.run("o")
    assert third.counts.activities == 1  # the removal is not an activity
    assert state.requests.count(DELTA.format("inbox")) == 1  # one delta page, no full round
    assert totals(engine.db)["activities"] == 31
    close(engine)


@pytest.mark.parametrize("expired", [410, 400])  # Gone, or "a 40X" with syncStateNotFound
async def test_expired_delta_token_restarts_the_round_without_doubles(
    fake: Any, tmp_path: Path, sqlite_url: str, expired: int
) -> None:
    state, url = fake
    for _ in range(8):
        state.add_message("inbox")
    engine = graph_engine(tmp_path, sqlite_url, url, folders=["inbox"])
    await engine.run("o")
    state.add_message("inbox")
    state.expire_delta_tokens()
    state.expired_status = expired
    result = await engine.run("o")
    assert state.statuses.count(expired) == 1
    assert result.counts.activities == 9
    assert result.counts.new == 2
    assert totals(engine.db)["activities"] == 9
    close(engine)


async def test_read_and_flag_changes_add_nothing(
    fake: Any, tmp_path: Path, sqlite_url: str
) -> None:
    state, url = fake
    messages = [state.add_message("inbox") for _ in range(4)]
    engine = graph_engine(tmp_path, sqlite_url, url, folders=["inbox"])
    await engine.run("o")
    # The next round reports both reads: one with the selected fields, one with only
    # id/isRead/parentFolderId (no sender, subject or Message-ID to build anything from).
    state.mark_read("inbox", messages[0]["id"])
    state.mark_read("inbox", messages[1]["id"], partial=True)
    result = await engine.run("o")
    assert result.counts.activities == 1  # the full report, unchanged in the store
    assert (result.counts.new, result.counts.dead_letters) == (0, 0)
    assert totals(engine.db)["activities"] == 4
    with engine.db.connect() as conn:
        ids = conn.execute(
            select(source_record.c.external_id).where(source_record.c.kind == "activity")
        ).scalars()
        assert sorted(ids) == sorted(m["internetMessageId"].strip("<>") for m in messages)
    close(engine)


async def test_throttling_429_retry_after_and_token_refresh(fake: Any, tmp_path: Path) -> None:
    state, url = fake
    for _ in range(12):
        state.add_message("inbox")
    state.faults = [Fault(429, retry_after="1", path=DELTA.format("inbox"))]
    mail = connector(url, tmp_path, folders=["inbox"], page_size=5)
    seen = 0
    started = time.monotonic()
    async for page in mail.pull("activities", None):
        seen += sum(r.kind == "activity" for r in page.records)
        state.access.clear()  # tokens revoked between pages: one refresh each time
    assert seen == 12
    assert state.statuses.count(429) == 1
    assert time.monotonic() - started >= 1.0  # Retry-After: 1 was waited out
    assert state.refreshes == 3  # the first token + one refresh before each later page


async def test_resume_mid_round_from_the_next_link(fake: Any, tmp_path: Path) -> None:
    state, url = fake
    for _ in range(12):
        state.add_message("inbox")
    mail = connector(url, tmp_path, folders=["inbox"], page_size=5)
    pages = mail.pull("activities", None)
    first = await anext(pages)
    await pages.aclose()  # the run dies after one committed page
    assert "$skiptoken" in first.next_cursor["folders"]["inbox"]
    rest = [p async for p in mail.pull("activities", first.next_cursor)]
    ids = [r.external_id for p in [first, *rest] for r in p.records if r.kind == "activity"]
    assert len(ids) == len(set(ids)) == 12


async def test_bad_refresh_token_and_filters(fake: Any, tmp_path: Path) -> None:
    state, url = fake
    state.add_message(sender=("No Reply", "noreply@vendor.example"))
    state.add_message(
        sender=("Digest", "digest@news.example"),
        headers=[{"name": "List-Unsubscribe", "value": "<mailto:u@news.example>"}],
    )
    state.add_message(sender=("Col", "col@crmhub.test"), message_id=None)
    reply = state.add_message(
        sender=("Ann Lee", "ann@customer.example"),
        headers=[
            {"name": "Received", "value": "from mx.customer.example"},
            {"name": "From", "value": "Someone Else <else@elsewhere.example>"},
            {"name": "References", "value": "<root@customer.example> <mid@customer.example>"},
            {"name": "In-Reply-To", "value": "<mid@customer.example>"},
        ],
    )
    broken = state.add_message()
    broken["from"] = {"name": "no emailAddress object"}
    pages = [p async for p in connector(url, tmp_path, folders=["inbox"]).pull("activities", None)]
    rejects = [r for p in pages for r in p.rejects]
    assert [(origin, reason.split(":")[0]) for origin, reason, _ in rejects] == [
        (f"graph inbox message {broken['id']}", "unreadable message")
    ]
    contacts = [r.external_id for p in pages for r in p.records if r.kind == "contact"]
    acts = [r for p in pages for r in p.records if r.kind == "activity"]
    # The no-reply sender, the List-Unsubscribe sender (a header Graph returns only when
    # selected) and the colleague are not contacts.
    assert contacts == ["ann@customer.example"]
    assert len(acts) == 4
    assert acts[2].external_id.startswith("sha:")
    threaded = acts[3].payload
    assert threaded["message_id"] == reply["internetMessageId"].strip("<>")
    assert threaded["thread_id"] == "root@customer.example"
    assert threaded["from"] == {"name": "Ann Lee", "email": "ann@customer.example"}
    with pytest.raises(AuthError, match="'refresh_token'") as caught:
        [
            p
            async for p in connector(url, tmp_path, refresh_token="M.bad-SECRET").pull(
                "activities", None
            )
        ]
    assert "SECRET" not in str(caught.value)


async def test_one_message_in_a_gmail_and_an_outlook_mailbox_is_one_timeline_entry(
    fake: Any, tmp_path: Path, sqlite_url: str
) -> None:
    """Message-ID is the identity across connectors: Graph's `internetMessageId` and Gmail's
    Message-ID header name the same activity, and the timeline shows it once."""
    state, url = fake
    state.add_message(sender=("Ann Lee", "ann@customer.example"), message_id="<deal-7@ann.example>")
    gmail_state = gmail.GmailState("unused")
    gmail_state.add_message(
        sender="Ann Lee <ann@customer.example>", message_id="<deal-7@ann.example>"
    )
    with FakeServer(gmail.make_app(gmail_state)) as gmail_server:
        engine = engine_for(
            tmp_path,
            sqlite_url,
            o=table(url, folders=["inbox"]),
            g=gmail_table(gmail_server.url, internal_domains=["crmhub.test"], rate_limit=10_000),
        )
        await engine.run("o")
        await engine.run("g")
    with engine.db.connect() as conn:
        staged = conn.execute(
            select(source_record.c.source).where(
                source_record.c.kind == "activity",
                source_record.c.external_id == "deal-7@ann.example",
            )
        ).scalars()
        assert sorted(staged) == ["g", "o"]  # each mailbox keeps its copy (lineage) ...
        [found] = search_golden(conn, "ann@customer.example")
        detail = golden_detail(conn, found["id"])
    assert detail is not None
    assert [t["subject"] for t in detail["timeline"]] == ["Deal 1"]  # ... shown once
    close(engine)
