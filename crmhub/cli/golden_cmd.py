"""`crmhub golden list|show|search`: look at the unified people."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from crmhub.cli.common import console, die, open_store, print_json, state

__all__ = ["register"]

golden_app = typer.Typer(
    help="Golden records: one person across every source.", no_args_is_help=True
)


def _table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("id", "name", "email", "phone", "company", "members", "sources"):
        table.add_column(column, justify="right" if column in ("id", "members") else "left")
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["name"] or "",
            r["email"] or "",
            r["phone"] or "",
            r["company"] or "",
            str(r["members"]),
            ", ".join(r["sources"]),
        )
    return table


@golden_app.command("list")
def list_(
    ctx: typer.Context,
    limit: int = typer.Option(50, help="How many rows."),
    offset: int = typer.Option(0, help="Skip this many rows."),
    merged: bool = typer.Option(False, "--merged", help="Only records built from 2+ sources."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List golden records, oldest first."""
    from sync.queries import list_golden

    with open_store(state(ctx).settings).connect() as conn:
        rows = list_golden(conn, limit=limit, offset=offset, merged_only=merged)
    if as_json:
        print_json(rows)
    else:
        console.print(_table(rows, "Golden records"))


@golden_app.command()
def show(
    ctx: typer.Context,
    golden_id: int = typer.Argument(..., metavar="ID", help="Golden record id."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show one golden record: fields with lineage, member records, activity timeline."""
    from sync.queries import golden_detail

    with open_store(state(ctx).settings).connect() as conn:
        detail = golden_detail(conn, golden_id)
    if detail is None:
        die(f"no golden record {golden_id} (try `crmhub golden list`)")
    if as_json:
        print_json(detail)
        return
    if detail["id"] != golden_id:
        console.print(f"[dim]golden record {golden_id} was merged into {detail['id']}[/]")
    fields = Table(
        title=f"Golden record {detail['id']} (version {detail['version']})", title_justify="left"
    )
    fields.add_column("field")
    fields.add_column("value")
    fields.add_column("from")
    lineage = detail["lineage"]
    for name, value in detail["fields"].items():
        if name == "consent_at":
            continue  # shown with consent
        if name == "consent":
            consent = detail["consent"]
            if consent["status"] != "unknown":
                when = f" — {consent['at'][:16].replace('T', ' ')}" if consent["at"] else ""
                fields.add_row(name, f"{consent['status']}{when}", _origin(lineage.get(name, {})))
        elif isinstance(value, list):
            for item in value:
                source = lineage.get(f"{name}.{item}", {})
                fields.add_row(name, str(item), _origin(source))
        elif value not in (None, "", "unknown"):
            fields.add_row(name, str(value), _origin(lineage.get(name, {})))
    console.print(fields)
    members = Table(title="Source records", title_justify="left")
    for column in ("record", "source", "external id", "how"):
        members.add_column(column)
    for m in detail["members"]:
        members.add_row(str(m["record_id"]), m["source"], m["external_id"], m["method"])
    console.print(members)
    if detail["timeline"]:
        timeline = Table(title="Timeline", title_justify="left")
        for column in ("when", "type", "subject", "source"):
            timeline.add_column(column)
        for t in detail["timeline"]:
            timeline.add_row(t["occurred_at"][:16], t["type"], t["subject"] or "", t["source"])
        console.print(timeline)


def _origin(source: dict[str, Any]) -> str:
    if "source" not in source:
        return ""
    return f"{source['source']}:{source['external_id']}"


@golden_app.command()
def search(
    ctx: typer.Context,
    text: str = typer.Argument(..., help="Email, phone, or part of a name or company."),
    limit: int = typer.Option(50, help="How many rows."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Find golden records by email, phone, name or company."""
    from sync.queries import search_golden

    with open_store(state(ctx).settings).connect() as conn:
        rows = search_golden(conn, text, limit=limit)
    if as_json:
        print_json(rows)
    else:
        console.print(_table(rows, f"Golden records matching {text!r}"))


def register(app: typer.Typer) -> None:
    app.add_typer(golden_app, name="golden")
