"""One row per HTTP connector kind: its fake app and how to configure the connector."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from starlette.types import ASGIApp

from connectors.base import Connector, ConnectorContext
from connectors.registry import get_connector_class
from tests.fakes import activecampaign, hubspot, klaviyo, mailchimp
from tests.fakes.server import FakeServer, FakeState

TOKEN = "canary-SECRET-token-9f8e7d"


@dataclass(frozen=True)
class Vendor:
    kind: str
    make_app: Callable[[FakeState], ASGIApp]
    config: Callable[[str, str], dict[str, Any]]
    # Largest page the connector may ask for; tests use smaller ones.
    max_page: int
    # The external id the connector should give person `n` of the fake.
    external_id: Callable[[int], str] = str
    # How many activity records the fake's events become (None: no activity stream).
    activity_count: Callable[[FakeState], int] | None = lambda s: len(s.events)


VENDORS: dict[str, Vendor] = {
    "hubspot": Vendor(
        "hubspot",
        hubspot.make_app,
        lambda url, token: {"type": "hubspot", "base_url": url, "token": token},
        200,
    ),
    "mailchimp": Vendor(
        "mailchimp",
        mailchimp.make_app,
        lambda url, token: {
            "type": "mailchimp",
            "base_url": url + "/3.0",
            "api_key": token,
            "list_id": mailchimp.LIST_ID,
        },
        1000,
        external_id=lambda n: hashlib.md5(f"person{n}@example.com".encode()).hexdigest(),
        activity_count=lambda s: sum(e.kind != "sent" for e in s.events),
    ),
    "activecampaign": Vendor(
        "activecampaign",
        activecampaign.make_app,
        lambda url, token: {"type": "activecampaign", "base_url": url, "api_token": token},
        100,
        activity_count=None,
    ),
    "klaviyo": Vendor(
        "klaviyo",
        klaviyo.make_app,
        lambda url, token: {"type": "klaviyo", "base_url": url + "/api", "api_key": token},
        100,
        external_id=lambda n: f"01P{n:023d}",
    ),
}


@dataclass
class Running:
    vendor: Vendor
    state: FakeState
    url: str
    client: httpx.AsyncClient | None = None

    def want(self, numbers: Iterable[int]) -> set[str]:
        """The external ids the connector should yield for fake people `numbers`."""
        return {self.vendor.external_id(n) for n in numbers}

    def connector(self, token: str = TOKEN, **options: Any) -> Connector[Any]:
        cls = get_connector_class(self.vendor.kind)
        raw = {**self.vendor.config(self.url, token), "rate_limit": 10_000, **options}
        config = cls.Config.model_validate(raw)
        context = ConnectorContext(
            name=f"{self.vendor.kind}_test", base_dir=Path.cwd(), client=self.client
        )
        return cls(config, context)


@contextmanager
def running(kind: str, state: FakeState | None = None) -> Iterator[Running]:
    vendor = VENDORS[kind]
    state = state or FakeState(TOKEN)
    with FakeServer(vendor.make_app(state)) as server:
        yield Running(vendor, state, server.url)
