"""The FastAPI application factory. Feature routers register here; nothing runs at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from sqlalchemy import Engine

from crmhub import __version__
from crmhub.settings import Settings
from crmhub.web import hooks, metrics

__all__ = ["create_app", "get_db", "get_settings"]


def create_app(settings: Settings, db: Engine) -> FastAPI:
    """The whole web app for one store. `db` is an engine at the current schema."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        db.dispose()

    app = FastAPI(title="crmhub", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.db = db

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers and the store is reachable."""
        with db.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return {"status": "ok"}

    # Feature routers are added below, one line each (webhooks, steward UI and API, metrics).
    app.include_router(hooks.router)  # /hooks/forms/{connector}, /f/{form}, inbox drain
    app.include_router(metrics.router)  # /metrics (Prometheus)
    return app


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_db(request: Request) -> Engine:
    db: Engine = request.app.state.db
    return db
