"""The hosted-form rate limit across processes: with `[queue] redis_url` set, every
`crmhub serve` of an installation counts posts from one address together (Redis); without
it, or with Redis down, each process counts its own."""

from __future__ import annotations

import logging
import socket

import httpx
import redis

from crmhub.settings import Settings
from crmhub.web import create_app
from sync.store import make_engine
from tests.conftest import REDIS_URL
from tests.web.conftest import connectors, inbox_count, live

ORIGIN = {"origin": "https://www.example.com"}
LIMIT = 5  # posts per minute per address, the `contact` form of tests/web/conftest.py


def _settings(tmp_path, sqlite_url: str, queue: dict[str, str] | None) -> Settings:
    settings = Settings(store={"url": sqlite_url}, connectors=connectors(), queue=queue or {})  # type: ignore[arg-type]
    settings.source_path = tmp_path / "crmhub.toml"
    return settings


def _post_to_two_servers(settings: Settings, sqlite_url: str, per_server: int) -> list[int]:
    """`per_server` posts from this address to each of two servers of one store."""
    db = make_engine(sqlite_url)
    codes = []
    try:
        with live(create_app(settings, db)) as first, live(create_app(settings, db)) as second:
            for server in (first, second):
                for i in range(per_server):
                    response = httpx.post(
                        f"{server.url}/f/contact",
                        data={"email": f"p{i}@{server.url[-5:]}.example"},
                        headers=ORIGIN,
                    )
                    codes.append(response.status_code)
    finally:
        db.dispose()
    return codes


def test_two_servers_share_the_limit_through_redis(tmp_path, sqlite_url, namespace):
    settings = _settings(tmp_path, sqlite_url, {"redis_url": REDIS_URL, "namespace": namespace})
    codes = _post_to_two_servers(settings, sqlite_url, per_server=4)
    assert codes == [303] * 4 + [303] + [429] * 3  # 5 a minute across both, not 5 each
    db = make_engine(sqlite_url)
    assert inbox_count(db) == LIMIT
    db.dispose()
    keys = [k.decode() for k in redis.Redis.from_url(REDIS_URL).keys(f"{namespace}*")]
    assert len(keys) == 1
    assert keys[0].startswith(f"{namespace}forms:rate:")
    assert "127.0.0.1" not in keys[0]  # a digest, not the address
    assert 0 < redis.Redis.from_url(REDIS_URL).pttl(keys[0]) <= 60_000


def test_without_a_queue_each_server_counts_its_own(tmp_path, sqlite_url):
    codes = _post_to_two_servers(_settings(tmp_path, sqlite_url, None), sqlite_url, per_server=6)
    assert codes == ([303] * LIMIT + [429]) * 2


def test_redis_down_falls_back_to_the_process_count(tmp_path, sqlite_url, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = {"redis_url": f"redis://127.0.0.1:{port}/0", "namespace": "down:"}
    caplog.set_level(logging.WARNING, logger="crmhub.web.forms")
    codes = _post_to_two_servers(_settings(tmp_path, sqlite_url, queue), sqlite_url, per_server=6)
    assert codes == ([303] * LIMIT + [429]) * 2  # forms keep working, limited per process
    warnings = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(warnings) == 2  # once per process and minute, not once per post
