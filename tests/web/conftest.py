"""A steward workspace to test against: a store with review items and one user per role."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI

from crmhub.web import create_app
from sync.users import add_user, create_token
from tests.steward_data import seed_reviews

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
