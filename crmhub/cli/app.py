"""The Typer application: global options and the command groups."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from crmhub import __version__
from crmhub.cli import (
    dedupe_cmd,
    explain_cmd,
    forms_cmd,
    golden_cmd,
    ops_cmd,
    outbox_cmd,
    rebuild_cmd,
    review_cmd,
    serve_cmd,
    sync_cmd,
    worker_cmd,
)
from crmhub.cli.common import EXIT_ERROR, AppState, print_error, setup_logging
from crmhub.errors import CrmHubError

__all__ = ["app", "main"]

app = typer.Typer(
    name="crmhub",
    help=(
        "crmhub: pull contacts and activity from your sources, fold them into golden records, "
        "keep them in sync.\n\nStart with `crmhub demo`, then `crmhub init` for your own config."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"crmhub {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        envvar="CRMHUB_CONFIG",
        help="Config file (default ./crmhub.toml).",
        show_default=False,
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log to stderr (no PII)."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    setup_logging(verbose)
    ctx.obj = AppState(config=config)


sync_cmd.register(app)
golden_cmd.register(app)
explain_cmd.register(app)
ops_cmd.register(app)
serve_cmd.register(app)
forms_cmd.register(app)
worker_cmd.register(app)
review_cmd.register(app)
outbox_cmd.register(app)
dedupe_cmd.register(app)
rebuild_cmd.register(app)


def main() -> None:
    """Console entry point: crmhub errors become one clear line and exit code 1."""
    try:
        app()
    except CrmHubError as exc:  # raised past the command (settings loaded on first use)
        print_error(str(exc))
        sys.exit(EXIT_ERROR)  # not typer.Exit: outside the app nothing turns it into a status
