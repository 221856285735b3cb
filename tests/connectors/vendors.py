"""One row per HTTP connector kind: its fake app and how to configure the connector."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from starlette.types import ASGIApp

from connectors.base import Connector, ConnectorContext
from connectors.registry import get_connector_class
from tests.fakes import hubspot
from tests.fakes.server import FakeServer, FakeState

TOKEN = "canary-SECRET-token-9f8e7d"


@dataclass(frozen=True)
class Vendor:
    kind: str
    make_app: Callable[[FakeState], ASGIApp]
    config: Callable[[str, str], dict[str, Any]]
    # Largest page the connector may ask for; tests use smaller ones.
    max_page: int
    activities: bool = True


VENDORS: dict[str, Vendor] = {
    "hubspot": Vendor(
        "hubspot",
        hubspot.make_app,
        lambda url, token: {"type": "hubspot", "base_url": url, "token": token},
        200,
    ),
}


@dataclass
class Running:
    vendor: Vendor
    state: FakeState
    url: str
    client: httpx.AsyncClient | None = None

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
