"""Connector kinds: `@register` puts a class in the table; lookups import modules lazily."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from connectors.base import Connector
from crmhub.errors import UnknownConnectorError

__all__ = ["available_connectors", "get_connector_class", "register"]

_REGISTRY: dict[str, type[Connector[Any]]] = {}
_NOT_CONNECTORS = {"base", "registry", "http", "pagination", "files", "email_parsing", "oauth"}
_loaded = False

C = TypeVar("C", bound=type[Connector[Any]])


def register(kind: str, *, label: str) -> Callable[[C], C]:
    """Class decorator: make `cls` the connector for `type = "<kind>"`."""

    def decorate(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, Connector)):
            raise TypeError(f"@register({kind!r}) needs a Connector subclass, got {cls!r}")
        existing = _REGISTRY.get(kind)
        if existing is not None and existing is not cls:
            raise ValueError(f"connector kind {kind!r} is registered twice ({existing!r})")
        stem = cls.__module__.rsplit(".", 1)[-1]
        if cls.__module__.startswith("connectors.") and stem != kind:
            raise ValueError(f"connector kind {kind!r} must live in connectors/{kind}.py")
        cls.kind = kind
        cls.label = label
        _REGISTRY[kind] = cls
        return cls

    return decorate


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    import connectors

    for module in pkgutil.iter_modules(connectors.__path__):
        if module.name not in _NOT_CONNECTORS and not module.name.startswith("_"):
            importlib.import_module(f"connectors.{module.name}")
    for ep in entry_points(group="crmhub.connectors"):
        ep.load()
    _loaded = True


def available_connectors() -> dict[str, type[Connector[Any]]]:
    """Every known connector kind, sorted by kind."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_connector_class(kind: str) -> type[Connector[Any]]:
    """The class for `kind`, or `UnknownConnectorError` listing the known kinds."""
    if kind not in _REGISTRY:
        _load_all()
    try:
        return _REGISTRY[kind]
    except KeyError:
        known = sorted(_REGISTRY)
        raise UnknownConnectorError(
            f"unknown connector type {kind!r}; known types: {', '.join(known)}",
            kind=kind,
            known=known,
        ) from None
