"""Operations: `connectors list|check`, `runs`, `errors`, `quality`, `export golden|xref`."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from contextlib import nullcontext
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

import typer
from rich.table import Table

from crmhub.cli.common import console, die, open_store, print_json, state
from crmhub.errors import CrmHubError
from crmhub.records import CONTACT_FIELDS

__all__ = ["register"]

connectors_app = typer.Typer(
    help="Configured connectors and the kinds crmhub knows.", no_args_is_help=True
)
export_app = typer.Typer(
    help="Export golden records or the source -> golden cross-reference.", no_args_is_help=True
)


class Format(StrEnum):
    csv = "csv"
    jsonl = "jsonl"


@connectors_app.command("list")
def connectors_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable, with config schemas."),
) -> None:
    """The connector kinds available and the connectors configured."""
    from connectors import available_connectors

    settings = state(ctx).settings
    kinds = available_connectors()
    configured = [
        {
            "name": name,
            "type": table.get("type"),
            "enabled": table.get("enabled", True),
            "schedule": table.get("schedule"),
        }
        for name, table in settings.connectors.items()
    ]
    if as_json:
        print_json(
            {
                "kinds": [
                    {
                        "kind": k,
                        "label": c.label,
                        "streams": sorted(c.streams),
                        "config_schema": c.Config.model_json_schema(),
                    }
                    for k, c in kinds.items()
                ],
                "configured": configured,
            }
        )
        return
    table = Table(title="Configured connectors", title_justify="left")
    for column in ("name", "type", "enabled", "schedule"):
        table.add_column(column)
    for c in configured:
        table.add_row(
            c["name"], str(c["type"]), "yes" if c["enabled"] else "no", c["schedule"] or ""
        )
    console.print(table)
    console.print("Available kinds: " + ", ".join(f"{k} ({c.label})" for k, c in kinds.items()))


@connectors_app.command("check")
def connectors_check(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Connector name from the config."),
) -> None:
    """Validate a connector's config and mapping, and reach its source."""
    from sync.sources import load_source

    settings = state(ctx).settings
    source = load_source(settings, name)

    async def check() -> str:
        import httpx

        async with httpx.AsyncClient(timeout=30) as client:
            return await source.connector(settings, client).check()

    try:
        detail = asyncio.run(check())
    except CrmHubError as exc:
        die(str(exc) if name in str(exc) else f"{name}: {exc}")
    console.print(
        f"[green]ok[/] {name} ({source.connector_cls.kind}, mapping "
        f"{source.mapping.name}): {detail}",
        highlight=False,
    )


def _runs_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Sync runs", title_justify="left")
    for column in (
        "id",
        "connector",
        "state",
        "started",
        "seconds",
        "pulled",
        "new",
        "changed",
        "dead letters",
        "error",
    ):
        table.add_column(column)
    colours = {"succeeded": "green", "failed": "red", "running": "cyan"}
    for r in rows:
        c = r["counts"]
        colour = colours.get(r["state"], "yellow")
        table.add_row(
            str(r["id"]),
            r["connector"],
            f"[{colour}]{r['state']}[/]",
            r["started_at"][:19],
            f"{r['seconds']:.1f}" if r["seconds"] is not None else "",
            str(c.get("pulled", "")),
            str(c.get("new", "")),
            str(c.get("changed", "")),
            str(c.get("dead_letters", "")),
            (r["error"] or "")[:60],
        )
    return table


def runs(
    ctx: typer.Context,
    connector: str | None = typer.Option(None, "--connector", help="Only this connector."),
    limit: int = typer.Option(20, help="How many runs."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Recent sync runs: state, counts, duration and error."""
    from sync.queries import list_runs

    with open_store(state(ctx).settings).connect() as conn:
        rows = list_runs(conn, connector=connector, limit=limit)
    if as_json:
        print_json(rows)
    else:
        console.print(_runs_table(rows))


def errors(
    ctx: typer.Context,
    source: str | None = typer.Option(None, "--source", help="Only this connector."),
    run: int | None = typer.Option(None, "--run", help="Only this run id."),
    records_only: bool = typer.Option(
        False, "--records-only", help="Hide dropped values; show only rejected records."
    ),
    limit: int = typer.Option(100, help="How many rows."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (with raw)."),
) -> None:
    """Dead letters: rejected records and dropped values, with the reason and where."""
    from sync.queries import dead_letters

    with open_store(state(ctx).settings).connect() as conn:
        rows = dead_letters(
            conn, source=source, run_id=run, include_fields=not records_only, limit=limit
        )
    if as_json:
        print_json(rows)
        return
    table = Table(title="Dead letters", title_justify="left")
    for column in ("id", "run", "source", "what", "where", "field", "reason"):
        table.add_column(column)
    for r in rows:
        what = "[red]record[/]" if r["scope"] == "record" else "value"
        table.add_row(
            str(r["id"]),
            str(r["run_id"] or ""),
            r["source"],
            what,
            r["origin"],
            r["field"] or "",
            r["reason"],
        )
    console.print(table)


def quality(
    ctx: typer.Context,
    as_json: bool = typer.Option(
        False, "--json", help="Machine-readable, with completeness per field."
    ),
) -> None:
    """Data quality per source: duplicates, dead letters, blanked values (a source re-sent a
    record without a value it had before)."""
    from sync.quality import source_quality

    with open_store(state(ctx).settings).connect() as conn:
        rows = source_quality(conn)
    if as_json:
        print_json(rows)
        return
    table = Table(title="Data quality", title_justify="left")
    for column in (
        "source",
        "contacts",
        "in a merged record",
        "dead letters",
        "blanked (30 days)",
        "blanked (total)",
        "most blanked fields",
    ):
        table.add_column(column)
    for r in rows:
        b = r["blank_overwrites"]
        table.add_row(
            r["source"],
            str(r["contacts"]),
            f"{r['duplicate_rate']:.0%}",
            str(r["dead_letters"]),
            str(b["last_30_days"]),
            str(b["total"]),
            ", ".join(f"{f['field']} ({f['total']})" for f in b["fields"][:3]),
        )
    console.print(table)


def _output(out: Path | None) -> Any:
    return out.open("w", encoding="utf-8", newline="") if out else nullcontext(sys.stdout)


@export_app.command("golden")
def export_golden(
    ctx: typer.Context,
    fmt: Format = typer.Option(Format.csv, "--format", help="csv or jsonl."),
    out: Path | None = typer.Option(None, "--out", help="File to write (default stdout)."),
) -> None:
    """Every golden record with its survived fields."""
    from sync.queries import iter_golden

    columns = [
        "golden_id",
        *[f for f in CONTACT_FIELDS if f not in ("email", "phone")],
        "emails",
        "phones",
    ]
    with open_store(state(ctx).settings).connect() as conn, _output(out) as fh:
        writer = csv.writer(fh) if fmt is Format.csv else None
        if writer:
            writer.writerow(columns)
        for row in iter_golden(conn):
            _write(fh, writer, row, columns)


def _write(fh: IO[str], writer: Any, row: dict[str, Any], columns: list[str]) -> None:
    if writer is None:
        fh.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
        return
    writer.writerow(
        [
            ";".join(v) if isinstance(v := row.get(c), list) else ("" if v is None else v)
            for c in columns
        ]
    )


@export_app.command("xref")
def export_xref(
    ctx: typer.Context,
    fmt: Format = typer.Option(Format.csv, "--format", help="csv or jsonl."),
    out: Path | None = typer.Option(None, "--out", help="File to write (default stdout)."),
) -> None:
    """One row per staged contact: source,external_id,golden_id."""
    from sync.queries import iter_xref

    with open_store(state(ctx).settings).connect() as conn, _output(out) as fh:
        writer = csv.writer(fh) if fmt is Format.csv else None
        columns = ["source", "external_id", "golden_id"]
        if writer:
            writer.writerow(columns)
        for source, external_id, golden_id in iter_xref(conn):
            _write(
                fh,
                writer,
                dict(zip(columns, (source, external_id, golden_id), strict=True)),
                columns,
            )


def register(app: typer.Typer) -> None:
    app.add_typer(connectors_app, name="connectors")
    app.add_typer(export_app, name="export")
    app.command()(runs)
    app.command()(errors)
    app.command()(quality)
