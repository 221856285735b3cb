"""The FastAPI application factory. Feature routers register here; nothing runs at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from sqlalchemy import Engine

from crmhub import __version__
from crmhub.settings import Settings
from crmhub.web import api as steward_api
from crmhub.web import hooks, metrics
from crmhub.web import steward as steward_ui
from sync.configure import configure

__all__ = ["create_app", "get_db", "get_settings"]


Processing = Literal["thread", "process"]


def create_app(settings: Settings, db: Engine, processing: Processing = "thread") -> FastAPI:
    """The whole web app for one store. `db` is an engine at the current schema.

    `processing`: where accepted form deliveries are mapped and matched. "thread": in this
    process, after each response (the ingest on a worker thread). "process": in a processor
    process the app starts and stops with its lifespan (sync/intake_process.py), so that CPU
    work does not hold this process's GIL while the event loop answers (`crmhub serve`).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        db.dispose()

    # Steward actions recompute golden records here: same survivorship and write-back as the
    # sync (installed before any request, not when the first webhook builds a SyncEngine).
    configure(db, settings)
    app = FastAPI(title="crmhub", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.db = db
    app.state.processing = processing

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers and the store is reachable."""
        with db.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return {"status": "ok"}

    # Feature routers are added below, one line each (webhooks, steward UI and API, metrics).
    app.include_router(hooks.router)  # /hooks/forms/{connector}, /f/{form}, inbox drain
    app.include_router(metrics.router)  # /metrics (Prometheus)
    app.include_router(steward_api.router)  # /api/v1/...
    app.include_router(steward_ui.router)  # the steward UI
    return app


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_db(request: Request) -> Engine:
    db: Engine = request.app.state.db
    return db
