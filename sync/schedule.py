"""Connector schedules: the `schedule` cron expression of each `[connectors.NAME]` table.

croniter parses and evaluates the expressions (standard five-field cron, with the usual
day-of-month OR day-of-week rule), so crmhub does not reimplement cron. One arq cron job ticks
every minute and enqueues the connectors due at that minute (`due_connectors`); the
per-connector job id then keeps a slow run from being queued twice.
"""

from __future__ import annotations

from datetime import datetime

from croniter import croniter

from crmhub.errors import ConfigError
from crmhub.settings import Settings
from sync.sources import configured_sources

__all__ = ["due_connectors", "next_run", "schedules"]


def schedules(settings: Settings) -> dict[str, str]:
    """Enabled connectors that have a schedule, validated: name -> cron expression."""
    out: dict[str, str] = {}
    for name in configured_sources(settings):
        expr = settings.connectors[name].get("schedule")
        if not expr:
            continue
        if not isinstance(expr, str) or not croniter.is_valid(expr):
            raise ConfigError(
                f"[connectors.{name}] schedule = {expr!r} is not a valid cron expression "
                "(five fields: minute hour day-of-month month day-of-week, e.g. '*/15 * * * *')",
                key=f"connectors.{name}.schedule",
            )
        out[name] = expr
    return out


def due_connectors(settings: Settings, minute: datetime) -> list[str]:
    """Connectors whose schedule fires at `minute` (seconds are ignored)."""
    at = minute.replace(second=0, microsecond=0)
    return [name for name, expr in schedules(settings).items() if croniter.match(expr, at)]


def next_run(expr: str, after: datetime) -> datetime:
    """The first time after `after` at which `expr` fires."""
    value = croniter(expr, after).get_next(datetime)
    assert isinstance(value, datetime)
    return value
