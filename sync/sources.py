"""Configured sources: validate a `[connectors.NAME]` table and build its connector + mapping."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from connectors import Connector, ConnectorContext, get_connector_class
from crmhub.errors import SettingsError
from crmhub.mapping import Mapping, load_mapping, mapping_path_for
from crmhub.settings import Settings, describe_validation_error

__all__ = ["Source", "configured_sources", "load_source"]


@dataclass(frozen=True, slots=True)
class Source:
    """One configured connector instance, validated, with its mapping."""

    name: str
    connector_cls: type[Connector[Any]]
    config: Any
    mapping: Mapping

    def connector(
        self, settings: Settings, client: httpx.AsyncClient | None = None
    ) -> Connector[Any]:
        context = ConnectorContext(self.name, settings.base_dir, client, settings)
        return self.connector_cls(self.config, context)


@lru_cache(maxsize=64)
def _cached_mapping(path: Path, mtime_ns: int) -> Mapping:
    return load_mapping(path)


def load_source(settings: Settings, name: str) -> Source:
    """Validate `[connectors.<name>]` against its connector's Config and load its mapping."""
    file = str(settings.source_path or "crmhub.toml")
    table = settings.connectors.get(name)
    if table is None:
        known = ", ".join(sorted(settings.connectors)) or "none configured"
        raise SettingsError(
            f"{file}: no connector named '{name}' (configured: {known}). "
            f"Add a [connectors.{name}] table.",
            file=file,
            key=f"connectors.{name}",
        )
    kind = table.get("type")
    if not isinstance(kind, str):
        raise SettingsError(
            f'{file}: [connectors.{name}] needs `type = "..."` (see `crmhub connectors list`)',
            file=file,
            key=f"connectors.{name}.type",
        )
    cls = get_connector_class(kind)
    try:
        config = cls.Config.model_validate(table)
    except ValidationError as exc:
        raise describe_validation_error(
            exc, file, cls.Config, prefix=f"connectors.{name}"
        ) from None
    override = settings.resolve_path(config.mapping) if config.mapping else None
    extra = settings.resolve_path(settings.mappings_dir) if settings.mappings_dir else None
    path = mapping_path_for(kind, override, extra)
    mtime = path.stat().st_mtime_ns if path.exists() else 0
    return Source(name, cls, config, _cached_mapping(path, mtime))


def configured_sources(settings: Settings) -> list[str]:
    """Names of the enabled connectors, in config order."""
    return [n for n, t in settings.connectors.items() if t.get("enabled", True) is not False]
