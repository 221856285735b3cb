"""What a store's writers must all agree on, installed once per engine from the settings.

Golden records are recomputed by the sync, by steward actions in the web app and the CLI, and
by erasure; each of them must survive fields the same way and enqueue the same write-back.
`configure(db, settings)` registers both for every connection of `db`; whoever opens a store
from settings (SyncEngine, `crmhub serve`, the CLI) calls it.
"""

from __future__ import annotations

import weakref

from sqlalchemy import Connection, Engine

from crmhub.settings import Settings, SurvivorshipSettings
from dedupe.survivorship import DEFAULT_POLICY, Policy
from sync import writeback

__all__ = ["configure", "policy_from_settings", "survivorship_for"]

_POLICIES: weakref.WeakKeyDictionary[Engine, Policy] = weakref.WeakKeyDictionary()


def policy_from_settings(section: SurvivorshipSettings) -> Policy:
    return Policy(section.default, dict(section.fields), tuple(section.source_priority))


def configure(db: Engine, settings: Settings) -> None:
    """Install the survivorship policy and the write-back plan of `settings` for `db`."""
    _POLICIES[db] = policy_from_settings(settings.survivorship)
    writeback.install(db, settings)


def survivorship_for(conn: Connection) -> Policy:
    """The policy installed for `conn`'s engine (the default: most recent wins)."""
    return _POLICIES.get(conn.engine, DEFAULT_POLICY)
