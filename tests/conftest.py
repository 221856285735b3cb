"""Shared fixtures: hermetic environment, throwaway stores on SQLite and PostgreSQL.

Tests that need PostgreSQL or Redis skip with a reason on a laptop without them, and fail
under CI=true: a missing service must never pass as green.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine

from crmhub.settings import Settings
from sync.migrate import upgrade
from sync.store import make_engine

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
PG_ADMIN_URL = os.environ.get("CRMHUB_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CRMHUB_TEST_REDIS", "redis://127.0.0.1:6379/0")


def service_missing(what: str, why: object) -> None:
    message = f"{what} is not reachable ({why})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; under CI=true this is a failure, not a skip", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def namespace() -> Iterator[str]:
    """A key prefix of our own on the shared Redis (queues, leases, rate limits); every key
    under it is removed after."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=3)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        service_missing("Redis", exc)
    ns = f"test-{uuid.uuid4().hex[:10]}:"
    yield ns
    for pattern in (f"{ns}*", f"arq:*{ns}*"):
        for key in client.scan_iter(match=pattern):
            client.delete(key)
    client.close()


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CRMHUB_* variable from the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("CRMHUB_") and key != "CRMHUB_TEST_PG":
            monkeypatch.delenv(key)


@pytest.fixture(autouse=True)
def dispose_engines(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every engine a test opens is disposed when the test ends: a pooled psycopg connection
    left to the garbage collector warns (ResourceWarning) in whichever later test it dies in."""
    import sync.store

    made: list[Engine] = []
    real = sync.store.create_engine

    def tracking(*args: Any, **kwargs: Any) -> Engine:
        engine = real(*args, **kwargs)
        made.append(engine)
        return engine

    monkeypatch.setattr(sync.store, "create_engine", tracking)
    yield
    for engine in made:
        engine.dispose()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated template database; each test clones it (fast, isolated)."""
    name = f"crmhub_tpl_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        service_missing("PostgreSQL", exc)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(_pg_url(name))
    upgrade(engine)
    engine.dispose()
    yield name
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pg_url(database: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{database}"


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    name = f"crmhub_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield _pg_url(name)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str:
    """The same test on both back ends."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


@pytest.fixture
def db(store_url: str) -> Iterator[Engine]:
    engine = make_engine(store_url)
    yield engine
    engine.dispose()


def make_settings(tmp_path: Path, store_url: str, connectors: dict[str, dict]) -> Settings:
    settings = Settings(store={"url": store_url}, connectors=connectors)
    settings.source_path = tmp_path / "crmhub.toml"
    return settings
