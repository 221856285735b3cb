"""Per-vendor behaviour the contract suite does not cover."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
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


def test_tokens_never_reach_cli_output(tmp_path: Path) -> None:
    """`sync --json`, `connectors check`, `runs --json`, `errors --json` and `connectors list
    --json` for all four, run as a user runs them (the token from the environment), with a
    good token and a revoked one. About a second per command."""
    from tests.test_cli import run

    with contextlib.ExitStack() as stack:
        config = ""
        for kind in sorted(VENDORS):
            vendor = stack.enter_context(running(kind))
            vendor.state.add_people(30)
            table = {**vendor.vendor.config(vendor.url, "${SRC_SECRET}"), "page_size": 10}
            config += f"[connectors.{kind}]\n"
            config += "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
        (tmp_path / "crmhub.toml").write_text(config, encoding="utf-8")
        good, revoked = {"SRC_SECRET": TOKEN}, {"SRC_SECRET": "revoked-" + TOKEN}
        synced = run("sync", "--json", cwd=tmp_path, env=good)
        assert synced.returncode == 0, synced.stderr
        assert [r["counts"]["contacts"] for r in json.loads(synced.stdout)["runs"]] == [30] * 4
        refused = run("sync", "--json", cwd=tmp_path, env=revoked)
        assert refused.returncode == 1
        checked = [run("connectors", "check", k, cwd=tmp_path, env=revoked) for k in VENDORS]
        for kind, result in zip(VENDORS, checked, strict=True):
            assert result.returncode == 1
            # rich wraps long lines
            assert f"setting of connector {kind!r}" in " ".join(result.stderr.split())
        runs = run("runs", "--json", cwd=tmp_path, env=revoked)
        failed = json.loads(runs.stdout)[:4]
        assert {r["state"] for r in failed} == {"failed"}
        assert all("setting of connector" in r["error"] for r in failed)
        listed = [run(*args, cwd=tmp_path, env=good) for args in LISTINGS]
        assert all(o.returncode == 0 for o in listed)
        outputs = [synced, refused, *checked, runs, *listed]
        text = "".join(o.stdout + o.stderr for o in outputs)
        assert TOKEN not in text.replace("\n", "")  # nor split by a wrapped line


LISTINGS = (("errors", "--json"), ("connectors", "list", "--json"))
