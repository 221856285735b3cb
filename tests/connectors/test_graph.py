"""The Microsoft Graph connector against the fake Graph over loopback HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors import ConnectorContext, get_connector_class
from crmhub.errors import AuthError
from sync.engine import SyncEngine
from sync.migrate import upgrade
from sync.queries import store_totals
from sync.store import make_engine
from tests.conftest import make_settings
from tests.fakes import graph
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


def engine_for(tmp_path: Path, url: str, **extra: Any) -> SyncEngine:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 's.db'}", {"o": table(url, **extra)})
    db = make_engine(settings.store.url)
    upgrade(db)
    return SyncEngine(settings, db)


def activities(engine: SyncEngine) -> int:
    with engine.db.connect() as conn:
        return store_totals(conn)["activities"]


def connector(url: str, tmp_path: Path, **extra: Any) -> Any:
    cls = get_connector_class("graph")
    return cls(cls.Config(**table(url, **extra)), ConnectorContext("o", tmp_path))


async def test_delta_round_then_delta_link_only(fake: Any, tmp_path: Path) -> None:
    state, url = fake
    oldest = state.add_message("inbox")
    for _ in range(24):
        state.add_message("inbox")
    for _ in range(5):
        state.add_message(
            "sentitems", sender=("Rep", graph.OWNER), to=[("Bo", "bo@client.example")]
        )
    engine = engine_for(tmp_path, url, page_size=10)
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
    assert activities(engine) == 31
    engine.close()
    engine.db.dispose()


async def test_expired_delta_token_410_restarts_the_round_without_doubles(
    fake: Any, tmp_path: Path
) -> None:
    state, url = fake
    for _ in range(8):
        state.add_message("inbox")
    engine = engine_for(tmp_path, url, folders=["inbox"])
    await engine.run("o")
    state.add_message("inbox")
    state.expire_delta_tokens()
    result = await engine.run("o")
    assert 410 in state.statuses
    assert result.counts.activities == 9
    assert result.counts.new == 2
    assert activities(engine) == 9
    engine.close()
    engine.db.dispose()


async def test_throttling_429_retry_after_and_token_refresh(fake: Any, tmp_path: Path) -> None:
    state, url = fake
    for _ in range(12):
        state.add_message("inbox")
    state.faults = [Fault(429, retry_after="1", path=DELTA.format("inbox"))]
    imap = connector(url, tmp_path, folders=["inbox"], page_size=5)
    seen = 0
    async for page in imap.pull("activities", None):
        seen += sum(r.kind == "activity" for r in page.records)
        state.access.clear()  # tokens revoked between pages: one refresh each time
    assert seen == 12
    assert state.statuses.count(429) == 1
    assert state.refreshes == 3  # the first token + one refresh before each later page


async def test_resume_mid_round_from_the_next_link(fake: Any, tmp_path: Path) -> None:
    state, url = fake
    for _ in range(12):
        state.add_message("inbox")
    imap = connector(url, tmp_path, folders=["inbox"], page_size=5)
    pages = imap.pull("activities", None)
    first = await anext(pages)
    await pages.aclose()  # the run dies after one committed page
    assert "$skiptoken" in first.next_cursor["folders"]["inbox"]
    rest = [p async for p in imap.pull("activities", first.next_cursor)]
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
    broken = state.add_message()
    broken["from"] = {"name": "no emailAddress object"}
    pages = [p async for p in connector(url, tmp_path, folders=["inbox"]).pull("activities", None)]
    rejects = [r for p in pages for r in p.rejects]
    assert [(origin, reason.split(":")[0]) for origin, reason, _ in rejects] == [
        (f"graph inbox message {broken['id']}", "unreadable message")
    ]
    contacts = [r for p in pages for r in p.records if r.kind == "contact"]
    acts = [r for p in pages for r in p.records if r.kind == "activity"]
    assert contacts == []
    assert len(acts) == 3
    assert acts[2].external_id.startswith("sha:")
    with pytest.raises(AuthError, match="'refresh_token'") as caught:
        [
            p
            async for p in connector(url, tmp_path, refresh_token="M.bad-SECRET").pull(
                "activities", None
            )
        ]
    assert "SECRET" not in str(caught.value)
