"""Fixtures of the background-job tests: a Redis key space of their own, worker processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from arq.connections import ArqRedis, create_pool

from crmhub.settings import Settings
from sync.jobs import redis_settings
from tests.sync.worker_kit import REDIS_URL, Workers


@pytest.fixture
async def queue(namespace: str) -> AsyncIterator[ArqRedis]:
    """A connection to the test's queue (same Redis, the test's namespace)."""
    settings = Settings(queue={"redis_url": REDIS_URL, "namespace": namespace})  # type: ignore[arg-type]
    pool = await create_pool(redis_settings(settings, retries=0))
    yield pool
    await pool.aclose()


@pytest.fixture
def workers() -> Iterator[Callable[[Path], Workers]]:
    """Start `crmhub worker` processes for a config; every one is killed after the test."""
    made: list[Workers] = []

    def make(config: Path) -> Workers:
        made.append(Workers(config))
        return made[-1]

    yield make
    for w in made:
        w.stop_all()
