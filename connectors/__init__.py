"""Connectors: one module per source kind. They pull raw records; they never touch the store."""

from __future__ import annotations

from connectors.base import Connector, ConnectorConfig, ConnectorContext
from connectors.registry import available_connectors, get_connector_class, register

__all__ = [
    "Connector",
    "ConnectorConfig",
    "ConnectorContext",
    "available_connectors",
    "get_connector_class",
    "register",
]
