"""Per-vendor behaviour the contract suite does not cover."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from connectors.registry import available_connectors
from crmhub.errors import SettingsError
from tests.connectors.test_contract import ids, pull_all
from tests.connectors.vendors import TOKEN, VENDORS, Running, running
from tests.fakes import hubspot, klaviyo
from tests.fakes.server import FakeServer, FakeState


def test_all_four_are_registered() -> None:
    known = available_connectors()
    for kind in VENDORS:
        assert known[kind].kind == kind


async def test_hubspot_never_pages_into_the_search_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeking from the watermark keeps `after` small, so the 10k cap is never reached."""
    monkeypatch.setattr(hubspot, "SEARCH_CAP", 150)
    with running("hubspot") as vendor:
        vendor.state.add_people(700)
        got = ids(await pull_all(vendor.connector(page_size=100)))
        assert len(got) == 700


async def test_hubspot_records_edited_while_paging_are_not_lost() -> None:
    with running("hubspot") as vendor:
        vendor.state.add_people(300)
        connector = vendor.connector(page_size=50)
        got: list[str] = []
        async for page in connector.pull("contacts", None):
            got += [r.external_id for r in page.records if r.kind == "contact"]
            if len(got) == 100:
                vendor.state.touch([10, 20, 30])  # already read: they move to the end
        assert set(got) == {str(i) for i in range(1, 301)}


async def test_klaviyo_expired_page_cursor_restarts_from_the_watermark() -> None:
    state = FakeState(TOKEN)
    state.add_people(250)
    expired: set[str] = set()
    issued: list[str] = []
    app = klaviyo.make_app(state, expired_cursors=expired, issued_cursors=issued)
    with FakeServer(app) as server:
        run = Running(VENDORS["klaviyo"], state, server.url)
        got: list[str] = []
        pages = 0
        async for page in run.connector(page_size=50).pull("contacts", None):
            got += [r.external_id for r in page.records]
            pages += 1
            if pages == 2:
                expired.update(issued)  # every cursor so far stops working
        assert len(got) == 250
        assert set(got) == run.want(range(1, 251))
        assert state.statuses.count(400) == 1


def test_mailchimp_needs_a_datacenter_or_base_url() -> None:
    cls = available_connectors()["mailchimp"]
    from connectors.base import ConnectorContext

    config = cls.Config.model_validate({"type": "mailchimp", "api_key": "nodc", "list_id": "x"})
    connector: Any = cls(config, ConnectorContext("mc", base_dir=__import__("pathlib").Path(".")))
    with pytest.raises(SettingsError, match="datacenter"):
        connector.base_url()
    config = cls.Config.model_validate({"type": "mailchimp", "api_key": "abc-us7", "list_id": "x"})
    assert cls(config, connector.context).base_url() == "https://us7.api.mailchimp.com/3.0"


@pytest.mark.parametrize("kind", sorted(VENDORS))
async def test_tokens_never_reach_logs_or_errors(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with running(kind) as vendor:
        vendor.state.add_people(20)
        vendor.state.fault_rate = 0.5
        wrong = "wrong-" + TOKEN
        messages = []
        for token in (TOKEN, wrong):
            try:
                await pull_all(vendor.connector(token=token))
                await vendor.connector(token=token).check()
            except Exception as exc:
                messages.append(f"{exc!s} {exc!r} {getattr(exc, 'context', '')}")
        text = caplog.text + "\n".join(messages)
        assert TOKEN not in text
        assert TOKEN not in repr(vendor.connector().config)


@pytest.mark.redis
async def test_redis_rate_budget_through_a_connector() -> None:
    import os

    from redis.asyncio import Redis

    from connectors.base import ConnectorContext

    url = os.environ.get("CRMHUB_TEST_REDIS", "redis://127.0.0.1:6379/15")
    client = Redis.from_url(url)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis is required under CI=true: {exc}")
        pytest.skip(f"no Redis at {url}: {exc}")
    with running("hubspot") as vendor:
        vendor.state.add_people(30)
        cls = available_connectors()["hubspot"]
        config = cls.Config.model_validate(
            {
                **vendor.vendor.config(vendor.url, TOKEN),
                "rate_budget": "redis",
                "rate_limit": 20,
                "page_size": 10,
            }
        )
        connector: Any = cls(
            config,
            ConnectorContext(
                "hs_redis", base_dir=__import__("pathlib").Path("."), extras={"redis_url": url}
            ),
        )
        try:
            got = ids(await pull_all(connector))
            assert len(got) == 30
            keys = [k async for k in client.scan_iter("crmhub:ratelimit:hubspot:127.0.0.1*")]
            assert keys
        finally:
            async for key in client.scan_iter("crmhub:ratelimit:hubspot:127.0.0.1*"):
                await client.delete(key)
            await client.aclose()
