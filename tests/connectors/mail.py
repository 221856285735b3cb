"""Helpers shared by the mail connector tests (IMAP, Gmail, Graph): an engine on a throwaway
store, its totals, and a connector built from a config table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from connectors import ConnectorContext, get_connector_class
from sync.engine import SyncEngine
from sync.queries import store_totals
from sync.store import make_engine
from tests.conftest import make_settings


def engine_for(tmp_path: Path, store_url: str, **connectors: dict[str, Any]) -> SyncEngine:
    """A sync engine over an upgraded store (the `sqlite_url`/`store_url` fixtures)."""
    return SyncEngine(make_settings(tmp_path, store_url, connectors), make_engine(store_url))


def close(engine: SyncEngine) -> None:
    engine.close()
    engine.db.dispose()


def totals(db: Engine) -> dict[str, int]:
    with db.connect() as conn:
        return store_totals(conn)


def make_connector(table: dict[str, Any], tmp_path: Path, name: str = "mail") -> Any:
    cls = get_connector_class(table["type"])
    return cls(cls.Config(**table), ConnectorContext(name, tmp_path))
