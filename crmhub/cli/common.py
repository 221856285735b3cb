"""What every command shares: the settings in the Typer context, the store, output helpers."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from crmhub.errors import CrmHubError
from crmhub.settings import Settings, load_settings

__all__ = [
    "AppState",
    "console",
    "die",
    "err_console",
    "open_store",
    "print_error",
    "print_json",
    "setup_logging",
    "state",
]

console = Console()
err_console = Console(stderr=True)

EXIT_ERROR = 1
EXIT_DEAD_LETTERS = 3
EXIT_LOCKED = 4  # a worker was syncing the connector: nothing done for it, try again later
# A change held until confirmed: a --full run's inferred deletions above max_delete_ratio,
# a rebuild moving more than rebuild_max_moved_share. Nothing was written.
EXIT_NEEDS_CONFIRMATION = 5


@dataclass
class AppState:
    config: Path | None = None
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config)
        return self._settings


def state(ctx: typer.Context) -> AppState:
    obj = ctx.find_root().obj
    assert isinstance(obj, AppState)
    return obj


def print_error(message: str) -> None:
    # Messages quote config keys such as [connectors.hs]: never read them as Rich markup.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def die(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """End a command with `message` on stderr and exit status `code`."""
    print_error(message)
    raise typer.Exit(code)


def open_store(settings: Settings, *, migrate: bool | None = None) -> Engine:
    """The store engine, schema at head. SQLite stores are created/upgraded on first use;
    PostgreSQL ones need `crmhub init` (an explicit step for a shared database)."""
    from sync.configure import configure
    from sync.migrate import is_up_to_date, upgrade
    from sync.store import make_engine

    engine = make_engine(settings.store.url, settings.base_dir)
    is_sqlite = make_url(settings.store.url).get_backend_name() == "sqlite"
    try:
        if not is_up_to_date(engine):
            if migrate or (migrate is None and is_sqlite):
                upgrade(engine)
            else:
                die(
                    "the store schema is missing or old: run `crmhub init` to create or upgrade it."
                )
    except CrmHubError:
        raise
    except Exception as exc:
        url = make_url(settings.store.url).render_as_string(hide_password=True)
        die(
            f"cannot open the store at {url}: {type(exc).__name__}: {exc}. "
            "Check [store] url in the config."
        )
    configure(engine, settings)  # golden recomputes here survive and push as the sync does
    return engine


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str, ensure_ascii=False) + "\n")


_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class _KeyValueFormatter(logging.Formatter):
    """Appends a record's `extra` fields as key=value: logs carry ids and counts, not PII."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        return line + "".join(f" {k}={v}" for k, v in extras.items())


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler])
