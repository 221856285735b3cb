from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest

import connectors.http as http
from tests.connectors.vendors import VENDORS, Running, running


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same policy, shorter backoff: a test waits for Retry-After, not for jitter."""
    fast = functools.partial(http.request_retry, initial=0.01, max_wait=0.05)
    monkeypatch.setattr(http, "request_retry", fast)


@pytest.fixture(params=sorted(VENDORS))
def vendor(request: pytest.FixtureRequest) -> Iterator[Running]:
    with running(request.param) as run:
        yield run
