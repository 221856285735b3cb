from __future__ import annotations

import httpx

from crmhub.web import create_app
from tests.conftest import make_settings


async def test_health_reaches_the_store(tmp_path, db, store_url):
    app = create_app(make_settings(tmp_path, store_url, {}), db)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://crmhub") as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/openapi.json")).status_code == 200
