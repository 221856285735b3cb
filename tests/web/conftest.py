"""Shared helpers: signed intake requests and a live server (web forms); a steward
workspace with review items and one user per role (steward UI and API)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine, func, select

from connectors.webform import sign_generic
from crmhub.settings import Settings
from crmhub.web import create_app
from sync.inbox_store import InboxStore
from sync.store import activity, dead_letter, golden_record, inbox, membership, source_record
from sync.users import add_user, create_token
from tests.conftest import make_settings
from tests.steward_data import seed_reviews

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "webform"
SECRET = "whsec_test_0123456789"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def connectors() -> dict[str, dict[str, Any]]:
    tables: dict[str, dict[str, Any]] = {
        provider: {"type": "webform", "provider": provider, "secret": SECRET}
        for provider in ("typeform", "tally", "webflow", "hubspot", "generic")
    }
    tables["contact"] = {
        "type": "webform",
        "hosted": True,
        "allowed_origins": ["https://www.example.com"],
        "thank_you_url": "https://www.example.com/thanks",
        "rate_limit": 5,
    }
    tables["small"] = {
        "type": "webform",
        "secret": SECRET,
        "max_body_bytes": 2048,
        "max_json_depth": 8,
    }
    return tables


@pytest.fixture
def settings(tmp_path: Path, store_url: str) -> Settings:
    return make_settings(tmp_path, store_url, connectors())


@pytest.fixture
def app(settings: Settings, db: Engine) -> FastAPI:
    return create_app(settings, db)


@pytest.fixture
async def client(app: FastAPI):
    """In-process client: the response returns after the background processing finished."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://crmhub") as c:
        yield c
    intake = getattr(app.state, "intake", None)
    if intake is not None:
        intake.close()


def signed(provider: str, body: bytes, *, url: str = "", when: float | None = None) -> dict:
    """Headers that sign `body` the way `provider` does."""
    now = time.time() if when is None else when
    key = SECRET.encode()
    headers = {"content-type": "application/json"}
    if provider == "typeform":
        mac = base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode()
        headers["Typeform-Signature"] = f"sha256={mac}"
    elif provider == "tally":
        headers["Tally-Signature"] = base64.b64encode(
            hmac.new(key, body, hashlib.sha256).digest()
        ).decode()
    elif provider == "webflow":
        stamp = str(int(now * 1000))
        headers["x-webflow-timestamp"] = stamp
        headers["x-webflow-signature"] = hmac.new(
            key, stamp.encode() + b":" + body, hashlib.sha256
        ).hexdigest()
    elif provider == "hubspot":
        stamp = str(int(now * 1000))
        message = b"POST" + url.encode() + body + stamp.encode()
        headers["X-HubSpot-Request-Timestamp"] = stamp
        headers["X-HubSpot-Signature-v3"] = base64.b64encode(
            hmac.new(key, message, hashlib.sha256).digest()
        ).decode()
    else:
        headers["X-Crmhub-Signature"] = sign_generic(SECRET, body, int(now))
    return headers


def count(db: Engine, table: Any, *where: Any) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def records(db: Engine, source: str, kind: str) -> list[dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(
            select(source_record.c.id, source_record.c.external_id, source_record.c.data).where(
                source_record.c.source == source, source_record.c.kind == kind
            )
        ).mappings()
        return [dict(r) for r in rows]


def golden_of(db: Engine, record_id: int) -> dict[str, Any] | None:
    with db.connect() as conn:
        row = conn.execute(
            select(golden_record.c.fields)
            .join(membership, membership.c.golden_id == golden_record.c.id)
            .where(membership.c.record_id == record_id)
        ).first()
        return None if row is None else dict(row[0])


def activities(db: Engine, source: str) -> list[dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(
            select(activity.c.type, activity.c.subject, source_record.c.data)
            .join(source_record, source_record.c.id == activity.c.record_id)
            .where(source_record.c.source == source)
        ).mappings()
        return [dict(r) for r in rows]


@contextmanager
def inbox_engine(db: Engine) -> Iterator[Engine]:
    """The engine holding `inbox` for store `db` (on SQLite a file of its own)."""
    store = InboxStore(db)
    try:
        yield store.engine
    finally:
        store.close()


def inbox_rows(db: Engine) -> list[dict[str, Any]]:
    with inbox_engine(db) as engine, engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(inbox).order_by(inbox.c.id)).mappings()]


def inbox_count(db: Engine) -> int:
    return len(inbox_rows(db))


def dead_letters(db: Engine, source: str) -> list[dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(select(dead_letter).where(dead_letter.c.source == source))
        return [dict(r) for r in rows.mappings()]


class LiveServer:
    """`crmhub serve`'s app under uvicorn on 127.0.0.1:<ephemeral>, lifespan on."""

    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="error", lifespan="on", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextmanager
def live(app: FastAPI) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        yield server


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> float:
    """Poll `check` until true; returns the seconds it took (fails after `timeout`)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - start


PASSWORD = "correct horse battery"


@pytest.fixture(autouse=True)
def quick_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real argon2id, with test-sized cost: the defaults take ~0.4 s a hash on a busy CI box,
    and every workspace hashes three passwords. Hashes carry their parameters, so verifying
    works the same."""
    from argon2 import PasswordHasher

    import sync.users

    monkeypatch.setattr(
        sync.users, "_hasher", PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    )


@dataclass
class Workspace:
    app: FastAPI
    tokens: dict[str, str]

    def client(self, role: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://crmhub", headers=headers
        )


@pytest.fixture
async def workspace(tmp_path, db, store_url) -> Workspace:
    settings = await seed_reviews(tmp_path, store_url, db, count=3)
    tokens = {}
    for role in ("viewer", "steward", "admin"):
        add_user(db, role, PASSWORD, role)
        tokens[role] = create_token(db, role, "tests")
    return Workspace(create_app(settings, db), tokens)
