"""The Gmail connector against the fake Gmail API over loopback HTTP, through the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.gmail import GmailConnector
from crmhub.errors import AuthError, PermanentError, TransientError
from sync.engine import SyncEngine
from tests.connectors.mail import close, engine_for, make_connector, totals
from tests.fakes import gmail
from tests.fakes.server import FakeServer, Fault


@pytest.fixture
def fake() -> Iterator[tuple[gmail.GmailState, str]]:
    state = gmail.GmailState("unused")
    with FakeServer(gmail.make_app(state)) as server:
        yield state, server.url


def table(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "gmail",
        "base_url": url + "/gmail/v1",
        "token_url": url + "/token",
        "client_id": gmail.CLIENT_ID,
        "client_secret": gmail.CLIENT_SECRET,
        "refresh_token": gmail.REFRESH,
        "internal_domains": ["crmhub.test"],
        "rate_limit": 10_000,
        **extra,
    }


def gmail_engine(tmp_path: Path, sqlite_url: str, url: str, **extra: Any) -> SyncEngine:
    return engine_for(tmp_path, sqlite_url, g=table(url, **extra))


async def test_list_first_then_history_only(fake: Any, tmp_path: Path, sqlite_url: str) -> None:
    state, url = fake
    state.add_messages(23)
    engine = gmail_engine(tmp_path, sqlite_url, url, page_size=10)
    first = await engine.run("g")
    assert (first.counts.activities, first.counts.contacts) == (23, 23)
    assert state.requests.count("/gmail/v1/users/me/messages") == 3
    state.requests.clear()
    assert (await engine.run("g")).counts.pulled == 0
    state.add_messages(4)
    third = await engine.run("g")
    assert third.counts.activities == 4
    assert "/gmail/v1/users/me/messages" not in state.requests  # no listing: history only
    assert "/gmail/v1/users/me/history" in state.requests
    assert totals(engine.db)["activities"] == 27
    close(engine)


async def test_expired_history_id_falls_back_to_full_sync_without_doubles(
    fake: Any, tmp_path: Path, sqlite_url: str
) -> None:
    state, url = fake
    state.add_messages(12)
    engine = gmail_engine(tmp_path, sqlite_url, url)
    await engine.run("g")
    state.add_messages(3)
    state.expire_history()
    result = await engine.run("g")
    assert result.counts.activities == 15  # everything listed again ...
    assert result.counts.new == 6  # ... only the 3 new messages and senders are new
    assert totals(engine.db)["activities"] == 15
    close(engine)


async def test_token_expiring_mid_run_is_refreshed_once(fake: Any, tmp_path: Path) -> None:
    state, url = fake
    state.add_messages(30)
    connector = make_connector(table(url, page_size=10), tmp_path)
    seen = 0
    async for page in connector.pull("activities", None):
        seen += sum(r.kind == "activity" for r in page.records)
        state.expire_tokens()  # the access token dies between pages
    assert seen == 30
    assert state.refreshes == 3  # the first token, then one refresh after each 401
    assert state.statuses.count(401) == 2


async def test_429_and_403_rate_limits_are_retried(
    fake: Any, tmp_path: Path, sqlite_url: str
) -> None:
    state, url = fake
    state.add_messages(8)
    state.faults = [
        Fault(429, path="/messages/"),
        Fault(403, path="/messages/"),
        Fault(429, retry_after="0", path="/messages"),
    ]
    engine = gmail_engine(tmp_path, sqlite_url, url)
    result = await engine.run("g")
    assert result.counts.activities == 8
    assert state.statuses.count(429) == 2
    assert state.statuses.count(403) == 1
    close(engine)


async def test_message_gets_run_concurrently_up_to_the_setting(fake: Any, tmp_path: Path) -> None:
    state, url = fake
    state.add_messages(24)
    state.get_delay = 0.05
    connector = make_connector(table(url, concurrency=4), tmp_path)
    pages = [p async for p in connector.pull("activities", None)]
    assert sum(r.kind == "activity" for p in pages for r in p.records) == 24
    assert state.max_in_flight == 4


async def test_a_failed_get_leaves_no_request_running(fake: Any, tmp_path: Path) -> None:
    # One get fails for good while its siblings are still waiting on the server: the pull
    # raises only once they are cancelled, so none outlives the connector's HTTP client.
    state, url = fake
    broken, *_ = state.add_messages(8)
    state.get_delay = 0.3
    state.faults = [Fault(400, path=f"/messages/{broken.id}")]
    connector = make_connector(table(url, concurrency=8), tmp_path)
    with pytest.raises(PermanentError):
        [p async for p in connector.pull("activities", None)]
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_concurrent_gets_stay_within_the_per_user_quota(fake: Any, tmp_path: Path) -> None:
    # Gmail: 15,000 quota units per user per minute, a messages.get costs 5. The default
    # budget of 40 requests/s spends at most 200 units/s on gets.
    assert GmailConnector.default_rate * 5 <= 15_000 / 60
    state, url = fake
    state.add_messages(24)
    # The fake's quota is real: 10 unpaced gets at a time overrun 25 units/s (5 gets/s; low,
    # so that even a slow, busy machine sends faster than that) ...
    state.unit_quota = 25
    unpaced = make_connector(table(url, concurrency=10), tmp_path)
    with contextlib.suppress(TransientError):
        [p async for p in unpaced.pull("activities", None)]
    assert 429 in state.statuses
    await asyncio.sleep(1.0)  # the quota window empties
    state.statuses.clear()
    # ... and, scaled down to a quota of 100 units/s (20 gets/s), the same 10-at-a-time
    # gets under a 16 requests/s budget never overrun it.
    state.unit_quota = 100
    paced = make_connector(table(url, concurrency=10, rate_limit=16), tmp_path)
    started = time.monotonic()
    pages = [p async for p in paced.pull("activities", None)]
    assert sum(r.kind == "activity" for p in pages for r in p.records) == 24
    assert 429 not in state.statuses
    assert time.monotonic() - started >= 24 / 16


async def test_revoked_refresh_token_is_one_clear_auth_error(fake: Any, tmp_path: Path) -> None:
    state, url = fake
    state.add_messages(2)
    connector = make_connector(table(url, refresh_token="1//revoked-SECRET"), tmp_path)
    with pytest.raises(AuthError, match=r"invalid_grant.*'refresh_token'") as caught:
        [p async for p in connector.pull("activities", None)]
    assert "SECRET" not in str(caught.value)
    assert state.requests == ["/token"]  # no retry storm


async def test_filters_and_bad_headers(fake: Any, tmp_path: Path) -> None:
    state, url = fake
    state.add_message(sender="Col <col@crmhub.test>", to="Dee <dee@client.example>")
    state.add_message(sender="Shop <no-reply@shop.example>")
    state.add_message(sender="News <n@list.example>", extra=[("Precedence", "bulk")])
    state.add_message(labels=["SPAM"])
    undated = state.add_message(sender="Uma <uma@crmhub.test>")
    undated.headers = [h for h in undated.headers if h[0] != "Date"]
    state.add_message(message_id=None, sender="=?utf-8?B?SsO8cmdlbg==?= <j@client.example>")
    connector = make_connector(table(url), tmp_path)
    pages = [p async for p in connector.pull("activities", None)]
    acts = [r for p in pages for r in p.records if r.kind == "activity"]
    contacts = sorted(r.external_id for p in pages for r in p.records if r.kind == "contact")
    assert len(acts) == 5  # spam is skipped
    by_subject = {a.payload["subject"]: a for a in acts}
    assert by_subject[f"Deal {len(state.messages) - 1}"].updated_at == undated.internal
    assert contacts == ["dee@client.example", "j@client.example"]
    derived = next(a for a in acts if a.payload["from"]["email"] == "j@client.example")
    assert derived.external_id.startswith("sha:")
    assert derived.payload["from"]["name"] == "Jürgen"
    assert derived.payload["excerpt"] == "Hello & welcome"


async def test_expired_list_page_token_restarts_the_listing(fake: Any, tmp_path: Path) -> None:
    state, url = fake
    state.add_messages(7)
    connector = make_connector(table(url), tmp_path)
    stale = {"history_id": "5", "page_token": "expired-token"}
    pages = [p async for p in connector.pull("activities", stale)]
    assert sum(r.kind == "activity" for p in pages for r in p.records) == 7
    assert pages[-1].next_cursor == {"history_id": str(state.history_id)}
    assert 400 in state.statuses


@pytest.mark.parametrize(
    ("reason", "throttled"),
    [
        ("rateLimitExceeded", True),
        ("userRateLimitExceeded", True),
        ("dailyLimitExceeded", True),
        ("insufficientPermissions", False),
        ("domainPolicy", False),
    ],
)
def test_403_is_throttling_only_for_googles_rate_reasons(reason: str, throttled: bool) -> None:
    from connectors.oauth import _rate_limited

    body = gmail.gerror(403, "PERMISSION_DENIED", "refused", reason, "usageLimits")
    assert _rate_limited(httpx.Response(403, json=body)) is throttled
